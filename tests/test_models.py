"""Generator and discriminator: shapes, options, receptive field, initialisation."""
import pytest
import torch
from torch import nn

from discriminator_model import Discriminator
from gan import build_discriminator, build_generator
from generator_model import Generator, init_weights, make_norm


def _onehot_batch(b, size=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 6, (b, size, size), generator=g)
    return nn.functional.one_hot(labels, 6).permute(0, 3, 1, 2).float()


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_generator_output_shape_and_range(norm):
    torch.manual_seed(0)
    g = init_weights(Generator(6, 3, ngf=8, norm=norm))
    x = _onehot_batch(2)
    for train in (True, False):
        g.train(train)
        with torch.no_grad():
            y = g(x)
        assert y.shape == (2, 3, 256, 256)
        assert y.dtype == torch.float32
        assert torch.isfinite(y).all()
        assert y.min() >= -1 and y.max() <= 1
        assert y.std() > 0  # not a constant image


def test_generator_accepts_multiples_of_256():
    g = init_weights(Generator(6, 3, ngf=4)).eval()
    with torch.no_grad():
        assert g(_onehot_batch(1, size=512)).shape == (1, 3, 512, 512)


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_discriminator_gives_30x30_patches(norm):
    d = init_weights(Discriminator(6, 3, ndf=8, norm=norm))
    mask = _onehot_batch(3)
    image = torch.rand(3, 3, 256, 256) * 2 - 1
    out = d(mask, image)
    assert out.shape == (3, 1, 30, 30)
    assert torch.isfinite(out).all()


def test_discriminator_receptive_field_is_70px():
    """Each patch logit depends on a 70 x 70 window of the input (the 70x70 PatchGAN).
    Eval-mode BatchNorm is per-pixel affine, so it does not mix positions."""
    d = init_weights(Discriminator(6, 3, ndf=8, norm="batch")).eval()
    mask = _onehot_batch(1).requires_grad_(True)
    image = (torch.rand(1, 3, 256, 256) * 2 - 1).requires_grad_(True)
    d(mask, image)[0, 0, 15, 15].backward()
    touched = (mask.grad.abs().sum((0, 1)) + image.grad.abs().sum((0, 1))) > 0
    rows = touched.any(1).nonzero().flatten()
    cols = touched.any(0).nonzero().flatten()
    assert rows.max() - rows.min() + 1 == 70
    assert cols.max() - cols.min() + 1 == 70


@pytest.mark.parametrize("ngf,ndf", [(8, 8), (16, 4)])
def test_width_options(ngf, ndf):
    cfg = dict(ngf=ngf, ndf=ndf, norm="batch", dropout=True)
    g, d = build_generator(cfg), build_discriminator(cfg)
    g_convs = [m for m in g.modules() if isinstance(m, nn.Conv2d)]
    d_convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert g_convs[0].in_channels == 6 and g_convs[0].out_channels == ngf
    assert max(m.out_channels for m in g_convs) == 8 * ngf
    assert d_convs[0].in_channels == 9 and d_convs[0].out_channels == ndf
    assert max(m.out_channels for m in d_convs) == 8 * ndf
    assert d_convs[-1].out_channels == 1
    # Parameter count grows ~quadratically with the width.
    g2 = build_generator(dict(cfg, ngf=2 * ngf))
    ratio = sum(p.numel() for p in g2.parameters()) / sum(p.numel() for p in g.parameters())
    assert 3.5 < ratio < 4.1


def test_norm_and_dropout_options():
    batch = Generator(ngf=4, norm="batch", dropout=True)
    inst = Generator(ngf=4, norm="instance", dropout=False)
    assert any(isinstance(m, nn.BatchNorm2d) for m in batch.modules())
    assert not any(isinstance(m, nn.InstanceNorm2d) for m in batch.modules())
    assert any(isinstance(m, nn.InstanceNorm2d) for m in inst.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in inst.modules())
    assert sum(isinstance(m, nn.Dropout) for m in batch.modules()) == 3
    assert sum(isinstance(m, nn.Dropout) for m in inst.modules()) == 0
    d_inst = Discriminator(ndf=4, norm="instance")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in d_inst.modules())
    with pytest.raises(ValueError, match="norm"):
        make_norm("group", 8)


def test_dropout_is_the_only_noise_in_train_mode():
    torch.manual_seed(0)
    x = _onehot_batch(2)
    with_dropout = init_weights(Generator(ngf=4, dropout=True)).train()
    assert not torch.equal(with_dropout(x), with_dropout(x))
    without = init_weights(Generator(ngf=4, dropout=False)).train()
    assert torch.equal(without(x), without(x))
    with_dropout.eval()
    assert torch.equal(with_dropout(x), with_dropout(x))


def test_init_is_normal_0_002():
    """pix2pix init: conv weights ~ N(0, 0.02), BatchNorm scales ~ N(1, 0.02), biases 0
    (PyTorch's default conv init is uniform with a fan-in dependent, much larger spread)."""
    torch.manual_seed(0)
    cfg = dict(ngf=32, ndf=32, norm="batch", dropout=True)
    for model in (build_generator(cfg), build_discriminator(cfg)):
        convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
        w = torch.cat([m.weight.detach().flatten() for m in convs])
        assert w.numel() > 200_000
        assert abs(w.mean().item()) < 1e-3
        assert w.std().item() == pytest.approx(0.02, rel=0.03)
        # Gaussian, not uniform: ~68.3 % within one sd (a uniform gives 57.7 %).
        assert (w.abs() < 0.02).float().mean().item() == pytest.approx(0.683, abs=0.01)
        for m in convs:
            if m.bias is not None:
                assert torch.count_nonzero(m.bias) == 0
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        scales = torch.cat([m.weight.detach() for m in bns])
        assert scales.numel() > 400
        assert scales.mean().item() == pytest.approx(1.0, abs=0.005)
        assert scales.std().item() == pytest.approx(0.02, rel=0.2)
        assert all(torch.count_nonzero(m.bias) == 0 for m in bns)
