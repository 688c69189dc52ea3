"""Nucleus-class maps, their 6-channel one-hot form, and the PanNuke palette.

Class order (= PanNuke mask channel order): 0 Neoplastic, 1 Inflammatory,
2 Connective/Soft tissue, 3 Dead, 4 Epithelial, 5 Background.
"""
import numpy as np
import torch

CLASS_NAMES = ("Neoplastic", "Inflammatory", "Connective", "Dead", "Epithelial", "Background")
NUM_CLASSES = len(CLASS_NAMES)
BACKGROUND = 5

# The original project's palette: matplotlib 'b','g','r','c','m','w' in label order.
PALETTE = np.array([
    (0, 0, 255),      # b  Neoplastic
    (0, 128, 0),      # g  Inflammatory
    (255, 0, 0),      # r  Connective
    (0, 191, 191),    # c  Dead
    (191, 0, 191),    # m  Epithelial
    (255, 255, 255),  # w  Background
], dtype=np.uint8)


def pannuke_to_labels(mask):
    """(H, W, 6) PanNuke mask -> (H, W) uint8 class map.

    Channels 0-4 are instance-id maps (0 = no nucleus); channel 5 is the binary
    background map and is not needed: every pixel without a nucleus is background,
    which also covers the all-zero patches in the official folds. Where a pixel is
    set in two class channels, the lower channel index wins (Neoplastic first).
    """
    mask = np.asarray(mask)
    labels = np.full(mask.shape[:2], BACKGROUND, dtype=np.uint8)
    for c in reversed(range(BACKGROUND)):
        labels[mask[..., c] > 0] = c
    return labels


def labels_to_onehot(labels, dtype=torch.float32):
    """(..., H, W) integer class map tensor -> (..., 6, H, W) one-hot."""
    onehot = torch.nn.functional.one_hot(labels.long(), NUM_CLASSES)
    return onehot.movedim(-1, -3).to(dtype)


def labels_to_rgb(labels):
    """(H, W) class map -> (H, W, 3) uint8 palette image (for figures and mask PNGs)."""
    return PALETTE[np.asarray(labels)]


def rgb_to_labels(rgb, tolerance=40, source="mask"):
    """(H, W, 3) palette image -> (H, W) class map.

    Colours within `tolerance` (max abs difference per channel) of a palette colour
    snap to it, absorbing compression noise; anything further is rejected with a
    ValueError naming `source` and the first offending colour.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"{source}: expected an RGB image of shape (H, W, 3), got {rgb.shape}")
    # Work on unique colours: masks have few, so this stays cheap at 1812 x 1812.
    # Packing RGB into one uint32 makes np.unique ~20x faster than unique rows (axis=0).
    flat = rgb.reshape(-1, 3).astype(np.uint32)
    packed, inverse = np.unique((flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2], return_inverse=True)
    colours = np.stack([packed >> 16, (packed >> 8) & 255, packed & 255], axis=1)
    dist = np.abs(colours[:, None, :].astype(np.int16) - PALETTE[None].astype(np.int16)).max(-1)
    nearest = dist.argmin(1)
    bad = dist[np.arange(len(colours)), nearest] > tolerance
    if bad.any():
        colour = tuple(int(v) for v in colours[bad][0])
        count = int(bad[inverse.ravel()].sum())
        raise ValueError(f"{source}: colour {colour} ({count} px) is not in the mask palette "
                         f"{[tuple(map(int, p)) for p in PALETTE]} (tolerance {tolerance})")
    return nearest[inverse.ravel()].astype(np.uint8).reshape(rgb.shape[:2])
