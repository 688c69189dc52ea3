"""The U-Net's per-pixel noise inputs (generator_model.NoiseInjection, Generator(noise_inject=True))."""
import torch
from torch import nn

from generator_model import Generator, NoiseInjection, init_weights


def onehot_masks(batch, size=32, seed=0):
    labels = torch.randint(0, 6, (batch, size, size), generator=torch.Generator().manual_seed(seed))
    return nn.functional.one_hot(labels, 6).permute(0, 3, 1, 2).float()


def unet(noise_inject, seed=0):
    torch.manual_seed(seed)
    return init_weights(Generator(6, 3, ngf=4, num_downs=5, upsample="resize", noise_inject=noise_inject)).eval()


def set_noise_scales(generator, value):
    with torch.no_grad():
        for module in generator.modules():
            if isinstance(module, NoiseInjection):
                module.scale.fill_(value)


def test_noise_injection_adds_one_value_per_pixel_scaled_per_channel():
    layer = NoiseInjection(3)
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(layer(x), x)  # the scale starts at 0
    with torch.no_grad():
        layer.scale.copy_(torch.tensor([0.0, 1.0, 2.0]).view(1, 3, 1, 1))
    added = layer(x) - x
    assert torch.equal(added[:, 0], torch.zeros(2, 5, 5))
    torch.testing.assert_close(added[:, 2], 2 * added[:, 1])
    assert added[:, 1].std() > 0.5


def test_without_noise_the_state_dict_keys_are_unchanged():
    plain, noisy = unet(False).state_dict(), unet(True).state_dict()
    assert not any("noise" in key for key in plain)
    added = set(noisy) - set(plain)
    assert set(plain) <= set(noisy)
    assert added == {f"ups.{i}.noise.scale" for i in range(4)}  # one per decoder block
    # A checkpoint saved without noise loads strictly into the default U-Net.
    Generator(6, 3, ngf=4, num_downs=5, upsample="resize").load_state_dict(plain)


def test_noise_at_zero_scale_paints_as_the_plain_unet():
    plain, noisy = unet(False), unet(True)
    missing, unexpected = noisy.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all("noise" in key for key in missing)
    mask = onehot_masks(2)
    with torch.no_grad():
        assert torch.equal(noisy(mask, seeds=[0, 1]), plain(mask))


def test_seeds_repeat_the_noise_per_image():
    generator = unet(True)
    set_noise_scales(generator, 0.5)
    mask = onehot_masks(2)
    with torch.no_grad():
        first = generator(mask, seeds=[3, 4])
        again = generator(mask, seeds=[3, 4])
        other = generator(mask, seeds=[3, 5])
        alone = generator(mask[:1], seeds=[3])
        unseeded = generator(mask), generator(mask)
    assert torch.equal(first, again)
    assert torch.equal(first[0], other[0]) and not torch.equal(first[1], other[1])
    torch.testing.assert_close(alone[0], first[0])  # an image's noise does not depend on its batch
    assert not torch.equal(*unseeded)  # training draws fresh noise every call


def test_noise_gets_a_gradient_and_is_learned():
    generator = unet(True).train()
    loss = generator(onehot_masks(2)).square().mean()
    loss.backward()
    scales = [m.scale.grad for m in generator.modules() if isinstance(m, NoiseInjection)]
    assert all(g is not None and g.abs().sum() > 0 for g in scales)


def test_gan_generate_seeds_the_noise_inputs_of_a_generator_built_with_the_flag():
    import contextlib

    import config
    import gan
    from dataset.masks import CONIC
    args = config.training_parser("x", config.add_conic_training_data_args, "x").parse_args(
        ["--noise-inject", "--ngf", "4", "--no-dropout"])
    model_cfg = gan.model_config(args, CONIC, 32)
    assert model_cfg["noise_inject"] is True
    generator = gan.build_generator(model_cfg)
    with torch.no_grad():
        for module in generator.modules():
            if hasattr(module, "scale") and isinstance(module.scale, torch.nn.Parameter):
                module.scale.fill_(0.5)  # a trained scale: the noise shows
    mask = torch.zeros(2, CONIC.num_classes, 32, 32)
    mask[:, 0] = 1
    paint = [gan.generate(generator, mask, contextlib.nullcontext(), "eval", seeds) for seeds in ([1, 2], [1, 2], [3, 4])]
    assert torch.equal(paint[0], paint[1])
    assert not torch.equal(paint[0], paint[2])
