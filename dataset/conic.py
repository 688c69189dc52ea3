"""CoNIC / Lizard (colon, 20x) in the CoNIC challenge release layout, memory-mapped.

Layout of a folder D:
    D/images.npy       (N, H, W, 3) uint8
    D/labels.npy       (N, H, W, 2) any integer dtype: [..., 0] instance id (0 = none),
                       [..., 1] class id 0 background, 1 neutrophil, 2 epithelial,
                       3 lymphocyte, 4 plasma, 5 eosinophil, 6 connective
    D/patch_info.csv   one column `patch_info`: the name of each patch, one row per patch
    D/counts.csv       nuclei per class (not needed here)

Source images: neighbouring patches of one source image are near-duplicates, so a
train/test split must keep each source image on one side. `patch_source(name)` is
the text of the patch name before the first "-" or "__": the CoNIC release names
patches like `consep_1-0000` (source `consep_1`) and lizard_128 like
`crag_10__64_960` (source `crag_10`, then the offset). A name with neither is its
own source.

Items follow dataset/common.py: (labels, image), a (H, W) uint8 class map and a
(3, H, W) uint8 image, with seeded joint augmentation for (index, seed) items.
"""
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dataset.common import (SeededAugmentation, check_overlap, joint_augmentation, load_npy, read_rgb, split_item,
                            to_item)
from dataset.masks import CONIC, CONIC_TO_PANNUKE, get_label_set, mark_edges
from utils import UserError, atomic_save_npy, atomic_save_text

FILES = ("images.npy", "labels.npy", "patch_info.csv")
LAYOUT = "the CoNIC release layout: images.npy, labels.npy, patch_info.csv (counts.csv optional)"
NUM_CONIC_CLASSES = CONIC.num_classes  # 7, background included
CLASSES_TEXT = ", ".join(f"{i} {n.lower()}" for i, n in enumerate(CONIC.class_names))
SAMPLE_ITEMS = 64      # items whose labels are checked at start-up without check_data
CHECK_CHUNK = 256      # items per read when checking all of labels.npy


def patch_source(name):
    """The source image of a patch: the name before the first '-' or '__' (see module doc)."""
    return re.split(r"-|__", str(name), maxsplit=1)[0]


def most_nuclei_first(classes, background=CONIC.background):
    """Indices of class maps (an (N, H, W) array or any sequence of (H, W) maps), the tile with the most
    nucleus (not `background`) pixels first, ties in order: grids show those, since many tiles are nearly empty."""
    counts = np.array([np.count_nonzero(np.asarray(c) != background) for c in classes], dtype=np.int64)
    return np.argsort(-counts, kind="stable")


def label_problems(labels):
    """Per-item problems of a (n, H, W, 2) integer labels block: a list with, for each
    item, None or a description of its first problem."""
    inst, cls = labels[..., 0], labels[..., 1]
    checks = [
        ((cls < 0) | (cls >= NUM_CONIC_CLASSES), None),   # message names the value, below
        (inst < 0, "a negative instance id"),
        ((inst > 0) & (cls == 0), "instance pixels (id > 0) with class 0 (background)"),
        ((cls > 0) & (inst == 0), "class pixels (class > 0) with instance id 0"),
    ]
    flags = [bad.reshape(len(bad), -1).any(1) for bad, _ in checks]
    out = []
    for n in range(len(labels)):
        problem = None
        for (bad, what), flag in zip(checks, flags):
            if flag[n]:
                if what is None:
                    value = int(cls[n][bad[n]][0])
                    what = f"class id {value} (expected 0..{NUM_CONIC_CLASSES - 1}: {CLASSES_TEXT})"
                problem = what
                break
        out.append(problem)
    return out


def check_labels(labels, path, indices):
    """UserError naming `path` and the first item in `indices` with inconsistent labels."""
    indices = np.asarray(indices)
    for start in range(0, len(indices), CHECK_CHUNK):
        chunk = indices[start:start + CHECK_CHUNK]
        if len(chunk) and chunk[-1] - chunk[0] == len(chunk) - 1:
            block = np.asarray(labels[chunk[0]:chunk[-1] + 1])   # contiguous: one slice read
        else:
            block = np.asarray(labels[chunk])
        for i, problem in zip(chunk, label_problems(block)):
            if problem:
                raise UserError(f"{path}: item {int(i)} has {problem}")


def read_names(path):
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if "patch_info" not in table.columns:
        raise UserError(f"{path}: expected a 'patch_info' column (one patch name per row), "
                        f"got columns {list(table.columns)}")
    return table["patch_info"].tolist()


def open_conic(data_dir, check_data=False):
    """Memory-map a CoNIC folder: (images, labels, names), checking files, shapes, dtypes
    and label values (of up to 64 evenly spaced items, or of all with check_data)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"CoNIC data directory not found: {data_dir} (expected {LAYOUT})")
    missing = [name for name in FILES if not (data_dir / name).is_file()]
    if missing:
        raise UserError(f"CoNIC data in {data_dir} is incomplete: missing {', '.join(missing)} (expected {LAYOUT})")
    paths = {name: data_dir / name for name in FILES}
    images, labels = load_npy(paths["images.npy"]), load_npy(paths["labels.npy"])
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise UserError(f"{paths['images.npy']}: expected a uint8 array of shape (N, H, W, 3), "
                        f"got {images.dtype} {images.shape}")
    if len(images) == 0:
        raise UserError(f"{paths['images.npy']}: holds no patches")
    if labels.ndim != 4 or labels.shape[-1] != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{paths['labels.npy']}: expected an integer array of shape (N, H, W, 2) "
                        f"([instance id, class id]), got {labels.dtype} {labels.shape}")
    if labels.shape[:3] != images.shape[:3]:
        raise UserError(f"{paths['labels.npy']}: shape {labels.shape} does not match images.npy "
                        f"{images.shape} (expected {images.shape[:3] + (2,)})")
    names = read_names(paths["patch_info.csv"])
    if len(names) != len(images):
        raise UserError(f"{paths['patch_info.csv']}: {len(names)} rows, but images.npy holds {len(images)} "
                        f"patches (expected one row per patch)")
    seen = {}
    for row, name in enumerate(names):
        if name in seen:   # split files refer to patches by name
            raise UserError(f"{paths['patch_info.csv']}: patch name {name!r} appears twice "
                            f"(rows {seen[name] + 1} and {row + 1})")
        seen[name] = row
    n = len(images)
    sample = np.arange(n) if check_data or n <= SAMPLE_ITEMS else np.unique(np.linspace(0, n - 1, SAMPLE_ITEMS).round())
    check_labels(labels, paths["labels.npy"], sample.astype(np.int64))
    return images, labels, names


def split_by_source(names, test_fraction=0.2, seed=0, source=patch_source):
    """(train_indices, test_indices) into `names`, whole source images (`source(name)`) to one side.

    Sources are visited in a seeded random order and each goes to test when that
    brings the test patch count closer to test_fraction of all patches, so test gets
    roughly that fraction (within half the largest source). Both sides are non-empty.
    """
    if not 0 < test_fraction < 1:
        raise UserError(f"test fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    groups = {}
    for i, name in enumerate(names):
        groups.setdefault(source(name), []).append(i)
    sources = sorted(groups)
    if len(sources) < 2:
        found = f"all come from {sources[0]!r}" if sources else "there are none"
        raise UserError(f"cannot split {len(names)} patches by source image: {found}; "
                        f"need at least 2 source images (or give a split file)")
    target = test_fraction * len(names)
    order = [sources[k] for k in np.random.default_rng(seed).permutation(len(sources))]
    test, count = [], 0
    for s in order:
        if count + len(groups[s]) / 2 <= target:
            test.append(s)
            count += len(groups[s])
    if not test:     # every source is larger than twice the target: take the closest in size
        test = [min(order, key=lambda s: abs(len(groups[s]) - target))]
    if len(test) == len(sources):
        test.pop()
    test = set(test)
    test_idx = sorted(i for s in test for i in groups[s])
    train_idx = sorted(i for s in sources if s not in test for i in groups[s])
    return np.array(train_idx, dtype=np.int64), np.array(test_idx, dtype=np.int64)


def write_split_file(path, names, train_idx, test_idx, column="patch_info"):
    """CSV `<column>,split` (train/test), one row per listed patch, in patch order."""
    split = {int(i): "train" for i in train_idx}
    both = [names[int(i)] for i in test_idx if int(i) in split]
    if both:
        raise ValueError(f"patch {both[0]!r} is on both sides of the split")
    split.update({int(i): "test" for i in test_idx})
    rows = sorted(split)
    table = pd.DataFrame({column: [names[i] for i in rows], "split": [split[i] for i in rows]})
    atomic_save_text(path, table.to_csv(index=False, lineterminator="\n"))


def read_split_file(path, names, column="patch_info", listed_in="patch_info.csv"):
    """(train_idx, test_idx) into `names` from a split file (columns `<column>,split`).
    Patches of `names` that the file does not list are on neither side; `listed_in`
    says where `names` come from, for the error about an unknown patch."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise UserError(f"cannot read split file {path}: {exc}") from None
    missing = [c for c in (column, "split") if c not in table.columns]
    if missing:
        raise UserError(f"split file {path}: missing column(s) {', '.join(missing)} "
                        f"(expected columns {column},split); got {list(table.columns)}")
    index = {name: i for i, name in enumerate(names)}
    sides = {"train": [], "test": []}
    seen = set()
    # Row r of the table is line r + 2 of the file (line 1 is the header).
    for r, (name, side) in enumerate(zip(table[column], table["split"])):
        where = f"split file {path}, line {r + 2}"
        if name not in index:
            raise UserError(f"{where}: unknown patch {name!r} (not in {listed_in})")
        if side not in sides:
            raise UserError(f"{where}: split {side!r} for patch {name!r} (expected 'train' or 'test')")
        if name in seen:
            raise UserError(f"{where}: patch {name!r} is listed twice")
        seen.add(name)
        sides[side].append(index[name])
    return (np.array(sorted(sides["train"]), dtype=np.int64), np.array(sorted(sides["test"]), dtype=np.int64))


def check_split_overlap(path, names, train_idx, test_idx, allow_overlap=False, source=patch_source):
    """A split file must keep each source image (`source(name)`) on one side: its patches are
    near-duplicates. With allow_overlap, one warning line instead of the UserError."""
    test_patch = {source(names[i]): names[i] for i in test_idx}
    both = [(names[i], test_patch[source(names[i])]) for i in train_idx if source(names[i]) in test_patch]
    if both:
        train_name, test_name = both[0]
        count = len({source(name) for name, _ in both})
        check_overlap(f"split file {path} puts {count} source image(s) on both sides, e.g. {source(train_name)!r} "
                      f"(train patch {train_name!r}, test patch {test_name!r})",
                      "each source image's patches all on one side", allow_overlap)


class CoNIC(torch.utils.data.Dataset):
    """The patches `indices` (all by default) of a CoNIC folder, memory-mapped.

    label_set "conic" keeps the 7 CoNIC classes; "pannuke" maps them through
    dataset.masks.CONIC_TO_PANNUKE. With `edges` the items' class maps carry the
    instance edges (dataset.masks.mark_edges). instances(i) and classes(i) give item i's raw
    instance and CoNIC class maps (numpy, never augmented).
    """

    def __init__(self, data_dir, indices=None, augment=False, label_set="conic", check_data=False, edges=False):
        self.data_dir, self.edges = Path(data_dir), edges
        self.images, self.labels, all_names = open_conic(data_dir, check_data=check_data)
        if indices is None:
            indices = np.arange(len(all_names))
        self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= len(all_names)):
            raise ValueError(f"indices must lie in 0..{len(all_names) - 1}")
        try:
            self.label_set = get_label_set(label_set)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if self.label_set.name not in ("conic", "pannuke"):
            raise UserError(f"CoNIC data cannot be read as label set {label_set!r}; use 'conic' or 'pannuke'")
        self.lut = CONIC_TO_PANNUKE if self.label_set.name == "pannuke" else np.arange(NUM_CONIC_CLASSES, dtype=np.uint8)
        self.all_names = all_names
        self.names = [all_names[i] for i in self.indices]
        self.sources = [patch_source(n) for n in self.names]
        self.tile_size = self.images.shape[1]
        if augment and self.images.shape[1] != self.images.shape[2]:
            raise UserError(f"{self.data_dir / 'images.npy'}: augmentation rotates by 90 degrees and needs square "
                            f"patches, got {self.images.shape[1]}x{self.images.shape[2]}")
        self.augment = SeededAugmentation(joint_augmentation()) if augment else None

    def __len__(self):
        return len(self.indices)

    def _raw_labels(self, index):
        i = int(self.indices[index])
        labels = np.asarray(self.labels[i])
        # Cheap next to decoding; catches a bad item outside the start-up sample.
        problem = label_problems(labels[None])[0]
        if problem:
            raise UserError(f"{self.data_dir / 'labels.npy'}: item {i} has {problem}")
        return labels

    def instances(self, index):
        """(H, W) int32 instance map of item `index` (0 = no nucleus)."""
        return self._raw_labels(index)[..., 0].astype(np.int32)

    def classes(self, index):
        """(H, W) uint8 CoNIC class map (0..6) of item `index`."""
        return self._raw_labels(index)[..., 1].astype(np.uint8)

    def __getitem__(self, item):
        index, seed = split_item(item)
        image = np.array(self.images[int(self.indices[index])])   # a copy: the memory map is read-only
        raw = self._raw_labels(index)
        labels = self.lut[raw[..., 1].astype(np.uint8)]
        if self.edges:
            labels = mark_edges(labels, raw[..., 0].astype(np.int32))
        if self.augment:
            image, labels = self.augment(image, labels, seed)
        return to_item(image, labels)


def build_conic(data_dir, split, seed=0, test_fraction=0.2, split_file=None, augment=False, label_set="conic",
                check_data=False, edges=False):
    """The `split` ("train" or "test") side of a CoNIC folder: from split_file when given,
    else split_by_source(names, test_fraction, seed)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    _, _, names = open_conic(data_dir, check_data=check_data)
    if split_file is not None:
        train_idx, test_idx = read_split_file(split_file, names)
        if not len(train_idx if split == "train" else test_idx):
            raise UserError(f"split file {split_file}: no {split} patches")
    else:
        train_idx, test_idx = split_by_source(names, test_fraction=test_fraction, seed=seed)
    # open_conic already checked the data (all of it with check_data): sample checks only here.
    return CoNIC(data_dir, train_idx if split == "train" else test_idx, augment=augment, label_set=label_set,
                 edges=edges)


def gan_datasets(cfg):
    """(training set, sample set) of a GAN run on a CoNIC folder (train_conic.py, the quality study): the
    split of cfg (its split file, or seeded by source image), written to OUT/split.csv by the first process;
    the sample grids show the test tiles with the most nucleus pixels (most_nuclei_first)."""
    split = dict(seed=cfg.seed, test_fraction=cfg.test_fraction, split_file=cfg.split_file, label_set=cfg.label_set,
                 edges=cfg.instance_edges)
    train_set = build_conic(cfg.data_dir, "train", augment=True, check_data=cfg.check_data, **split)
    test_set = build_conic(cfg.data_dir, "test", **split)
    if cfg.split_file is not None:
        check_split_overlap(cfg.split_file, train_set.all_names, train_set.indices, test_set.indices, cfg.allow_overlap)
    if int(os.environ.get("RANK", 0)) == 0:
        write_split_file(Path(cfg.out_dir) / "split.csv", train_set.all_names, train_set.indices, test_set.indices)
    shown = test_set.indices[most_nuclei_first(test_set.classes(i) for i in range(len(test_set)))]
    return train_set, CoNIC(cfg.data_dir, shown, label_set=cfg.label_set, edges=cfg.instance_edges)


def write_conic_folder(out_dir, images, labels, names, counts=None):
    """A CoNIC folder any CoNIC loader reads: images.npy (N, H, W, 3) uint8, labels.npy (N, H, W, 2)
    [instance id, class id], patch_info.csv naming the patches and, when `counts` (a table with a row per
    patch) is given, counts.csv."""
    out_dir = Path(out_dir)
    atomic_save_npy(images, out_dir / "images.npy")
    atomic_save_npy(labels, out_dir / "labels.npy")
    atomic_save_text(out_dir / "patch_info.csv", pd.DataFrame({"patch_info": names}).to_csv(index=False))
    if counts is not None:
        atomic_save_text(out_dir / "counts.csv", counts.to_csv(index=False))


def write_repainted_folder(dataset, image_paths, out_dir):
    """`dataset`'s patches as a CoNIC folder whose images are the files `image_paths` (one per item, e.g.
    synthetic PNGs), beside the items' rows of labels.npy, patch_info.csv and (when present) counts.csv."""
    images = np.stack([read_rgb(path) for path in image_paths]) if image_paths else np.zeros((0, 0, 0, 3), np.uint8)
    counts_path, counts = dataset.data_dir / "counts.csv", None
    if counts_path.is_file():
        table = pd.read_csv(counts_path)
        if len(table) == len(dataset.all_names):
            counts = table.iloc[dataset.indices]
    write_conic_folder(out_dir, images, np.asarray(dataset.labels[dataset.indices]), dataset.names, counts)
