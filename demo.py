"""The no-download demo's data: real H&E shipped in demo_assets/ (MIT, see its
LICENSE), written as a small PanNuke dataset in the official fold layout.

Two kinds of real tissue go in:
- three PanNuke colon patches with their real nucleus annotations
  (pannuke_patch{1,2,3}.npz: image and the 6-channel instance masks);
- three 40x H&E images without annotations (he_*.png), whose nuclei are found by
  colour deconvolution: the hematoxylin channel is thresholded (Otsu), cleaned,
  and touching nuclei are split by a watershed on the distance transform. Each
  nucleus gets a class from its shape, relative to the image's median nucleus:
  elongated -> Connective (spindle cells), small and round -> Inflammatory
  (lymphocytes), large -> Neoplastic, the rest -> Epithelial. Good enough for a
  generator to learn where nuclei go and what they look like.

Folds 1 and 2 (training) hold rotated 256-px crops of five images; fold 3 (the
sample grid) starts with the annotated patch 3, which training never sees, then
crops of the unannotated images.
"""
from pathlib import Path

import numpy as np

from dataset.masks import BACKGROUND, NUM_CLASSES
from dataset.pannuke import fold_paths
from utils import atomic_save_npy

ASSETS = Path(__file__).resolve().parent / "demo_assets"
UNANNOTATED = ("he_500.png", "he_512_1.png", "he_512_2.png")
ANNOTATED = ("pannuke_patch1.npz", "pannuke_patch2.npz", "pannuke_patch3.npz")
PATCHES_PER_FOLD = (16, 16, 8)
SIZE = 256
NEOPLASTIC, INFLAMMATORY, CONNECTIVE, EPITHELIAL = 0, 1, 2, 4


def nucleus_instances(image):
    """(H, W) instance map of the nuclei in an H&E image, by colour deconvolution."""
    from scipy import ndimage
    from skimage import color, filters, morphology, segmentation

    hema = filters.gaussian(color.rgb2hed(image)[..., 0], sigma=1.0)
    nuclei = hema > filters.threshold_otsu(hema)
    nuclei = morphology.remove_small_objects(ndimage.binary_fill_holes(ndimage.binary_opening(nuclei)), max_size=30)
    distance = ndimage.distance_transform_edt(nuclei)
    # One seed per local maximum of the distance transform splits touching nuclei.
    peaks = morphology.h_maxima(filters.gaussian(distance, sigma=1.5), 1.0)
    markers, _ = ndimage.label(peaks)
    return segmentation.watershed(-distance, markers, mask=nuclei)


def classify_nuclei(instances):
    """(H, W, 6) PanNuke-style mask: each instance in the class its shape suggests."""
    from skimage import measure

    regions = measure.regionprops(instances)
    median_area = np.median([r.area for r in regions]) if regions else 1.0
    mask = np.zeros(instances.shape + (NUM_CLASSES,), np.float64)
    for r in regions:
        if r.eccentricity > 0.9:
            cls = CONNECTIVE
        elif r.area < 0.6 * median_area and r.solidity > 0.9:
            cls = INFLAMMATORY
        elif r.area > 1.8 * median_area:
            cls = NEOPLASTIC
        else:
            cls = EPITHELIAL
        mask[r.coords[:, 0], r.coords[:, 1], cls] = r.label
    mask[..., BACKGROUND] = mask[..., :BACKGROUND].sum(-1) == 0
    return mask


def demo_tissue():
    """[(image uint8 (H, W, 3), mask float64 (H, W, 6))]: annotated patches first."""
    from PIL import Image

    tissue = []
    for name in ANNOTATED:
        with np.load(ASSETS / name, allow_pickle=False) as patch:
            mask = patch["mask"].astype(np.float64)
            tissue.append((patch["image"], mask))
    for name in UNANNOTATED:
        with Image.open(ASSETS / name) as im:
            image = np.asarray(im.convert("RGB"))
        tissue.append((image, classify_nuclei(nucleus_instances(image))))
    return tissue


def random_crop(image, mask, rng):
    y = rng.integers(0, image.shape[0] - SIZE + 1)
    x = rng.integers(0, image.shape[1] - SIZE + 1)
    turns = int(rng.integers(4))
    return (np.rot90(image[y:y + SIZE, x:x + SIZE], turns).astype(np.float64),
            np.rot90(mask[y:y + SIZE, x:x + SIZE], turns))


def write_demo_folds(root, patches_per_fold=PATCHES_PER_FOLD, seed=0):
    """Write the demo dataset under `root` in PanNuke's official fold layout."""
    rng = np.random.default_rng(seed)
    tissue = demo_tissue()
    held_out = tissue.pop(len(ANNOTATED) - 1)
    for k, count in enumerate(patches_per_fold, start=1):
        # The sample grid opens on real annotations held out of training.
        sources = tissue[len(ANNOTATED) - 1:] if k == 3 else tissue
        crops = [random_crop(*held_out, rng)] if k == 3 else []
        while len(crops) < count:
            crops.append(random_crop(*sources[len(crops) % len(sources)], rng))
        paths = fold_paths(root, k)
        atomic_save_npy(np.stack([image for image, _ in crops]), paths["images"])
        atomic_save_npy(np.stack([mask for _, mask in crops]), paths["masks"])
        atomic_save_npy(np.array(["Colon"] * count), paths["types"])
    return Path(root)
