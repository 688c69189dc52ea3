"""The nucleus segmenter: a U-Net over the classes of a label set (dataset/masks.py;
PanNuke's six by default, or CoNIC's seven), its loss, tiled inference, and Macenko
stain normalisation. Its Dice/IoU scores are in metrics.py.

Used by train_segmenter.py (training on PanNuke or CoNIC), make_masks.py
(UniToPatho masks), evaluate.py and the quality study (quality/), which share its
training step and pooled features.

The model takes float RGB in [0, 1], shape (B, 3, H, W), and normalises it inside
with ImageNet statistics, so a torchvision ResNet encoder with ImageNet weights
sees what it was trained on. H and W must be multiples of `model.size_multiple`;
`predict_probs` pads and tiles images of any size.

The model works at its training data's scale (PanNuke 40x, about 0.25 um/px;
CoNIC 20x, about 0.5 um/px; recorded in the checkpoint as `mpp`); `segment_image`
resamples other magnifications to it and back.
"""
import contextlib

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from config import IMAGENET_MEAN, IMAGENET_STD, PANNUKE_MPP
from dataset.common import read_rgb
from dataset.masks import NUM_CLASSES, PANNUKE, get_label_set
from runtime import load_model_state
from tiling import blend_tiles
from utils import UserError, load_checkpoint_of_kind, safe_torch_load

CHECKPOINT_KIND = "he-segmenter"
CHECKPOINT_VERSION = 1
ENCODERS = ("unet", "resnet18", "resnet34", "resnet50")


# --------------------------------------------------------------------------- model

def conv_block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class PlainEncoder(nn.Module):
    """The classic U-Net encoder: features at strides 1, 2, 4, 8, 16 with width * 2**level channels."""

    def __init__(self, width, levels=5):
        super().__init__()
        self.channels = [width * 2 ** i for i in range(levels)]
        self.blocks = nn.ModuleList([conv_block(3, self.channels[0])])
        self.blocks.extend(conv_block(cin, cout) for cin, cout in zip(self.channels[:-1], self.channels[1:]))
        self.size_multiple = 2 ** (levels - 1)

    def forward(self, x):
        feats = []
        for i, block in enumerate(self.blocks):
            x = block(F.max_pool2d(x, 2) if i else x)
            feats.append(x)
        return feats


class ResNetEncoder(nn.Module):
    """A torchvision ResNet without its classifier: features at strides 2, 4, 8, 16, 32.

    Attribute names match torchvision's, so its ImageNet weight files load directly
    (--encoder-weights); nothing is downloaded here."""

    def __init__(self, name):
        super().__init__()
        import torchvision  # here, not at the top: importing it costs seconds and only ResNets need it
        net = getattr(torchvision.models, name)(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        expansion = type(net.layer1[0]).expansion
        self.channels = [64] + [c * expansion for c in (64, 128, 256, 512)]
        self.size_multiple = 32

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        feats = [x]
        x = self.maxpool(x)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            feats.append(x)
        return feats


class Segmenter(nn.Module):
    """U-Net: an encoder, then per level bilinear upsampling + skip concatenation +
    two 3x3 convolutions (width * 2**level channels), then a 1x1 head to one logit
    per class of the label set."""

    def __init__(self, encoder="unet", width=32, num_classes=NUM_CLASSES):
        super().__init__()
        if encoder not in ENCODERS:
            raise UserError(f"unknown encoder {encoder!r}; choose one of {', '.join(ENCODERS)}")
        self.encoder = PlainEncoder(width) if encoder == "unet" else ResNetEncoder(encoder)
        enc = self.encoder.channels
        dec = [width * 2 ** i for i in range(len(enc) - 1)]
        ins = [enc[-1]] + dec[1:][::-1]  # what comes up from the level below, coarse to fine
        self.decoder = nn.ModuleList(conv_block(cin + skip, cout)
                                     for cin, skip, cout in zip(ins, enc[:-1][::-1], dec[::-1]))
        self.head = nn.Conv2d(dec[0], num_classes, 1)
        self.num_classes = num_classes
        self.size_multiple = self.encoder.size_multiple
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def pooled_features(self, x):
        """(N, 3, H, W) images in [0, 1] -> (N, D) globally averaged deepest encoder
        features: the domain feature space of the study's distances."""
        return self.encoder((x - self.mean) / self.std)[-1].float().mean((2, 3))

    def forward(self, x):
        size = x.shape[-2:]
        feats = self.encoder((x - self.mean) / self.std)
        x = feats[-1]
        for block, skip in zip(self.decoder, feats[-2::-1]):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        logits = self.head(x)
        if logits.shape[-2:] != size:  # ResNet encoders stop at stride 2
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits


def with_model_defaults(cfg):
    """Checkpoints from before label sets were recorded segment PanNuke's classes."""
    return {"label_set": PANNUKE.name, **cfg}


def build_segmenter(cfg):
    cfg = with_model_defaults(cfg)
    return Segmenter(cfg["encoder"], cfg["width"], get_label_set(cfg["label_set"]).num_classes)


def load_encoder_weights(model, path):
    """Load a state dict into the encoder (for ResNets: torchvision's ImageNet file,
    e.g. resnet34-b627a593.pth; its classifier `fc.*` is dropped)."""
    state = safe_torch_load(path, "encoder weights")
    if not isinstance(state, dict):
        raise UserError(f"encoder weights {path}: expected a state dict, got {type(state).__name__}")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        model.encoder.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"encoder weights {path} do not fit this encoder: {str(exc).splitlines()[0]}") from None


MODEL_KEYS = ("model_config", "model")
RESUME_KEYS = MODEL_KEYS + ("config", "optimizer", "scaler", "epoch", "history", "rng")


def read_segmenter_checkpoint(path, required=MODEL_KEYS):
    """Load a train_segmenter.py checkpoint (weights_only=True); other files are rejected clearly."""
    ckpt = load_checkpoint_of_kind(path, CHECKPOINT_KIND, required, CHECKPOINT_VERSION)
    ckpt["model_config"] = with_model_defaults(ckpt["model_config"])
    return ckpt


def load_pannuke_segmenter(path, device, model_mpp=None):
    """A segmenter for masks in the PanNuke palette (UniToPatho's), and the um per
    pixel it works at: `model_mpp`, else its checkpoint's (older ones: PanNuke's)."""
    model, ckpt = load_segmenter(path, device)
    if ckpt["model_config"]["label_set"] != PANNUKE.name:
        raise UserError(f"segmenter {path} segments the {ckpt['model_config']['label_set']} label set, but masks "
                        f"here are in the PanNuke palette: train it with --label-set pannuke")
    return model, model_mpp or ckpt.get("mpp", PANNUKE_MPP)


def load_segmenter(path, device):
    """The model a segmenter checkpoint describes, with its weights, in eval mode."""
    ckpt = read_segmenter_checkpoint(path)
    model = build_segmenter(ckpt["model_config"])
    load_model_state(model, ckpt["model"], path, f"segmenter ({ckpt['model_config']})")
    return model.to(device).eval(), ckpt


# --------------------------------------------------------------------------- loss and metrics

def segmentation_loss(logits, target, smooth=1.0):
    """Cross-entropy + (1 - soft Dice averaged over the classes).

    Background is most pixels and Dead nuclei very few: cross-entropy alone settles
    for predicting background; the Dice term weighs every class equally. A class
    absent from the batch scores smooth / (predicted mass + smooth), which only
    pushes its predicted probability towards zero."""
    logits = logits.float()
    ce = F.cross_entropy(logits, target)
    probs = logits.softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).float()
    dims = (0, 2, 3)
    dice = (2 * (probs * onehot).sum(dims) + smooth) / (probs.sum(dims) + onehot.sum(dims) + smooth)
    return ce + (1 - dice.mean())


# --------------------------------------------------------------------------- training step and features

def to_device(labels, image, device, channels_last):
    """A loader's (labels, uint8 image) batch as (float image in [0, 1], long class map) on `device`."""
    x = image.to(device, non_blocking=True).float().div_(255)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, labels.to(device, non_blocking=True).long()


def train_step(model, opt, scaler, labels, image, device, channels_last, autocast):
    """One optimiser step on a batch of (labels, image) items; returns the detached loss."""
    x, target = to_device(labels, image, device, channels_last)
    with autocast:
        logits = model(x)
    loss = segmentation_loss(logits, target)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss.detach()


@torch.no_grad()
def segmenter_features(model, crops, device, batch_size=64):
    """float64 (N, D) pooled encoder features (Segmenter.pooled_features) of uint8 (N, H, W, 3) crops."""
    images = torch.from_numpy(crops).permute(0, 3, 1, 2)
    return torch.cat([model.pooled_features(images[i:i + batch_size].to(device).float().div(255)).cpu()
                      for i in range(0, len(images), batch_size)]).double()


# --------------------------------------------------------------------------- tiled inference

@torch.no_grad()
def predict_probs(model, image, tile=512, overlap=64, batch_size=8, autocast=contextlib.nullcontext(),
                  channels_last=False):
    """(3, H, W) float image in [0, 1] -> (C, H, W) float32 class probabilities.

    The image is padded (reflected) to at least one tile, cut into `tile`-px tiles
    sharing `overlap` px, and the tiles' softmax outputs are blended with
    tiling.blend_window (sin^2 ramps over the overlap), so memory stays bounded,
    there are no seams, and pixels near a tile's edge, which lack context, count
    less where a neighbour covers them. In eval mode a tile's output does not
    depend on the other tiles in its batch."""
    if tile % model.size_multiple or not 0 <= overlap < tile:
        raise UserError(f"tile {tile} must be a multiple of {model.size_multiple} and overlap {overlap} in [0, tile)")
    _, h, w = image.shape
    pad_h, pad_w = max(0, tile - h), max(0, tile - w)
    if pad_h or pad_w:
        mode = "reflect" if pad_h < h and pad_w < w else "replicate"
        image = F.pad(image[None], (0, pad_w, 0, pad_h), mode=mode)[0]

    def run(batch, first):
        tiles = torch.stack([image[:, y:y + tile, x:x + tile] for y, x in batch])
        if channels_last:
            tiles = tiles.contiguous(memory_format=torch.channels_last)
        with autocast:
            return model(tiles).float().softmax(1)

    probs = blend_tiles(run, *image.shape[-2:], tile, overlap, batch_size, image.device)
    return probs[:, :h, :w]


@torch.no_grad()
def segment_image(model, image, device, scale=1.0, **tiling):
    """(H, W, 3) uint8 RGB (numpy or tensor) -> (H, W) uint8 numpy class map.

    `scale` = image um/px / model um/px (config.UNITOPATHO_MPP / config.PANNUKE_MPP for UniToPatho):
    the image is resampled by it to the model's magnification (bilinear), segmented
    in tiles (`tiling`: predict_probs options), and the class probabilities are
    resampled back to (H, W) (bilinear, antialiased) before the argmax, so the map
    matches the image pixel for pixel."""
    h, w = image.shape[:2]
    x = torch.as_tensor(image).to(device).permute(2, 0, 1).float().div_(255)
    if scale != 1:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=scale < 1)[0]
        x = x.clamp_(0, 1)
    probs = predict_probs(model, x, **tiling)
    if probs.shape[-2:] != (h, w):
        probs = F.interpolate(probs[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
    return probs.argmax(0).byte().cpu().numpy()


# --------------------------------------------------------------------------- stain normalisation

class StainNormalizer:
    """Macenko stain normalisation (Macenko et al., ISBI 2009) with torchstain's numpy backend.

    The reference is an H&E image the stains are matched to. Without one, torchstain's
    built-in reference is used: H&E stain vectors (0.5626, 0.7201, 0.4062) and
    (0.2159, 0.8012, 0.5581) in optical density, 99th-percentile concentrations
    1.9705 and 1.0308 (from the MATLAB reference implementation torchstain adapts).

    An image with less than `min_tissue` of its pixels stained (optical density
    >= 0.15 in every channel, torchstain's threshold) is returned unchanged: it is
    mostly glass, and Macenko's stain estimate would be noise or fail."""

    def __init__(self, reference=None, min_tissue=0.005):
        try:
            import torchstain
        except ImportError:
            raise UserError("stain normalisation needs torchstain: pip install torchstain==1.4.1") from None
        self.normalizer = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
        self.min_tissue = min_tissue
        if reference is not None:
            image = read_rgb(reference)
            if stained_fraction(image) < min_tissue:
                raise UserError(f"stain reference {reference} has too little stained tissue to fit stain vectors")
            self.normalizer.fit(image)

    def __call__(self, image):
        if stained_fraction(image) < self.min_tissue:
            return image
        return self.normalizer.normalize(image, stains=False)[0]


def optical_density(image, io=240):
    """torchstain's conversion: OD = -log((I + 1) / Io) per channel."""
    return -np.log((np.asarray(image, dtype=np.float64) + 1) / io)


def stained_fraction(image, beta=0.15):
    return float((optical_density(image) >= beta).all(-1).mean())
