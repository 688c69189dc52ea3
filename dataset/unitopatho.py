"""UniToPatho (Barbano et al. 2021), official `800/` layout:

    D/train.csv, D/test.csv           one row per image (columns below)
    D/<top_label_name>/<image_id>     1812 x 1812 RGB PNGs at 0.4415 um/px

image_id values contain spaces, parentheses and commas; they are used as given.
Labels: top_label HP 0, NORM 1, TA.HG 2, TA.LG 3, TVA.HG 4, TVA.LG 5; type HP 0,
NORM 1, TA 2, TVA 3; grade LG 0, HG 1, and -1 for HP and NORM (no dysplasia).

The dataset exposes its rows (a DataFrame), image paths, targets and class names,
so the pix2pix pairs (dataset/unitopatho_mask.py), test.py, a classifier and a
mask-making script all read the split the same way.
"""
import copy
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from dataset.common import read_rgb
from utils import UserError

SPLITS = ("train", "test")
CLASSES = {
    "top_label": ("HP", "NORM", "TA.HG", "TA.LG", "TVA.HG", "TVA.LG"),
    "type": ("HP", "NORM", "TA", "TVA"),
    "grade": ("LG", "HG"),
}
REQUIRED_COLUMNS = ("image_id", "top_label_name", "top_label", "type_name", "type", "grade", "grade_name")
MAX_LISTED = 5  # missing files named in one error message


def read_split(data_dir, split):
    """The split's CSV as a DataFrame, checked for the columns this project reads."""
    if split not in SPLITS:
        raise UserError(f"unknown UniToPatho split {split!r}; expected one of {SPLITS}")
    data_dir = Path(data_dir)
    path = data_dir / f"{split}.csv"
    if not path.is_file():
        raise UserError(f"UniToPatho split file not found: {path} (expected the official '800' folder "
                        f"holding train.csv, test.csv and one folder per top_label_name)")
    try:
        rows = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    # The official CSVs start with an unnamed index column; it carries nothing.
    rows = rows.drop(columns=[c for c in rows.columns if str(c).startswith("Unnamed:")])
    missing = [c for c in REQUIRED_COLUMNS if c not in rows.columns]
    if missing:
        raise UserError(f"{path} lacks column(s) {', '.join(missing)}; found {', '.join(map(str, rows.columns))} "
                        f"(expected the official UniToPatho columns {', '.join(REQUIRED_COLUMNS)}, ...)")
    for column, names in CLASSES.items():
        codes = pd.to_numeric(rows[column], errors="coerce")
        low = -1 if column == "grade" else 0
        bad = codes.isna() | (codes < low) | (codes >= len(names))
        if bad.any():
            raise UserError(f"{path}: column {column!r} holds {rows[column][bad].iloc[0]} in {int(bad.sum())} "
                            f"row(s); expected integer codes {low}..{len(names) - 1}")
        rows[column] = codes.astype(np.int64)
    check_path_columns(rows, path)
    return rows.reset_index(drop=True)


def plain_file_name(name):
    """A name that stays in its folder when joined: no separator, not '.' or '..' (so never absolute)."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def check_path_columns(rows, path):
    """top_label_name and image_id become paths (D/<top_label_name>/<image_id>, and the same
    under output folders): only the six class folders and plain file names may pass, each
    image_id once, since masks are stored by image_id alone and one would overwrite another."""
    labels = CLASSES["top_label"]
    seen = {}
    for line, label, name in zip(range(2, len(rows) + 2), rows["top_label_name"], rows["image_id"]):  # 1: header
        if label not in labels:
            raise UserError(f"{path}, line {line}: top_label_name {label!r} is not one of {', '.join(labels)}")
        if not plain_file_name(name):
            raise UserError(f"{path}, line {line}: image_id {name!r} is not a plain file name (expected a name "
                            f"like 'x.png' with no '/', '\\', '..' or absolute path)")
        if name in seen:
            raise UserError(f"{path}: image_id {name!r} appears twice (lines {seen[name]} and {line}); "
                            f"expected each image once")
        seen[name] = line


def missing_files_error(paths, what, where):
    """One UserError listing how many files are missing and the first few of them."""
    listed = "\n  ".join(str(p) for p in paths[:MAX_LISTED])
    more = f"\n  ... and {len(paths) - MAX_LISTED} more" if len(paths) > MAX_LISTED else ""
    return UserError(f"{len(paths)} {what}(s) missing under {where}:\n  {listed}{more}")


class UniToPatho(torch.utils.data.Dataset):
    """One split of UniToPatho 800 as (image, target) items.

    target: 'top_label' (6 classes), 'type' (4) or 'grade' (2; -1 for HP/NORM rows,
    so pair it with grade_only=True to train a grade classifier). downsample: an
    integer factor applied at load time (box filter), e.g. 4 gives 453 x 453.
    Items are (transform(image) if a transform is given else a (3, H, W) uint8
    tensor, target int).
    """

    def __init__(self, data_dir, split="train", target="top_label", grade_only=False, downsample=1, transform=None):
        if target not in CLASSES:
            raise UserError(f"unknown UniToPatho target {target!r}; expected one of {', '.join(CLASSES)}")
        if int(downsample) < 1:
            raise UserError(f"downsample must be a positive integer factor, got {downsample}")
        self.data_dir, self.split, self.target = Path(data_dir), split, target
        self.downsample, self.transform = int(downsample), transform
        rows = read_split(self.data_dir, split)
        if grade_only:
            rows = rows[rows["grade"] >= 0].reset_index(drop=True)
        self._set_rows(rows)
        missing = [p for p in self.paths if not p.is_file()]
        if missing:
            raise missing_files_error(missing, "image", self.data_dir)

    def _set_rows(self, rows):
        self.rows = rows
        self.classes = CLASSES[self.target]
        self.targets = rows[self.target].to_numpy(np.int64)
        self.names = rows["image_id"].tolist()
        self.paths = [self.data_dir / label / name for label, name in zip(rows["top_label_name"], self.names)]

    def take(self, indices):
        """A view of the same split holding only `indices` (rows renumbered from 0)."""
        view = copy.copy(self)
        view._set_rows(self.rows.iloc[list(indices)].reset_index(drop=True))
        return view

    def class_interleaved_order(self):
        """Row indices cycling through the top labels (first of each, then second, ...)."""
        rank = self.rows.groupby("top_label_name", sort=False).cumcount()
        return rank.sort_values(kind="stable").index.tolist()

    def load_image(self, index):
        """(H, W, 3) uint8 at the dataset's downsampling."""
        image = read_rgb(self.paths[index])
        if self.downsample > 1:
            image = np.asarray(Image.fromarray(image).reduce(self.downsample))
        return image

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        image = self.load_image(index)
        if self.transform:
            return self.transform(image), int(self.targets[index])
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), int(self.targets[index])
