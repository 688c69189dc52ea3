"""UniToPatho images paired with nucleus masks, for pix2pix training and sampling.

Masks are RGB PNGs in the PanNuke palette (dataset/masks.py), one per image with
the same file name, at the image's size:
    M/training/masks/<image_id>   for the train split
    M/test/masks/<image_id>       for the test split

Decoding an 1812 x 1812 PNG pair costs far more than one 256 x 256 crop's training
step, so each visit cuts several crops from one decoded pair (--crops-per-image),
and --cache-dir keeps decoded arrays as .npy files that later epochs memory-map:
a crop then reads only its own bytes.
"""
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dataset.common import SeededAugmentation, joint_augmentation, read_rgb, split_item, to_item
from dataset.masks import PANNUKE, rgb_to_labels
from dataset.unitopatho import missing_files_error
from utils import ArrayCache, UserError

MASK_SPLIT_DIRS = {"train": "training", "test": "test"}
CROP_SCHEMES = ("random", "fivecrop")


def masks_folder(masks_dir, split):
    return Path(masks_dir) / MASK_SPLIT_DIRS[split] / "masks"


def read_mask(path, image_path, shape=None):
    """Palette PNG -> (H, W) uint8 class map; near-palette colours snap, others are an
    error. The mask must have its image's (H, W): `shape`, else read from the file header."""
    try:
        labels = rgb_to_labels(read_rgb(path), source=str(path))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if shape is None:
        try:
            with Image.open(image_path) as im:
                shape = im.height, im.width
        except OSError as exc:
            raise UserError(f"cannot read image {image_path}: {exc}") from None
    if labels.shape != tuple(shape):
        raise UserError(f"{path}: mask is {labels.shape[1]} x {labels.shape[0]} px but its image {image_path} "
                        f"is {shape[1]} x {shape[0]} px; masks must have their image's size")
    return labels


def decode_pair(image_path, mask_path):
    """(H, W, 3) uint8 image and its (H, W) uint8 class map."""
    image = read_rgb(image_path)
    return image, read_mask(mask_path, image_path, image.shape[:2])


class DecodeCache(ArrayCache):
    """Decoded pairs as <key>.image.npy (H, W, 3) and <key>.labels.npy (H, W), uint8,
    keyed by both files, so an edited image or regenerated mask is decoded afresh and
    two mask variants of the same images never collide. About 13 MB per 1812 x 1812 pair.
    """

    def load(self, image_path, mask_path):
        return self.get((image_path, mask_path), ("image", "labels"), lambda: decode_pair(image_path, mask_path))


def centre_origin(height, width, size):
    return (height - size) // 2, (width - size) // 2


def crop_origins(height, width, size, scheme, count, rng):
    """Top-left corners: `count` uniform random ones, or FiveCrop's four corners + centre."""
    if scheme == "fivecrop":
        return [(0, 0), (0, width - size), (height - size, 0), (height - size, width - size),
                centre_origin(height, width, size)]
    ys = rng.integers(0, height - size + 1, count).tolist()
    return list(zip(ys, rng.integers(0, width - size + 1, count).tolist()))


class UniToPathoPairs(torch.utils.data.Dataset):
    """(image, mask) pairs of a UniToPatho split at native resolution (the split's
    `downsample` is not applied: masks are made at the images' own size).

    Each item decodes one pair and returns K crops as (labels (K, S, S) uint8,
    images (K, 3, S, S) uint8): K = crops_per_image random crops, or 5 with
    crop_scheme 'fivecrop'. Crop positions and each crop's flips/rotations come from
    the item's seed (the index when indexed plainly), so items are reproducible.
    """

    label_set = PANNUKE  # masks are palette PNGs in the PanNuke palette

    def __init__(self, dataset, masks_dir, crop_size=256, crops_per_image=4, crop_scheme="random", augment=True,
                 cache_dir=None, size_multiple=1):
        if crop_size <= 0 or crop_size % size_multiple:
            raise UserError(f"--crop-size must be a positive multiple of {size_multiple} (what the generator's "
                            f"downsamplings need), got {crop_size}")
        if crops_per_image < 1:
            raise UserError(f"--crops-per-image must be at least 1, got {crops_per_image}")
        if crop_scheme not in CROP_SCHEMES:
            raise UserError(f"unknown crop scheme {crop_scheme!r}; expected one of {', '.join(CROP_SCHEMES)}")
        self.dataset, self.crop_size = dataset, crop_size
        self.crops_per_image, self.crop_scheme = crops_per_image, crop_scheme
        folder = masks_folder(masks_dir, dataset.split)
        self.mask_paths = [folder / name for name in dataset.names]
        missing = [p for p in self.mask_paths if not p.is_file()]
        if missing:
            raise missing_files_error(missing, "mask", folder)
        self.augment = SeededAugmentation(joint_augmentation()) if augment else None
        self.cache = DecodeCache(cache_dir) if cache_dir else None

    def __len__(self):
        return len(self.dataset)

    def decode(self, index):
        """The whole pair: (H, W, 3) image and (H, W) labels, memory-mapped when cached."""
        image_path, mask_path = self.dataset.paths[index], self.mask_paths[index]
        image, labels = self.cache.load(image_path, mask_path) if self.cache else decode_pair(image_path, mask_path)
        if min(image.shape[:2]) < self.crop_size:
            raise UserError(f"{image_path} is {image.shape[1]} x {image.shape[0]} px, smaller than "
                            f"--crop-size {self.crop_size}")
        return image, labels

    def crop(self, image, labels, y, x):
        s = self.crop_size
        # Copies: writable, and detached from a memory-mapped cache file.
        return np.array(image[y:y + s, x:x + s]), np.array(labels[y:y + s, x:x + s])

    def __getitem__(self, item):
        index, seed = split_item(item)
        image, labels = self.decode(index)
        # One seed for the positions, then one per crop for its augmentation.
        count = 5 if self.crop_scheme == "fivecrop" else self.crops_per_image
        seeds = np.random.SeedSequence(index if seed is None else seed).generate_state(1 + count)
        origins = crop_origins(*labels.shape, self.crop_size, self.crop_scheme, count, np.random.default_rng(seeds[0]))
        s = self.crop_size
        images, label_maps = np.empty((count, s, s, 3), np.uint8), np.empty((count, s, s), np.uint8)
        for k, ((y, x), crop_seed) in enumerate(zip(origins, seeds[1:])):
            crop_image, crop_labels = self.crop(image, labels, y, x)
            if self.augment:
                crop_image, crop_labels = self.augment(crop_image, crop_labels, crop_seed)
            images[k], label_maps[k] = crop_image, crop_labels
        # One HWC -> CHW transpose for all crops (per-crop to_item + stack copies twice).
        return torch.from_numpy(label_maps), torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


class UniToPathoCentre(UniToPathoPairs):
    """The centre crop of each pair, unaugmented, as (labels (S, S), image (3, S, S)):
    inputs for the per-epoch sample grids."""

    def __init__(self, dataset, masks_dir, crop_size=256, cache_dir=None):
        super().__init__(dataset, masks_dir, crop_size, 1, "random", augment=False, cache_dir=cache_dir)

    def __getitem__(self, item):
        index, _ = split_item(item)
        image, labels = self.decode(index)
        y, x = centre_origin(*labels.shape, self.crop_size)
        return to_item(*self.crop(image, labels, y, x))
