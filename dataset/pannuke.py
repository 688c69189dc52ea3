"""PanNuke: the official fold release (memory-mapped) and the converted PNG layout.

Official layout (as unzipped from fold_1.zip ... fold_3.zip):
    D/Fold k/images/foldk/images.npy   (N, 256, 256, 3) float64, 0..255
    D/Fold k/images/foldk/types.npy    (N,) tissue names
    D/Fold k/masks/foldk/masks.npy     (N, 256, 256, 6) float64 (see dataset/masks.py)
Converted layout (the original project's):
    D/{train,test}/data/<name>.png  with  D/{train,test}/masks/<name>.npy of shape (H, W, 6)

Items are (labels, image): a (H, W) uint8 class map and a (3, H, W) uint8 image.
train_utils.prepare_batch turns them into the one-hot mask and a [-1, 1] image on
the training device, which keeps worker-to-GPU traffic small.
"""
from pathlib import Path

import numpy as np
import torch

from dataset.common import (SeededAugmentation, check_overlap, joint_augmentation, load_npy, read_rgb, split_item,
                            to_item)
from dataset.masks import NUM_CLASSES, PANNUKE, mark_edges, pannuke_to_instances, pannuke_to_labels
from utils import UserError

TISSUES = ("Adrenal_gland", "Bile-duct", "Bladder", "Breast", "Cervix", "Colon", "Esophagus", "HeadNeck",
           "Kidney", "Liver", "Lung", "Ovarian", "Pancreatic", "Prostate", "Skin", "Stomach", "Testis",
           "Thyroid", "Uterus")


def fold_paths(data_dir, k):
    root = Path(data_dir) / f"Fold {k}"
    return {"images": root / "images" / f"fold{k}" / "images.npy",
            "types": root / "images" / f"fold{k}" / "types.npy",
            "masks": root / "masks" / f"fold{k}" / "masks.npy"}


def open_fold(data_dir, k):
    """Memory-map one official fold, checking files, shapes and dtypes."""
    paths = fold_paths(data_dir, k)
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise UserError(f"PanNuke fold {k} is incomplete under {data_dir}: missing {', '.join(missing)} "
                        f"(expected the official layout 'Fold {k}/images/fold{k}/images.npy', "
                        f"'Fold {k}/images/fold{k}/types.npy', 'Fold {k}/masks/fold{k}/masks.npy')")
    images = load_npy(paths["images"])
    masks = load_npy(paths["masks"])
    types = load_npy(paths["types"], mmap=False)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(f"{paths['images']}: expected shape (N, H, W, 3), got {images.shape}")
    if masks.ndim != 4 or masks.shape[-1] != NUM_CLASSES:
        raise UserError(f"{paths['masks']}: expected shape (N, H, W, 6), got {masks.shape}")
    if masks.shape[:3] != images.shape[:3]:
        raise UserError(f"{paths['masks']}: shape {masks.shape} does not match images {images.shape}")
    if types.shape != (images.shape[0],):
        raise UserError(f"{paths['types']}: expected shape ({images.shape[0]},), got {types.shape}")
    for name, arr in (("images", images), ("masks", masks)):
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise UserError(f"{paths[name]}: expected a numeric array (float64 in the release), got dtype {arr.dtype}")
    if types.dtype.kind not in "US":
        raise UserError(f"{paths['types']}: expected tissue names (strings), got dtype {types.dtype}")
    return images, masks, types.astype(str)


SAMPLE_ITEMS = 16  # patches per fold whose values are checked at start-up (all with check_data)


def check_patch(image, mask, paths, i):
    """UserError naming the file and patch i when its values are unusable: NaN or infinite, images
    outside 0..255, negative mask ids. A min/max/finite check, cheap enough for every read."""
    if not np.isfinite(image).all() or image.min() < 0 or image.max() > 255:
        raise UserError(f"{paths['images']}: patch {i} has pixel values outside 0..255 (NaN, infinite or out of "
                        f"range); PanNuke images hold 0..255")
    if not np.isfinite(mask).all() or mask.min() < 0:
        raise UserError(f"{paths['masks']}: patch {i} has NaN, infinite or negative mask values; expected "
                        f"instance ids >= 0 and a 0/1 background channel")


def check_fold_values(images, masks, paths, indices):
    """Pixel and mask values of the patches `indices` (check_patch), and images not scaled to
    0..1, which would train on black. The error names the file and the first bad patch."""
    brightest = 0.0
    for i in indices:
        image = np.asarray(images[i])
        check_patch(image, np.asarray(masks[i]), paths, i)
        brightest = max(brightest, float(image.max()))
    if len(indices) and brightest <= 1.0:
        raise UserError(f"{paths['images']}: pixel values stay within 0..1 (at most {brightest:g} in the checked "
                        f"patches); PanNuke images hold 0..255: multiply by 255 first")


def sample_indices(keep, check_data):
    """The patches to check: all with check_data, else up to SAMPLE_ITEMS evenly spaced."""
    if check_data or len(keep) <= SAMPLE_ITEMS:
        return keep
    return keep[np.linspace(0, len(keep) - 1, SAMPLE_ITEMS).round().astype(int)]


def select_tissue(types, tissue, where):
    if tissue.lower() == "all":
        return np.arange(len(types))
    keep = np.flatnonzero(np.char.lower(types) == tissue.lower())
    if len(keep) == 0:
        found = sorted(set(types.tolist()))
        raise UserError(f"no patches of tissue {tissue!r} in {where}; tissues present: {', '.join(found)} "
                        f"(or 'all')")
    return keep


class PanNukeFolds(torch.utils.data.Dataset):
    """Patches of the chosen tissue from the chosen official folds, memory-mapped."""

    label_set = PANNUKE

    def __init__(self, data_dir, folds, tissue="Colon", augment=False, check_data=False, edges=False):
        self.edges = edges
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise UserError(f"PanNuke data directory not found: {data_dir}")
        self.folds, self.index, self.names = [], [], []
        for k in folds:
            images, masks, types = open_fold(data_dir, k)
            keep = select_tissue(types, tissue, f"{data_dir}/Fold {k}")
            paths = fold_paths(data_dir, k)
            if self.folds and images.shape[1:3] != self.folds[0][0].shape[1:3]:
                raise UserError(f"{paths['images']}: patches are {images.shape[2]} x {images.shape[1]} px, but fold "
                                f"{folds[0]}'s are {self.folds[0][0].shape[2]} x {self.folds[0][0].shape[1]}; "
                                f"all folds of a run must have one patch size")
            check_fold_values(images, masks, paths, sample_indices(keep, check_data))
            self.index += [(len(self.folds), int(i)) for i in keep]
            self.names += [f"fold{k}_{int(i):05d}" for i in keep]
            self.folds.append((images, masks, paths))
        self.augment = SeededAugmentation(joint_augmentation()) if augment else None

    def __len__(self):
        return len(self.index)

    def __getitem__(self, item):
        index, seed = split_item(item)
        fold, i = self.index[index]
        images, masks, paths = self.folds[fold]
        # The start-up check saw a sample only: a bad patch elsewhere must not be clipped silently.
        image, mask = np.asarray(images[i]), np.asarray(masks[i])
        check_patch(image, mask, paths, i)
        if image.max() <= 1.0:
            raise UserError(f"{paths['images']}: patch {i} holds pixel values within 0..1 (at most "
                            f"{float(image.max()):g}); PanNuke images hold 0..255: multiply by 255 first")
        image = image.astype(np.uint8)
        labels = mask_labels(mask, self.edges)
        if self.augment:
            image, labels = self.augment(image, labels, seed)
        return to_item(image, labels)


class PanNukeConverted(torch.utils.data.Dataset):
    """The converted layout: split/data/<name>.png with split/masks/<name>.npy (H, W, 6)."""

    label_set = PANNUKE

    def __init__(self, data_dir, split, augment=False, edges=False):
        self.edges = edges
        root = Path(data_dir) / split
        images_dir, masks_dir = root / "data", root / "masks"
        if not images_dir.is_dir() or not masks_dir.is_dir():
            raise UserError(f"converted PanNuke split not found: expected {images_dir} and {masks_dir}")
        self.images = sorted(images_dir.glob("*.png"))
        if not self.images:
            raise UserError(f"no PNG images in {images_dir}")
        missing = [str(masks_dir / (p.stem + ".npy")) for p in self.images if not (masks_dir / (p.stem + ".npy")).is_file()]
        if missing:
            raise UserError(f"{len(missing)} mask(s) missing in {masks_dir}, e.g. {missing[0]}")
        self.masks = [masks_dir / (p.stem + ".npy") for p in self.images]
        self.names = [p.stem for p in self.images]
        self.augment = SeededAugmentation(joint_augmentation()) if augment else None

    def __len__(self):
        return len(self.images)

    def __getitem__(self, item):
        index, seed = split_item(item)
        image = read_rgb(self.images[index])
        mask = load_npy(self.masks[index], mmap=False)
        if mask.ndim != 3 or mask.shape[2] != NUM_CLASSES or mask.shape[:2] != image.shape[:2]:
            raise UserError(f"{self.masks[index]}: expected shape {image.shape[:2] + (NUM_CLASSES,)} "
                            f"to match {self.images[index].name}, got {mask.shape}")
        if not np.isfinite(mask).all() or mask.min() < 0:
            raise UserError(f"{self.masks[index]}: NaN, infinite or negative mask values; expected instance ids "
                            f">= 0 and a 0/1 background channel")
        labels = mask_labels(mask, self.edges)
        if self.augment:
            image, labels = self.augment(image, labels, seed)
        return to_item(image, labels)


def mask_labels(mask, edges):
    """(H, W, 6) PanNuke mask -> the loaders' class map, its instance edges marked when `edges`."""
    labels = pannuke_to_labels(mask)
    return mark_edges(labels, pannuke_to_instances(mask)) if edges else labels


def is_converted_layout(data_dir):
    """Whether `data_dir` is read as the converted layout: train/data/ and no official 'Fold 1'."""
    return (Path(data_dir) / "train" / "data").is_dir() and not (Path(data_dir) / "Fold 1").exists()


def check_fold_overlap(data_dir, train_folds, test_folds, allow_overlap=False):
    """The training and test folds must differ (allow_overlap: warn instead); the converted layout's
    train/ and test/ ignore the folds."""
    shared = sorted(set(train_folds) & set(test_folds))
    if shared and not is_converted_layout(data_dir):
        check_overlap(f"--train-folds {' '.join(map(str, train_folds))} and --test-folds "
                      f"{' '.join(map(str, test_folds))} share fold {', '.join(map(str, shared))}",
                      "different folds on each side", allow_overlap)


def build_pannuke(data_dir, folds, tissue, augment, split, check_data=False, edges=False):
    """Official folds when present; the converted layout's `split` otherwise. With `edges` the class
    maps carry the instance edges (dataset.masks.mark_edges)."""
    if is_converted_layout(data_dir):
        return PanNukeConverted(data_dir, split, augment=augment, edges=edges)
    return PanNukeFolds(data_dir, folds, tissue=tissue, augment=augment, check_data=check_data, edges=edges)
