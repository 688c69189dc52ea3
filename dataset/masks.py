"""Nucleus-class maps, their one-hot form, and the label sets with their palettes.

A label set is the list of classes a generator is conditioned on; it is part of a
run and stored in its checkpoint. Two are native:
- pannuke (PanNuke's mask channel order): 0 Neoplastic, 1 Inflammatory,
  2 Connective/Soft tissue, 3 Dead, 4 Epithelial, 5 Background;
- conic (CoNIC/Lizard class ids): 0 Background, 1 Neutrophil, 2 Epithelial,
  3 Lymphocyte, 4 Plasma, 5 Eosinophil, 6 Connective.
CONIC_TO_PANNUKE maps CoNIC class maps into the PanNuke set, so that a generator
trained on CoNIC data can read UniToPatho masks drawn in the PanNuke palette.
The module-level PanNuke constants below are the default label set.
"""
from dataclasses import dataclass

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


@dataclass(frozen=True)
class LabelSet:
    name: str
    class_names: tuple
    palette: np.ndarray    # (num_classes, 3) uint8, in class order
    background: int

    @property
    def num_classes(self):
        return len(self.class_names)

    @property
    def nucleus_classes(self):
        return [c for c in range(self.num_classes) if c != self.background]


PANNUKE = LabelSet("pannuke", CLASS_NAMES, PALETTE, BACKGROUND)
CONIC = LabelSet(
    "conic", ("Background", "Neutrophil", "Epithelial", "Lymphocyte", "Plasma", "Eosinophil", "Connective"),
    np.array([
        (255, 255, 255),  # Background: white, as in the PanNuke palette
        (255, 165, 0),    # Neutrophil: orange
        (0, 128, 0),      # Epithelial: green
        (255, 0, 0),      # Lymphocyte: red
        (0, 255, 255),    # Plasma: cyan
        (0, 0, 255),      # Eosinophil: blue
        (255, 255, 0),    # Connective: yellow
    ], dtype=np.uint8),
    background=0)
LABEL_SETS = {ls.name: ls for ls in (PANNUKE, CONIC)}

# CoNIC class id -> PanNuke class id. The five immune cell types are PanNuke's
# "Inflammatory"; Lizard does not tell neoplastic from normal epithelium, so its
# epithelial nuclei become "Epithelial".
CONIC_TO_PANNUKE = np.array([BACKGROUND, 1, 4, 1, 1, 1, 2], dtype=np.uint8)


def get_label_set(name):
    """The LabelSet called `name` (a ValueError lists the known ones)."""
    try:
        return LABEL_SETS[name]
    except KeyError:
        raise ValueError(f"unknown label set {name!r}; known: {', '.join(LABEL_SETS)}") from None


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


def pannuke_to_instances(mask):
    """(H, W, 6) PanNuke mask -> (H, W) int32 instance map (0 = no nucleus).

    Each class channel numbers its nuclei from 1, so channel c's ids are shifted past
    the largest id of the channels before it, making every nucleus's id unique. Where
    two channels overlap, the lower channel wins, as in pannuke_to_labels.
    """
    ids = np.asarray(mask)[..., :BACKGROUND].astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(ids.reshape(-1, BACKGROUND).max(0, initial=0))[:-1]])
    instances = np.zeros(ids.shape[:2], dtype=np.int32)
    for c in reversed(range(BACKGROUND)):
        nucleus = ids[..., c] > 0
        instances[nucleus] = ids[..., c][nucleus] + offsets[c]
    return instances


def instance_edges(instance_map):
    """(H, W) instance map (0 = no nucleus) -> (H, W) uint8 edge map (pix2pixHD's):
    1 where a 4-neighbour has another id, so one of the two is a nucleus. It outlines
    every nucleus, and marks both sides of the border between touching nuclei of one
    class, which the class map alone merges into one region."""
    ids = np.asarray(instance_map)
    if ids.ndim != 2:
        raise ValueError(f"expected an (H, W) instance map, got shape {ids.shape}")
    edges = np.zeros(ids.shape, dtype=bool)
    down = ids[1:, :] != ids[:-1, :]
    right = ids[:, 1:] != ids[:, :-1]
    edges[1:, :] |= down
    edges[:-1, :] |= down
    edges[:, 1:] |= right
    edges[:, :-1] |= right
    return edges.astype(np.uint8)


def labels_to_onehot(labels, num_classes=NUM_CLASSES, dtype=torch.float32):
    """(..., H, W) integer class map tensor -> (..., num_classes, H, W) one-hot."""
    onehot = torch.nn.functional.one_hot(labels.long(), num_classes)
    return onehot.movedim(-1, -3).to(dtype)


def labels_to_rgb(labels, labels_set=PANNUKE):
    """(H, W) class map -> (H, W, 3) uint8 palette image (for figures and mask PNGs)."""
    return labels_set.palette[np.asarray(labels)]


def rgb_to_labels(rgb, tolerance=40, source="mask", labels_set=PANNUKE):
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
    palette = labels_set.palette
    dist = np.abs(colours[:, None, :].astype(np.int16) - palette[None].astype(np.int16)).max(-1)
    nearest = dist.argmin(1)
    bad = dist[np.arange(len(colours)), nearest] > tolerance
    if bad.any():
        colour = tuple(int(v) for v in colours[bad][0])
        count = int(bad[inverse.ravel()].sum())
        raise ValueError(f"{source}: colour {colour} ({count} px) is not in the {labels_set.name} mask palette "
                         f"{[tuple(map(int, p)) for p in palette]} (tolerance {tolerance})")
    return nearest[inverse.ravel()].astype(np.uint8).reshape(rgb.shape[:2])
