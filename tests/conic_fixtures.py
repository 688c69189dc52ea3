"""Tiny CoNIC data written with plain numpy/csv in the exact release layout, independently
of dataset/conic.py:

    <root>/images.npy      (N, H, W, 3) uint8
    <root>/labels.npy      (N, H, W, 2) uint16 = [instance id, class id 0-6]
    <root>/patch_info.csv  column patch_info: one patch name per row
    <root>/counts.csv      nuclei per class (neutrophil, ..., connective)

Nuclei are drawn disks, each with its own instance id and a class 1-6, so the two
label channels are consistent. The image colour of a pixel is CLASS_COLOURS[class]
(+ noise unless noise=0, when the image is an exact function of the class map).
"""
from pathlib import Path

import numpy as np

# Both naming styles: the CoNIC release's `<source>-<k>` and lizard_128's `<source>__<y>_<x>`.
# Sources: consep_1 (3), consep_2 (2), crag_10 (4), crag_7 (2), glas_3 (2), pannuke_4 (1).
NAMES = ["consep_1-0000", "consep_1-0001", "consep_1-0002", "crag_10__0_0", "crag_10__0_64", "consep_2-0000",
         "crag_10__64_0", "crag_10__64_64", "crag_7__0_0", "glas_3__0_0", "consep_2-0001", "crag_7__64_64",
         "glas_3__64_0", "pannuke_4-0000"]
SOURCES = ["consep_1", "consep_1", "consep_1", "crag_10", "crag_10", "consep_2", "crag_10", "crag_10", "crag_7",
           "glas_3", "consep_2", "crag_7", "glas_3", "pannuke_4"]
COUNT_COLUMNS = ["neutrophil", "epithelial", "lymphocyte", "plasma", "eosinophil", "connective"]

CLASS_COLOURS = np.array([
    (235, 200, 225),  # 0 background
    (200, 60, 40),    # 1 neutrophil
    (120, 50, 170),   # 2 epithelial
    (40, 20, 90),     # 3 lymphocyte
    (70, 110, 30),    # 4 plasma
    (230, 120, 20),   # 5 eosinophil
    (150, 70, 140),   # 6 connective
], dtype=np.uint8)


def write_conic(root, images, labels, names, counts=None):
    """Write the files exactly as given (no checks; any may be None = not written), so
    tests can write malformed data too. `names` is written as patch_info.csv."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if images is not None:
        np.save(root / "images.npy", images)
    if labels is not None:
        np.save(root / "labels.npy", labels)
    if names is not None:
        (root / "patch_info.csv").write_text("patch_info\n" + "".join(f"{n}\n" for n in names))
    if counts is not None:
        rows = [",".join(COUNT_COLUMNS)] + [",".join(str(int(v)) for v in row) for row in counts]
        (root / "counts.csv").write_text("\n".join(rows) + "\n")
    return root


def conic_patch(seed, size=32, n_nuclei=8, noise=6):
    """(image (H, W, 3) uint8, labels (H, W, 2) uint16, counts (6,)) of one patch.
    Every class 1-6 is drawn at least once when n_nuclei >= 6."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    labels = np.zeros((size, size, 2), dtype=np.uint16)
    counts = np.zeros(6, dtype=np.int64)
    for k in range(n_nuclei):
        cls = k % 6 + 1 if k < 6 else int(rng.integers(1, 7))
        r = int(rng.integers(2, max(3, size // 8) + 1))
        cy, cx = rng.integers(r, size - r, size=2)
        disk = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (labels[..., 0] == 0)  # no overlaps
        if disk.any():
            labels[disk] = (k + 1, cls)
            counts[cls - 1] += 1
    image = CLASS_COLOURS[labels[..., 1]].astype(np.int16)
    if noise:
        image = image + rng.integers(-noise, noise + 1, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), labels, counts


def make_conic(root, names=NAMES, size=32, n_nuclei=8, noise=6, seed=0):
    """A consistent CoNIC folder with one patch per name; returns (root, images, labels)."""
    patches = [conic_patch(seed * 1000 + i, size=size, n_nuclei=n_nuclei, noise=noise) for i in range(len(names))]
    images = np.stack([p[0] for p in patches])
    labels = np.stack([p[1] for p in patches])
    write_conic(root, images, labels, names, counts=np.stack([p[2] for p in patches]))
    return Path(root), images, labels
