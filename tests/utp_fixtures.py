"""A small UniToPatho-format dataset built from the real split metadata.

Rows come from the real train.csv / test.csv in ../shared/data/unitopatho/800 (all
columns, the real file names with spaces, parentheses and commas); images are real
H&E from ../shared/data/he mirrored up to the requested size; masks are palette
PNGs whose nuclei are hematoxylin-rich blobs of those images. Also usable by
benchmarks: `make_utp_fixture(root, size=1812)` gives native-size images.
"""
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from dataset.masks import PALETTE

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
UTP_META = SHARED_DATA / "unitopatho" / "800"
HE_IMAGES = ("he_500.png", "he_512_1.png", "he_512_2.png", "torchstain_source.png", "torchstain_target.png",
             "unitopatho_target_448.jpg")


def shared_data_available():
    return (UTP_META / "train.csv").is_file() and (SHARED_DATA / "he" / HE_IMAGES[0]).is_file()


def he_image(size, rng):
    """A real H&E image mirrored out to (size, size, 3), randomly rolled and rotated."""
    with Image.open(SHARED_DATA / "he" / HE_IMAGES[rng.integers(len(HE_IMAGES))]) as im:
        tissue = np.asarray(im.convert("RGB"))
    h, w = tissue.shape[:2]
    reps = (-(-size // h) + 1, -(-size // w) + 1)
    # Alternate flips so the mirrored copies join without edges.
    rows = [tissue if i % 2 == 0 else tissue[::-1] for i in range(reps[0])]
    tall = np.concatenate(rows, axis=0)
    wide = np.concatenate([tall if j % 2 == 0 else tall[:, ::-1] for j in range(reps[1])], axis=1)
    y, x = rng.integers(0, h), rng.integers(0, w)
    return np.ascontiguousarray(np.rot90(wide[y:y + size, x:x + size], rng.integers(4)))


def nucleus_labels(image):
    """(H, W) class map: the darkest-hematoxylin blobs become nuclei of classes 0-4, rest background."""
    from scipy import ndimage
    from skimage.color import rgb2hed

    hema = rgb2hed(image)[..., 0]
    blobs, _ = ndimage.label(hema > np.percentile(hema, 85))
    labels = np.full(image.shape[:2], 5, np.uint8)
    labels[blobs > 0] = (blobs[blobs > 0] % 5).astype(np.uint8)
    return labels


def save_png(array, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, compress_level=1)  # fast: fixtures are written often


def make_utp_fixture(root, per_class=None, size=300, classes=None, seed=0):
    """Write root/800 (CSVs + images) and root/masks/{training,test}/masks.

    per_class: rows per top label and split, default {"train": 2, "test": 1};
    classes: top label names to include (default all six). Returns (data_dir, masks_dir).
    """
    per_class = per_class or {"train": 2, "test": 1}
    rng = np.random.default_rng(seed)
    data_dir, masks_dir = Path(root) / "800", Path(root) / "masks"
    for split, count in per_class.items():
        rows = pd.read_csv(UTP_META / f"{split}.csv", index_col=0)
        picked = [group.sample(count, random_state=seed) for name, group in rows.groupby("top_label_name", sort=False)
                  if classes is None or name in classes]
        picked = pd.concat(picked)
        data_dir.mkdir(parents=True, exist_ok=True)
        picked.to_csv(data_dir / f"{split}.csv")
        mask_folder = masks_dir / ("training" if split == "train" else "test") / "masks"
        for name, label in zip(picked["image_id"], picked["top_label_name"]):
            image = he_image(size, rng)
            save_png(image, data_dir / label / name)
            save_png(PALETTE[nucleus_labels(image)], mask_folder / name)
    return data_dir, masks_dir
