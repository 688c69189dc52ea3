"""The generator's weight average (ema.py) and the BatchNorm statistics it paints with."""
import pytest
import torch
from torch import nn

from ema import GeneratorEMA, ema_beta, recompute_batchnorm_stats
from generator_model import Generator, init_weights


def onehot_masks(batch, size, seed, classes=6):
    labels = torch.randint(0, classes, (batch, size, size), generator=torch.Generator().manual_seed(seed))
    return nn.functional.one_hot(labels, classes).permute(0, 3, 1, 2).float()


def shift_weights(model, amount):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(amount)


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))


def test_half_life_zero_copies_the_weights():
    model = tiny_model()
    ema = GeneratorEMA(model, half_life_images=0)
    shift_weights(model, 0.37)
    assert ema.update(model, batch_images=2) == 0.0
    for averaged, current in zip(ema.model.parameters(), model.parameters()):
        assert torch.equal(averaged, current)


def test_the_average_trails_the_weights_by_its_half_life():
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    ema = GeneratorEMA(model, half_life_images=4)
    shift_weights(model, 1.0)
    # One batch of one half-life's images: the average is halfway between old and new weights.
    assert ema.update(model, batch_images=4) == pytest.approx(0.5)
    for averaged, old, current in zip(ema.model.parameters(), before, model.parameters()):
        torch.testing.assert_close(averaged, (old + current) / 2)
    # A smaller batch moves it less than halfway: it still trails.
    shift_weights(model, 1.0)
    beta = ema.update(model, batch_images=1)
    assert 0.5 < beta < 1
    for averaged, current in zip(ema.model.parameters(), model.parameters()):
        assert (averaged < current).all()
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_rampup_caps_the_half_life_by_the_images_seen():
    assert ema_beta(2, 10_000, images_seen=0, rampup=0.05) == 0.0  # the first update copies
    assert ema_beta(2, 10_000, images_seen=400, rampup=0.05) == pytest.approx(0.5 ** (2 / 20))
    assert ema_beta(2, 10_000, images_seen=10**9, rampup=0.05) == pytest.approx(0.5 ** (2 / 10_000))
    assert ema_beta(2, 10_000, images_seen=400) == pytest.approx(0.5 ** (2 / 10_000))  # no ramp-up given


def test_update_leaves_the_batchnorm_statistics_alone():
    model = tiny_model()
    ema = GeneratorEMA(model, half_life_images=0)
    model.train()
    model(torch.randn(4, 3, 8, 8) + 3)
    ema.update(model, batch_images=4)
    bn_raw, bn_ema = model[1], ema.model[1]
    assert not torch.equal(bn_raw.running_mean, bn_ema.running_mean)
    assert torch.equal(bn_ema.running_mean, torch.zeros(4))


def test_state_dict_resumes_exactly():
    model = tiny_model()
    ema = GeneratorEMA(model, half_life_images=6, rampup=0.5)
    for _ in range(3):
        shift_weights(model, 0.1)
        ema.update(model, batch_images=2)
    resumed = GeneratorEMA(tiny_model(), half_life_images=6, rampup=0.5)
    resumed.load_state_dict(ema.state_dict())
    assert resumed.images_seen == 6
    for run in (ema, resumed):
        shift_weights(model, 0.1)
        run.update(model, batch_images=2)
        shift_weights(model, -0.1)  # both see the same weights
    for a, b in zip(ema.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_recomputed_statistics_are_the_average_batch_statistics():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    model = nn.Sequential(conv, nn.Dropout(0.5), nn.BatchNorm2d(4, momentum=0.1))
    model.train()
    batches = [torch.randn(3, 3, 6, 6) * (i + 1) + i for i in range(3)]
    assert recompute_batchnorm_stats(model, batches) == 3
    with torch.no_grad():
        acts = [conv(b).transpose(0, 1).flatten(1) for b in batches]  # (channels, values) per batch, no dropout
    bn = model[2]
    torch.testing.assert_close(bn.running_mean, torch.stack([a.mean(1) for a in acts]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([a.var(1, unbiased=True) for a in acts]).mean(0))
    # With one batch, they are that batch's mean and variance.
    recompute_batchnorm_stats(model, batches[:1])
    torch.testing.assert_close(bn.running_mean, acts[0].mean(1))
    torch.testing.assert_close(bn.running_var, acts[0].var(1))
    # Modes and momentum are put back.
    assert model.training and all(m.training for m in model.modules()) and bn.momentum == 0.1
    model.eval()
    recompute_batchnorm_stats(model, batches)
    assert not any(m.training for m in model.modules())


def test_recalibrating_leaves_the_global_random_stream_alone():
    generator = init_weights(Generator(6, 3, ngf=4, num_downs=5, noise_inject=True))  # draws noise when it runs
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    recompute_batchnorm_stats(generator, [onehot_masks(2, 32, 0)])
    assert torch.equal(torch.rand(3), expected)


def test_an_averaged_recalibrated_unet_paints_in_range():
    torch.manual_seed(0)
    generator = init_weights(Generator(6, 3, ngf=4, num_downs=5))
    ema = GeneratorEMA(generator, half_life_images=8, rampup=0.5)
    opt = torch.optim.Adam(generator.parameters(), lr=1e-2)
    target = torch.rand(2, 3, 32, 32) * 2 - 1
    generator.train()
    for step in range(4):
        loss = nn.functional.l1_loss(generator(onehot_masks(2, 32, step)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(generator, batch_images=2)
    assert recompute_batchnorm_stats(ema.model, (onehot_masks(4, 32, 100 + i) for i in range(5))) == 5
    assert not ema.model.training
    with torch.no_grad():
        painted = ema.model(onehot_masks(3, 32, 999))
    assert painted.shape == (3, 3, 32, 32)
    assert torch.isfinite(painted).all()
    assert painted.min() >= -1 and painted.max() <= 1
    assert painted.std() > 0
