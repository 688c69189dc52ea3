"""R1 and the low-pass L1 (losses.py)."""
import pytest
import torch
from torch import nn

from augment import augment
from discriminator_model import Discriminator, MultiscaleDiscriminator
from losses import lowpass_l1, r1_penalty


class LinearD(nn.Module):
    """D(x) per image = sum(weight * x): its gradient wrt x is `weight`."""

    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, mask, image):
        return (self.weight * image).flatten(1).sum(1)


class ConstantD(nn.Module):
    def __init__(self):
        super().__init__()
        self.score = nn.Parameter(torch.tensor(0.3))

    def forward(self, mask, image):
        return self.score.expand(image.shape[0], 1, 4, 4)


def inputs(batch=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = nn.functional.one_hot(torch.randint(0, 6, (batch, size, size), generator=g), 6).permute(0, 3, 1, 2).float()
    real = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).requires_grad_(True)
    return mask, real


def test_r1_is_zero_for_a_d_that_ignores_its_input():
    mask, real = inputs()
    assert r1_penalty(ConstantD()(mask, real), real).item() == 0
    zero_conv = Discriminator(6, 3, ndf=4)
    with torch.no_grad():
        for p in zero_conv.parameters():
            p.zero_()
    assert r1_penalty(zero_conv(mask, real), real).item() == 0


def test_r1_is_the_squared_gradient_norm_per_image():
    mask, real = inputs(batch=3, size=4)
    weight = torch.randn(3, 4, 4)
    penalty = r1_penalty(LinearD(weight)(mask, real), real)
    torch.testing.assert_close(penalty, weight.square().sum())


def test_r1_sums_a_multiscale_ds_logits_over_the_scales():
    mask, real = inputs(size=4)
    total = real.flatten(1).sum(1)
    # Two scales, each with a feature map and logits proportional to the image's sum.
    out = [[real * 5, 2.0 * total], [real * 7, -0.5 * total]]
    torch.testing.assert_close(r1_penalty(out, real), torch.tensor((2.0 - 0.5) ** 2 * real[0].numel()))


@pytest.mark.parametrize("multiscale", [False, True])
def test_r1_is_positive_and_trains_d(multiscale):
    torch.manual_seed(0)
    d = MultiscaleDiscriminator(6, 3, ndf=4) if multiscale else Discriminator(6, 3, ndf=4)
    mask, real = inputs(size=64)
    penalty = r1_penalty(d(mask, real), real)
    assert penalty.item() > 0
    penalty.backward()  # a gradient of a gradient, on the CPU
    # Every conv weight gets a gradient (a bias right before the logits cannot change their slope).
    weights = [p.grad for name, p in d.named_parameters() if name.endswith("weight")]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in weights)


def test_lowpass_l1():
    g = torch.Generator().manual_seed(0)
    real = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    fake = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    assert lowpass_l1(fake, real, 1).item() == pytest.approx(nn.functional.l1_loss(fake, real).item())
    # A +-0.2 checkerboard is texture: gone after pooling by 2, an L1 of 0.2 before.
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 0.4 - 0.2
    assert lowpass_l1(real + checker, real, 1).item() == pytest.approx(0.2)
    assert lowpass_l1(real + checker, real, 2).item() == pytest.approx(0, abs=1e-6)
    # A colour shift is not: it counts the same at every factor.
    for factor in (1, 2, 4):
        assert lowpass_l1(real + 0.1, real, factor).item() == pytest.approx(0.1)
    with pytest.raises(ValueError, match="whole number"):
        lowpass_l1(fake, real, 1.5)


def test_r1_reaches_the_real_image_through_d_augmentation():
    torch.manual_seed(0)
    d = Discriminator(6, 3, ndf=4)
    mask, real = inputs()
    aug_mask, aug_real = augment(mask, real, p=1.0, generator=torch.Generator().manual_seed(0))
    assert r1_penalty(d(aug_mask, aug_real), real).item() > 0
