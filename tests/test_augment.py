"""D's input augmentation (augment.py): geometry shared by mask and image, seeds, gradients, ADA's p."""
import pytest
import torch
from torch import nn

from augment import COLOUR, GEOMETRIC, TRANSFORMS, AdaptiveP, augment, jitter_stains

CLASSES = 4
# One colour per class in [-1, 1]: an image painted from its mask.
PAINT = torch.tensor([[-0.8, 0.1, 0.6], [0.9, -0.5, 0.2], [0.3, 0.7, -0.9], [-0.2, -0.6, 0.8]])


def blocky_mask(batch=6, size=16, seed=0):
    """One-hot masks of 4 x 4 class blocks: no symmetry, so any geometric change shows."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (batch, size // 4, size // 4), generator=g)
    labels = labels.repeat_interleave(4, 1).repeat_interleave(4, 2)
    return nn.functional.one_hot(labels, CLASSES).permute(0, 3, 1, 2).float()


def paint(mask):
    """(B, 3, H, W): each pixel the colour of its class; 0 where the mask has no class (cut out)."""
    return torch.einsum("bchw,cr->brhw", mask, PAINT)


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def test_geometric_transforms_move_mask_and_image_together():
    mask = blocky_mask()
    image = paint(mask)
    changed = 0
    for seed in range(5):
        out_mask, out_image = augment(mask, image, p=0.8, generator=seeded(seed), transforms=GEOMETRIC)
        assert torch.equal(out_image, paint(out_mask))
        # The mask stays one-hot except where cut out (all classes 0 there).
        assert set(out_mask.sum(1).unique().tolist()) <= {0.0, 1.0}
        changed += int((out_mask != mask).flatten(1).any(1).sum())
    assert changed > 10  # most images were moved


@pytest.mark.parametrize("name", GEOMETRIC[:3])
def test_each_geometric_transform_is_a_rearrangement_of_the_pixels(name):
    mask = blocky_mask()
    out_mask, out_image = augment(mask, paint(mask), p=1.0, generator=seeded(1), transforms=(name,))
    assert torch.equal(out_image, paint(out_mask))
    rotations = [torch.rot90(mask, k, dims=(2, 3)) for k in range(4)]
    flips = [mask, torch.flip(mask, dims=(3,))]
    for i in range(len(mask)):
        if name == "rotate90":
            assert any(torch.equal(out_mask[i], r[i]) for r in rotations)
        elif name == "flip":
            assert any(torch.equal(out_mask[i], f[i]) for f in flips)
        else:  # a shift: the class counts of the inner part are kept, the mask is still fully one-hot
            assert torch.equal(out_mask[i].sum(0), torch.ones(16, 16))


def test_translation_shifts_by_whole_pixels_with_reflection():
    mask = blocky_mask(batch=8)
    out_mask, _ = augment(mask, paint(mask), p=1.0, generator=seeded(2), transforms=("translate",))
    for i in range(len(mask)):
        matches = []
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                padded = nn.functional.pad(mask[i:i + 1], (2, 2, 2, 2), mode="reflect")[0]
                shifted = padded[:, 2 - dy:2 - dy + 16, 2 - dx:2 - dx + 16]
                if torch.equal(out_mask[i], shifted):
                    matches.append((dy, dx))
        assert matches, f"image {i} is not a shift of at most 2 px"


def test_colour_transforms_leave_the_mask_alone():
    mask = blocky_mask()
    image = paint(mask)
    out_mask, out_image = augment(mask, image, p=1.0, generator=seeded(3), transforms=COLOUR)
    assert torch.equal(out_mask, mask)
    assert not torch.equal(out_image, image)


def test_a_seed_repeats_and_images_of_one_call_are_transformed_alike():
    mask = blocky_mask()
    real, fake = paint(mask), paint(mask).flip(1)
    a = augment(mask, real, fake, p=0.5, generator=seeded(4))
    b = augment(mask, real, fake, p=0.5, generator=seeded(4))
    c = augment(mask, real, fake, p=0.5, generator=seeded(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    # The same generator state gives the same transforms in separate calls, as for one call.
    gen = seeded(6)
    state = gen.get_state()
    _, real_alone = augment(mask, real, p=0.5, generator=gen)
    gen.set_state(state)
    _, fake_alone = augment(mask, fake, p=0.5, generator=gen)
    _, real_pair, fake_pair = augment(mask, real, fake, p=0.5, generator=seeded(6))
    assert torch.equal(real_alone, real_pair) and torch.equal(fake_alone, fake_pair)


def test_same_images_get_the_same_transform_per_index():
    mask = blocky_mask()
    image = paint(mask)
    _, first, second = augment(mask, image, image.clone(), p=0.7, generator=seeded(7))
    assert torch.equal(first, second)


def test_p_zero_is_the_identity():
    mask = blocky_mask()
    image = paint(mask)
    out_mask, out_image = augment(mask, image, p=0.0, generator=seeded(8))
    assert out_mask is mask and out_image is image
    # A p so small that no coin comes up also leaves every pixel as it was.
    out_mask, out_image = augment(mask, image, p=1e-9, generator=seeded(8))
    assert torch.equal(out_mask, mask) and torch.equal(out_image, image)


def test_gradients_flow_to_the_image():
    mask = blocky_mask()
    image = (paint(mask) * 0.5).requires_grad_(True)
    _, out = augment(mask, image, p=1.0, generator=seeded(9), transforms=TRANSFORMS)
    out.square().sum().backward()
    assert image.grad is not None and torch.isfinite(image.grad).all()
    assert image.grad.abs().sum() > 0


def test_unknown_transform_is_named():
    with pytest.raises(ValueError, match="zoom"):
        augment(blocky_mask(), p=0.5, generator=seeded(0), transforms=("zoom",))


def test_stain_jitter_without_change_is_the_identity_and_moves_colours_otherwise():
    image = torch.rand(2, 3, 8, 8) * 1.8 - 0.9
    same = jitter_stains(image, torch.ones(2, 3), torch.zeros(2, 3))
    torch.testing.assert_close(same, image, atol=1e-5, rtol=0)
    # More haematoxylin darkens the image (every channel absorbs some of it).
    darker = jitter_stains(image, torch.ones(2, 3), torch.tensor([[0.05, 0, 0]] * 2))
    assert (darker < image).all()


def test_adaptive_p_rises_while_d_overfits_and_falls_after():
    ada = AdaptiveP(interval_images=4, full_swing_images=40)
    confident = torch.ones(2, 1, 5, 5)        # every real logit positive: r_t = 1 > 0.6
    for _ in range(10):
        ada.observe(confident, batch_images=2)
    assert ada.p == pytest.approx(0.5)        # 5 moves of 4 / 40
    assert ada.last_rt == 1.0
    unsure = [torch.ones(2, 1, 4, 4), -torch.ones(2, 1, 2, 2)]  # a multiscale D's logits: r_t = (32 - 8) / 40
    ada.observe(unsure, batch_images=4)
    assert ada.last_rt == pytest.approx(0.6) and ada.p == pytest.approx(0.4)  # not above the target: down
    for _ in range(100):
        ada.observe(-confident, batch_images=2)
    assert ada.p == 0.0
    for _ in range(100):
        ada.observe(confident, batch_images=4)
    assert ada.p == AdaptiveP.MAX_P < 1


def test_adaptive_p_resumes_from_its_state():
    ada = AdaptiveP(interval_images=8, full_swing_images=40)
    for _ in range(5):
        ada.observe(torch.ones(2, 3), batch_images=2)
    resumed = AdaptiveP(interval_images=8, full_swing_images=40)
    resumed.load_state_dict(ada.state_dict())
    for run in (ada, resumed):
        for _ in range(3):
            run.observe(torch.tensor([1.0, -1.0, 1.0]), batch_images=2)
    assert resumed.p == ada.p and resumed.last_rt == ada.last_rt


def test_a_transform_draws_the_same_with_or_without_the_others():
    mask = blocky_mask()
    image = paint(mask)
    alone = augment(mask, image, p=0.6, generator=seeded(10), transforms=("translate",))
    # Colour transforms leave the mask alone: it comes out as with the translation alone.
    with_colour = augment(mask, image, p=0.6, generator=seeded(10), transforms=("translate",) + COLOUR)
    assert torch.equal(alone[0], with_colour[0])
