"""Pieces every dataset here shares: decoding, the (labels, image) item, and seeded
joint augmentation.

The item contract: a dataset returns (labels, image), a (H, W) uint8 class map and
a (3, H, W) uint8 image. The training sampler (train_utils.SeededSampler) hands
each dataset an `(index, seed)` pair instead of a plain index: the seed is derived
from (run seed, epoch, index), so an item's augmentation does not depend on the
worker count, the number of processes, or whether the run was resumed. Plain
indexing (`dataset[i]`) gives no seed and no augmentation.
"""
import os

import albumentations as A
import numpy as np
import torch
from PIL import Image

from utils import UserError


def check_overlap(problem, expected, allow_overlap):
    """A train/test split that shares data (`problem` says what): a UserError, or with --allow-overlap one
    warning line, from the first process of a torchrun job only."""
    if not allow_overlap:
        raise UserError(f"{problem}; expected {expected}, or give --allow-overlap to train anyway")
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"warning: {problem}: test scores will be measured partly on training data (--allow-overlap)",
              flush=True)


def split_item(item):
    """`(index, seed)` from the training sampler, or a plain index (seed None)."""
    if isinstance(item, tuple):
        return item
    return item, None


def joint_augmentation():
    """Flips and 90-degree rotations (all 8 symmetries of the square), applied to
    image and mask together; nucleus masks have no preferred orientation."""
    return A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.RandomRotate90(p=1.0)])


class SeededAugmentation:
    """Apply an albumentations pipeline with the seed the sampler chose for the item."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image, labels, seed):
        if seed is None:
            return image, labels
        self.transform.set_random_seed(int(seed))
        out = self.transform(image=image, mask=labels)
        return np.ascontiguousarray(out["image"]), np.ascontiguousarray(out["mask"])


def to_item(image, labels):
    """(H, W, 3) uint8 image and (H, W) class map -> the (labels, (3, H, W) image) item."""
    image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()
    return torch.from_numpy(np.ascontiguousarray(labels)), image


def read_rgb(path):
    """Decode an image file to (H, W, 3) uint8, with a clear error for broken files."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"cannot decode image {path}: {exc}") from None


def load_npy(path, mmap=True):
    """np.load without pickles (memory-mapped by default), with a clear error."""
    try:
        # Without the .npy header np.load would try a pickle (and advise allow_pickle),
        # or hand back an NpzFile for a zip.
        with open(path, "rb") as f:
            if f.read(len(np.lib.format.MAGIC_PREFIX)) != np.lib.format.MAGIC_PREFIX:
                raise UserError(f"{path} is not a valid .npy array file (it lacks the NumPy .npy header)")
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
