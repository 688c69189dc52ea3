"""Nucleus-class maps, their one-hot form, and the label sets with their palettes.

A label set is the list of classes a generator is conditioned on; it is part of a
run and stored in its checkpoint's model config: by name for the native sets, and
as its record (label_set_spec) for any other, such as a folder dataset's
classes.json, so such a checkpoint carries its classes with it. Two are native:
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


MAX_CLASSES = 256   # class maps are uint8
# With --instance-edges the loaders mark the pixels on a nucleus instance's edge (instance_edges) by
# setting this bit of the class map, so the edges travel with the classes through crops, flips and
# batching. Only label sets of at most EDGE_BIT classes can carry it (CoNIC's and PanNuke's can).
EDGE_BIT = 128


@dataclass(frozen=True, eq=False)
class LabelSet:
    name: str
    class_names: tuple
    palette: np.ndarray    # (num_classes, 3) uint8, in class order
    background: int        # the background's class index
    ids: tuple = None      # the value of each class in index masks; default: its index

    def __post_init__(self):
        if self.ids is None:
            object.__setattr__(self, "ids", tuple(range(len(self.class_names))))

    @property
    def num_classes(self):
        return len(self.class_names)

    @property
    def nucleus_classes(self):
        return [c for c in range(self.num_classes) if c != self.background]

    def record(self):
        """The classes as plain data (the classes.json format, see label_set_from_record)."""
        return {"name": self.name, "background": int(self.ids[self.background]),
                "classes": [{"id": int(i), "name": n, "colour": [int(v) for v in c]}
                            for i, n, c in zip(self.ids, self.class_names, self.palette)]}

    def same_classes(self, other):
        """The same classes in the same order (names, ids, colours, background); the set's name aside."""
        return (self.class_names == other.class_names and self.ids == other.ids
                and self.background == other.background and np.array_equal(self.palette, other.palette))

    def describe(self):
        """The set's name, then each class's id, name and colour on one line, background marked."""
        classes = ", ".join(f"{i} {n} #{bytes(map(int, c)).hex()}" + (" (background)" if k == self.background else "")
                            for k, (i, n, c) in enumerate(zip(self.ids, self.class_names, self.palette)))
        return f"{self.name} label set [{classes}]"


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


def get_label_set(spec):
    """The LabelSet a checkpoint or option names: a native set's name (a ValueError lists
    the known ones), or a record (label_set_from_record)."""
    if isinstance(spec, dict):
        return label_set_from_record(spec)
    try:
        return LABEL_SETS[spec]
    except KeyError:
        raise ValueError(f"unknown label set {spec!r}; known: {', '.join(LABEL_SETS)}") from None


def label_set_spec(label_set):
    """What a checkpoint records of a label set: the name of a native one, else its record."""
    return label_set.name if LABEL_SETS.get(label_set.name) is label_set else label_set.record()


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def label_set_from_record(record):
    """A LabelSet from its record, checked (a ValueError says what is wrong):

        {"name": "my-lab",                 (optional; default "folder")
         "background": 0,                  the id of the background class
         "classes": [{"id": 0, "name": "Background", "colour": [255, 255, 255]}, ...]}

    Class k of the generator's input is entry k; ids are the classes' values in index
    masks (0..65535), colours their colours in colour masks. Ids, names and colours are
    each unique."""
    if not isinstance(record, dict) or not isinstance(record.get("classes"), list):
        raise ValueError('expected an object with a "classes" list and a "background" id')
    classes = record["classes"]
    if not 2 <= len(classes) <= MAX_CLASSES:
        raise ValueError(f"expected 2 to {MAX_CLASSES} classes (background included), got {len(classes)}")
    for k, c in enumerate(classes):
        if not isinstance(c, dict) or not {"id", "name", "colour"} <= set(c):
            raise ValueError(f'classes[{k}]: expected an object with "id", "name" and "colour", got {c!r}')
        if not _is_int(c["id"]) or not 0 <= c["id"] <= 65535:
            raise ValueError(f"classes[{k}]: id must be an integer 0..65535, got {c['id']!r}")
        if not isinstance(c["name"], str) or not c["name"]:
            raise ValueError(f"classes[{k}]: name must be a non-empty string, got {c['name']!r}")
        colour = c["colour"]
        if not (isinstance(colour, list) and len(colour) == 3 and all(_is_int(v) and 0 <= v <= 255 for v in colour)):
            raise ValueError(f"classes[{k}] ({c['name']}): colour must be three integers 0..255, got {colour!r}")
    for key in ("id", "name", "colour"):
        values = [tuple(c[key]) if key == "colour" else c[key] for c in classes]
        twice = next((v for k, v in enumerate(values) if v in values[:k]), None)
        if twice is not None:
            raise ValueError(f"{key} {twice!r} is given to two classes")
    ids = tuple(c["id"] for c in classes)
    if record.get("background") not in ids or not _is_int(record["background"]):
        raise ValueError(f"background must be one of the class ids {list(ids)}, got {record.get('background')!r}")
    name = record.get("name", "folder")
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    return LabelSet(name, tuple(c["name"] for c in classes), np.array([c["colour"] for c in classes], np.uint8),
                    ids.index(record["background"]), ids)


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


def mark_edges(classes, instances):
    """(H, W) uint8 class map with EDGE_BIT set where instance_edges(instances) is 1."""
    return np.where(instance_edges(instances) > 0, classes | EDGE_BIT, classes).astype(np.uint8)


def class_ids(labels, num_classes):
    """A class map (numpy or torch) without the EDGE_BIT marks, for a label set of num_classes classes."""
    return labels & (EDGE_BIT - 1) if num_classes <= EDGE_BIT else labels


def labels_to_onehot(labels, num_classes=NUM_CLASSES, dtype=torch.float32, edges=False):
    """(..., H, W) integer class map tensor -> (..., num_classes, H, W) one-hot; with `edges`, one more
    channel, 1 on the pixels whose EDGE_BIT is set (the instance edges, pix2pixHD's edge map)."""
    labels = labels.long()
    onehot = torch.nn.functional.one_hot(class_ids(labels, num_classes), num_classes).movedim(-1, -3)
    if edges:
        onehot = torch.cat([onehot, (labels >= EDGE_BIT).long().unsqueeze(-3)], dim=-3)
    return onehot.to(dtype)


def labels_to_rgb(labels, labels_set=PANNUKE):
    """(H, W) class map -> (H, W, 3) uint8 palette image (for figures and mask PNGs)."""
    return labels_set.palette[class_ids(np.asarray(labels), labels_set.num_classes)]


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
