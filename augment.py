"""Differentiable augmentation of the discriminator's inputs (DiffAugment, Zhao et al.
2020; ADA, Karras et al. 2020), for a discriminator conditioned on the mask.

On a few hundred tiles D learns the training images by heart and then drives G into
artefacts. Showing D randomly transformed images, real and fake alike, in D's step
and in G's, keeps it from memorising them; the transforms are differentiable so G
learns through them. Since D also reads the mask, geometric transforms move the mask
with the image; colour transforms touch the image only.

    augment(mask, *images, p=..., generator=...) -> (mask, *images)

Every image given in one call (e.g. the real and the fake batch) gets the same
transforms per index, so D compares like with like, and feature matching and
LabelMix pair up matching pixels. Each transform in `transforms` is drawn per
index with probability p; its random amounts come from `generator` (a
torch.Generator, drawn on its own device), so a seed repeats a result, and two
calls from the same generator state transform alike. p = 0 returns the inputs.

Order: colour (on the whole image, before anything is cut out), then flip,
90-degree rotation and integer translation as one per-pixel gather (reflect
padding, so the mask stays one-hot), then cutout (a rectangle of half the side set
to 0 in the image, mid-grey, and in every mask channel, i.e. no class).

`AdaptiveP` is ADA's controller for p.
"""
import torch

GEOMETRIC = ("flip", "rotate90", "translate", "cutout")
COLOUR = ("brightness", "saturation", "contrast", "hed")
TRANSFORMS = COLOUR + GEOMETRIC

TRANSLATE_FRACTION = 1 / 8   # the largest shift, as a fraction of the side (DiffAugment, ADA)
CUTOUT_FRACTION = 1 / 2      # the cut rectangle's side, as a fraction of the image's (DiffAugment)
HED_SIGMA = 0.05             # stain jitter: each stain scaled by 1 +- sigma and shifted by +- sigma OD

# Ruifrok & Johnston's optical densities of haematoxylin, eosin and DAB (rows), in R, G, B.
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
MIN_INTENSITY = 1e-3         # floor of the [0, 1] intensity before its logarithm


def uniform(batch, generator, low=0.0, high=1.0):
    return torch.rand(batch, generator=generator, device=generator.device, dtype=torch.float64) * (high - low) + low


def per_image(values, like):
    """(B,) values as a (B, 1, 1, 1) tensor on `like`'s device and dtype."""
    return values.to(device=like.device, dtype=like.dtype).view(-1, 1, 1, 1)


# --------------------------------------------------------------------------- colour (image only)

def adjust_brightness(image, amount):
    return image + amount


def adjust_saturation(image, factor):
    grey = image.mean(dim=1, keepdim=True)
    return (image - grey) * factor + grey


def adjust_contrast(image, factor):
    mean = image.mean(dim=(1, 2, 3), keepdim=True)
    return (image - mean) * factor + mean


def jitter_stains(image, scale, shift):
    """HED jitter (Tellez et al. 2018): [-1, 1] RGB -> optical density -> stain amounts,
    each stain times `scale` plus `shift` ((B, 3) each), and back."""
    od = -torch.log(((image + 1) / 2).clamp(min=MIN_INTENSITY))
    hed_from_rgb = HED_FROM_RGB.to(image.device, image.dtype)
    rgb_from_hed = RGB_FROM_HED.to(image.device, image.dtype)
    stains = torch.einsum("bchw,cs->bshw", od, hed_from_rgb)
    stains = stains * scale[:, :, None, None].to(image) + shift[:, :, None, None].to(image)
    od = torch.einsum("bshw,sc->bchw", stains, rgb_from_hed)
    return torch.exp(-od) * 2 - 1


def colour_transform(name, batch, generator):
    """The colour transform `name` with its amounts per index drawn now: a function of an image batch."""
    if name == "brightness":
        amount = uniform(batch, generator, -0.5, 0.5)
        return lambda image: adjust_brightness(image, per_image(amount, image))
    if name == "saturation":
        factor = uniform(batch, generator, 0.0, 2.0)
        return lambda image: adjust_saturation(image, per_image(factor, image))
    if name == "contrast":
        factor = uniform(batch, generator, 0.5, 1.5)
        return lambda image: adjust_contrast(image, per_image(factor, image))
    scale = uniform(batch * 3, generator, 1 - HED_SIGMA, 1 + HED_SIGMA).view(batch, 3)
    shift = uniform(batch * 3, generator, -HED_SIGMA, HED_SIGMA).view(batch, 3)
    return lambda image: jitter_stains(image, scale, shift)


# --------------------------------------------------------------------------- geometric (mask and image)

def reflect(index, size):
    """Indices outside [0, size) reflected back in, without repeating the edge (F.pad's 'reflect')."""
    period = 2 * (size - 1)
    index = index.remainder(period)
    return torch.where(index < size, index, period - index)


def source_pixels(flip, turns, shift_y, shift_x, height, width):
    """(B, H, W) flat index of the input pixel each output pixel reads, for the
    composition translate(rotate90(flip(x))) given per image: flip (bool), turns
    (0-3, counter-clockwise as torch.rot90) and the integer shifts."""
    device = flip.device
    y = torch.arange(height, device=device).view(1, -1, 1)
    x = torch.arange(width, device=device).view(1, 1, -1)
    y, x = reflect(y - shift_y.view(-1, 1, 1), height), reflect(x - shift_x.view(-1, 1, 1), width)
    y, x = torch.broadcast_tensors(y, x)
    for k in range(1, 4):
        # torch.rot90 by one turn reads out[i, j] = in[j, size - 1 - i]; undo up to three turns.
        turn = (turns >= k).view(-1, 1, 1)
        y, x = torch.where(turn, x, y), torch.where(turn, height - 1 - y, x)
    x = torch.where(flip.view(-1, 1, 1), width - 1 - x, x)
    return y * width + x


def gather_pixels(tensor, index):
    b, c, h, w = tensor.shape
    flat = index.view(b, 1, h * w).expand(b, c, h * w)
    return tensor.reshape(b, c, h * w).gather(2, flat).view(b, c, h, w)


def cutout_keep(apply, centre_y, centre_x, height, width, like):
    """(B, 1, H, W): 0 inside each applied image's rectangle (clipped to the image), 1 elsewhere."""
    half_h, half_w = height * CUTOUT_FRACTION / 2, width * CUTOUT_FRACTION / 2
    y = torch.arange(height, device=like.device).view(1, -1, 1)
    x = torch.arange(width, device=like.device).view(1, 1, -1)
    cy, cx = centre_y.to(like.device).view(-1, 1, 1), centre_x.to(like.device).view(-1, 1, 1)
    inside = ((y - cy).abs() < half_h) & ((x - cx).abs() < half_w) & apply.to(like.device).view(-1, 1, 1)
    return (~inside).to(like.dtype)[:, None]


# --------------------------------------------------------------------------- the augmentation

def augment(mask, *images, p, generator, transforms=TRANSFORMS):
    """(mask, *images) with `transforms` each applied per index with probability p.

    mask (B, C, H, W) one-hot, images (B, 3, H, W) in [-1, 1], square when
    "rotate90" is used. All images get the same transforms per index; gradients flow
    to them (and to the mask, should it need any)."""
    unknown = set(transforms) - set(TRANSFORMS)
    if unknown:
        raise ValueError(f"unknown augmentations {sorted(unknown)}; known: {', '.join(TRANSFORMS)}")
    if p <= 0 or not transforms:
        return (mask, *images)
    batch, _, height, width = mask.shape
    if "rotate90" in transforms and height != width:
        raise ValueError(f"90-degree rotations need square inputs, got {height} x {width}")

    # Every transform's coins and amounts are drawn whether it is on or not, so a
    # seed gives each transform the same draws whichever others are on.
    def chosen(name):
        return (uniform(batch, generator) < p) & (name in transforms)

    images = list(images)
    for name in COLOUR:
        apply, transform = chosen(name), colour_transform(name, batch, generator)
        if name in transforms:
            where = apply.to(mask.device).view(-1, 1, 1, 1)
            images = [torch.where(where, transform(image), image) for image in images]

    flip = chosen("flip") & (uniform(batch, generator) < 0.5)
    turns = torch.where(chosen("rotate90"), (uniform(batch, generator) * 4).floor().long(), 0)
    max_y, max_x = round(height * TRANSLATE_FRACTION), round(width * TRANSLATE_FRACTION)
    translate = chosen("translate")
    shift_y = torch.where(translate, (uniform(batch, generator, -max_y, max_y + 1)).floor().long(), 0)
    shift_x = torch.where(translate, (uniform(batch, generator, -max_x, max_x + 1)).floor().long(), 0)
    if "flip" in transforms or "rotate90" in transforms or "translate" in transforms:
        index = source_pixels(*(t.to(mask.device) for t in (flip, turns, shift_y, shift_x)), height, width)
        mask = gather_pixels(mask, index)
        images = [gather_pixels(image, index) for image in images]

    cut = chosen("cutout")
    centre_y, centre_x = uniform(batch, generator, 0, height), uniform(batch, generator, 0, width)
    if "cutout" in transforms:
        keep = cutout_keep(cut, centre_y, centre_x, height, width, mask)
        mask = mask * keep
        images = [image * keep.to(image.dtype) for image in images]
    return (mask, *images)


# --------------------------------------------------------------------------- ADA's p

class AdaptiveP:
    """ADA's controller: after every `interval_images` real images, p moves by
    (images since the last move) / `full_swing_images`, up when D's overfitting signal
    r_t = E[sign(D(real))] is above `target`, down otherwise, and stays in [0, MAX_P].

    stylegan2-ada moves p at most 0 -> 1 over 500k images (ada_kimg 500), adjusting
    every 4 batches of 64. CPU runs see a few thousand to a few tens of thousands of
    images (about 4,000 in 30 minutes at batch 2), in which p must be able to reach a
    useful level (0.2-0.6 in the paper) within the first quarter of the run: hence a
    full swing over 2,000 images, and an estimate of r_t over 32 images (16 steps at
    batch 2), i.e. steps of 0.016 in p. D's patch logits give hundreds of signs per
    image, so 32 images make a steady estimate."""

    MAX_P = 0.99  # at p = 1 D would never see an untransformed image, and the transforms could leak into G

    def __init__(self, p=0.0, target=0.6, interval_images=32, full_swing_images=2000):
        self.p = p
        self.target = target
        self.interval_images = interval_images
        self.full_swing_images = full_swing_images
        self.signs = 0.0       # sum of sign(D(real)) over the logits seen since the last move (a tensor once fed)
        self.logits = 0        # how many logits that sum covers
        self.images = 0        # real images seen since the last move
        self.last_rt = None    # r_t of the last move, for logging

    def observe(self, d_real_logits, batch_images):
        """Feed D's logits on one batch of real images (a tensor, or a list of
        tensors: one per scale); moves p once `interval_images` are seen. Returns p."""
        logits = d_real_logits if isinstance(d_real_logits, (list, tuple)) else [d_real_logits]
        for t in logits:
            self.signs = self.signs + t.detach().float().sign().sum()
            self.logits += t.numel()
        self.images += batch_images
        if self.images >= self.interval_images:
            self.last_rt = float(self.signs) / max(self.logits, 1)  # the one host read per interval
            step = self.images / self.full_swing_images
            self.p = min(max(self.p + (step if self.last_rt > self.target else -step), 0.0), self.MAX_P)
            self.signs, self.logits, self.images = 0.0, 0, 0
        return self.p

    def state_dict(self):
        return {"p": self.p, "signs": float(self.signs), "logits": self.logits, "images": self.images,
                "last_rt": self.last_rt}

    def load_state_dict(self, state):
        self.p, self.signs, self.logits, self.images = (float(state["p"]), float(state["signs"]),
                                                        int(state["logits"]), int(state["images"]))
        self.last_rt = state["last_rt"]


# --------------------------------------------------------------------------- --d-augment

DIFFAUGMENT = ("brightness", "saturation", "contrast", "translate", "cutout")  # DiffAugment's colour,translation,cutout


class DiscriminatorAugment:
    """What --d-augment does to D's inputs, with its own seeded RNG (saved in checkpoints):
    none; diffaug, DiffAugment's transforms on every image; ada, every transform with ADA's
    adaptive p (fed D's logits on real images through `observe`). `exclude` drops
    transforms a discriminator cannot take (cutout leaves mask pixels of no class, which
    OASIS's per-pixel targets cannot score)."""

    MODES = ("none", "diffaug", "ada")

    def __init__(self, mode, seed, device, exclude=()):
        if mode not in self.MODES:
            raise ValueError(f"unknown --d-augment {mode!r}; known: {', '.join(self.MODES)}")
        self.mode = mode
        self.transforms = tuple(t for t in (DIFFAUGMENT if mode == "diffaug" else TRANSFORMS) if t not in exclude)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.ada = AdaptiveP() if mode == "ada" else None

    @property
    def p(self):
        return {"none": 0.0, "diffaug": 1.0}.get(self.mode) if self.ada is None else self.ada.p

    def __call__(self, mask, *images):
        if self.mode == "none":
            return (mask, *images)
        return augment(mask, *images, p=self.p, generator=self.generator, transforms=self.transforms)

    def observe(self, d_real_logits, batch_images):
        if self.ada is not None:
            self.ada.observe(d_real_logits, batch_images)

    def state_dict(self):
        return {"rng": self.generator.get_state(), "ada": self.ada.state_dict() if self.ada else None}

    def load_state_dict(self, state):
        self.generator.set_state(state["rng"])
        if self.ada is not None and state["ada"] is not None:
            self.ada.load_state_dict(state["ada"])
