"""A folder of image and mask files: the way a lab's own annotations usually come.

Layout of a folder D:
    D/images/NAME.png|.jpg|.jpeg|.tif|.tiff   H&E tiles, any size
    D/masks/NAME.png                           each image's class map, at the image's size
    D/classes.json                             (optional) the classes, see below
    D/instances/NAME.png|.npy                  (optional) instance maps, 0 = no nucleus
    D/split.csv                                (optional) columns name,split (train/test)
Images and masks are paired by NAME, whatever the image's extension. A folder of masks
alone (D/masks/NAME.png, or D/NAME.png when D has no masks/) is what test.py
--masks-only paints.

A mask is an index PNG (8- or 16-bit greyscale, pixel value = class id) or a colour
PNG (RGB, RGBA, or palette mode P, which is read by its colours) in the classes'
palette, colours within 40 of a palette colour snapping to it.

classes.json is a label set's record (dataset.masks.label_set_from_record):
    {"name": "my-lab", "background": 0,
     "classes": [{"id": 0, "name": "Background", "colour": [255, 255, 255]}, ...]}
Without it the classes are inferred from the masks (infer_classes).

Split: D/split.csv (or another file) lists tiles as train or test; else whole sources
go to one side, seeded (dataset.conic.split_by_source), a tile's source being
`tile_source(name)`.

Items follow dataset/common.py: (labels, image), a (H, W) uint8 class map and a
(3, H, W) uint8 image, cropped to a square of crop_size when one is given (a seeded
random crop, with the seeded flips and rotations of joint_augmentation, for training
items; the centre crop, unaugmented, for plain indices).
"""
import colorsys
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dataset.common import SeededAugmentation, joint_augmentation, load_npy, read_rgb, split_item, to_item
from dataset.conic import check_split_overlap, patch_source, read_split_file, split_by_source
from dataset.masks import LabelSet, label_set_from_record, rgb_to_labels
from utils import UserError, atomic_save_text

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
MASK_EXTENSIONS = (".png",)
INSTANCE_EXTENSIONS = (".png", ".npy")
INDEX_MODES = ("1", "L", "I", "I;16", "I;16B", "I;16L")
COLOUR_MODES = ("RGB", "RGBA", "P")
LAYOUT = "D/images/NAME.png|.jpg|.tif and D/masks/NAME.png"
MAX_LISTED = 5          # names listed in one error message
SAMPLE_ITEMS = 64       # masks whose values are checked at start-up without check_data
# Inferred classes beyond this are far more likely antialiased or JPEG-damaged colours than real classes.
MAX_INFERRED_CLASSES = 32
BACKGROUND_COLOUR = (255, 255, 255)


def tile_source(name):
    """The source image of a tile: the name before the first '-' or '__' (as for CoNIC,
    e.g. `crag_10__64_960` -> `crag_10`), else before the first '_' (`slide3_x512_y0`
    -> `slide3`), else the whole name."""
    source = patch_source(name)
    return source.split("_", 1)[0] if source == name else source


# --------------------------------------------------------------------------- files


def list_files(folder, extensions, what):
    """{NAME: path} of the files in `folder` with one of `extensions` (any case)."""
    found = {}
    for path in sorted(Path(folder).iterdir()):
        if not path.is_file() or path.suffix.lower() not in extensions:
            continue
        if path.stem in found:
            raise UserError(f"two {what} files for {path.stem!r}: {found[path.stem]} and {path} "
                            f"(keep one: {what}s are matched by name)")
        found[path.stem] = path
    return found


def listed(names):
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f", ... ({len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else "")


def pair_names(data_dir, images, masks):
    """The names with both an image and a mask, sorted; any name with only one is an error
    that lists them with their count."""
    without_mask = sorted(set(images) - set(masks))
    without_image = sorted(set(masks) - set(images))
    problems = []
    if without_mask:
        problems.append(f"{len(without_mask)} image(s) without a mask in masks/: {listed(without_mask)}")
    if without_image:
        problems.append(f"{len(without_image)} mask(s) without an image in images/: {listed(without_image)}")
    if problems:
        raise UserError(f"{data_dir}: " + "; ".join(problems) + " (each images/NAME.* needs masks/NAME.png)")
    return sorted(images)


def image_size(path, what="image"):
    """(height, width) from the file header, with a clear error for a broken file."""
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except (OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"cannot read {what} {path}: {exc}") from None


# --------------------------------------------------------------------------- masks and classes


def read_mask_pixels(path):
    """('index', (H, W) integer values) or ('colour', (H, W, 3) uint8) of a mask file."""
    try:
        with Image.open(path) as im:
            if im.mode in INDEX_MODES:
                return "index", np.array(im).astype(np.int64)
            if im.mode in COLOUR_MODES:
                return "colour", np.array(im.convert("RGB"))
            mode = im.mode
    except (OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"cannot decode mask {path}: {exc}") from None
    raise UserError(f"{path}: a {mode} image; expected an index mask (8- or 16-bit greyscale, value = class id) "
                    f"or a colour mask (RGB in the classes' palette)")


def read_mask(path, label_set):
    """(H, W) uint8 class map (class indices of `label_set`) of a mask file; a value or
    colour outside the classes is an error naming the file."""
    kind, pixels = read_mask_pixels(path)
    if kind == "colour":
        try:
            return rgb_to_labels(pixels, source=str(path), labels_set=label_set)
        except ValueError as exc:
            raise UserError(f"{exc} (a palette-mode PNG is read by its colours; save index masks as "
                            f"greyscale)") from None
    lut = np.full(max(label_set.ids) + 1, -1, np.int16)
    lut[list(label_set.ids)] = np.arange(label_set.num_classes)
    labels = np.where((pixels >= 0) & (pixels < len(lut)), lut[np.clip(pixels, 0, len(lut) - 1)], -1)
    bad = labels < 0
    if bad.any():
        value = int(pixels[bad][0])
        ids = ", ".join(f"{i} {n}" for i, n in zip(label_set.ids, label_set.class_names))
        raise UserError(f"{path}: value {value} ({int(bad.sum())} px) is not a class id of the {label_set.name} "
                        f"label set ({ids})")
    return labels.astype(np.uint8)


def read_classes(path):
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    try:
        return label_set_from_record(record)
    except ValueError as exc:
        raise UserError(f"{path}: {exc}") from None


def write_classes(path, label_set):
    """classes.json of `label_set`, one class a line (easy to edit)."""
    record = label_set.record()
    classes = ",\n".join(f"  {json.dumps(c)}" for c in record.pop("classes"))
    atomic_save_text(path, json.dumps(record)[:-1] + f', "classes": [\n{classes}\n]}}\n')


def distinct_colours(count):
    """`count` saturated colours, hues spread by the golden angle (none white)."""
    return [tuple(round(255 * v) for v in colorsys.hsv_to_rgb((k * 0.618034) % 1, 0.85, 0.9)) for k in range(count)]


def infer_classes(mask_paths, name):
    """The classes the masks hold, read from all of them: for index masks each value is a
    class (ids in rising order; background 0 when present, else the most common value),
    coloured by distinct_colours (background white); for colour masks each colour is a
    class (background white when present, else the most common colour; ids 0, 1, ... with
    the background first). Names: 'background' and 'class_<id>'."""
    kinds, counts = {}, {}
    for path in mask_paths:
        kind, pixels = read_mask_pixels(path)
        kinds.setdefault(kind, path)
        if len(kinds) > 1:
            raise UserError(f"{kinds['colour']} is a colour mask but {kinds['index']} an index mask: give a "
                            f"classes.json to read both kinds")
        if kind == "colour":
            flat = pixels.reshape(-1, 3).astype(np.int64)
            pixels = (flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]
        values, n = np.unique(pixels, return_counts=True)
        for v, c in zip(values.tolist(), n.tolist()):
            counts[v] = counts.get(v, 0) + c
        if len(counts) > MAX_INFERRED_CLASSES:
            raise UserError(f"masks up to {path} hold more than {MAX_INFERRED_CLASSES} distinct "
                            f"{'colours' if kind == 'colour' else 'values'} (antialiased or lossy masks?); "
                            f"give a classes.json, or masks of class ids")
    values = sorted(counts)
    if len(values) < 2:
        raise UserError(f"the masks ({mask_paths[0].parent}) hold only one value, {values}: nothing to condition on")
    if "colour" in kinds:
        white = (255 << 16) | (255 << 8) | 255
        background = white if white in counts else max(values, key=counts.get)
        values = [background] + [v for v in values if v != background]
        colours = [(v >> 16, (v >> 8) & 255, v & 255) for v in values]
        ids, names = list(range(len(values))), ["background"] + [f"class_{k}" for k in range(1, len(values))]
        background = 0
    else:
        background = 0 if 0 in counts else max(values, key=counts.get)
        others = iter(distinct_colours(len(values) - 1))
        colours = [BACKGROUND_COLOUR if v == background else next(others) for v in values]
        ids, names = values, ["background" if v == background else f"class_{v}" for v in values]
    if min(ids) < 0 or max(ids) > 65535:
        raise UserError(f"the masks in {mask_paths[0].parent} hold value {min(ids) if min(ids) < 0 else max(ids)}; "
                        f"class ids are 0..65535")
    return label_set_from_record({"name": name, "background": background,
                                  "classes": [{"id": int(i), "name": n, "colour": [int(v) for v in c]}
                                              for i, n, c in zip(ids, names, colours)]})


# --------------------------------------------------------------------------- the folder


@dataclass
class Folder:
    """A checked folder dataset: its tiles' names (sorted) and files, and its classes."""
    data_dir: Path
    names: list
    image_paths: list        # None for a folder of masks alone
    mask_paths: list
    instance_paths: dict     # NAME -> path, for the tiles that have one
    sizes: list              # (height, width) of each tile
    label_set: LabelSet
    classes_inferred: bool   # no classes.json: the classes were read from the masks


def choose_classes(data_dir, mask_paths, label_set):
    """(label set, inferred): `label_set` when given (a checkpoint's), which D/classes.json
    must then match; else D/classes.json; else inferred from the masks."""
    path = Path(data_dir) / "classes.json"
    if label_set is not None:
        if path.is_file():
            own = read_classes(path)
            if not own.same_classes(label_set):
                raise UserError(f"{path} gives the {own.describe()}, but the checkpoint is conditioned on the "
                                f"{label_set.describe()}")
        return label_set, False
    if path.is_file():
        return read_classes(path), False
    return infer_classes(mask_paths, Path(data_dir).resolve().name or "folder"), True


def open_folder(data_dir, label_set=None, masks_only=False, check_data=False):
    """Read and check a folder dataset (see the module doc): names paired, every mask at
    its image's size, the classes chosen (choose_classes) and the values of up to 64
    evenly spaced masks checked against them (of all with check_data)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"folder dataset not found: {data_dir} (expected {LAYOUT})")
    if masks_only:
        mask_dir = data_dir / "masks" if (data_dir / "masks").is_dir() else data_dir
        masks = list_files(mask_dir, MASK_EXTENSIONS, "mask")
        if not masks:
            raise UserError(f"{mask_dir} holds no mask PNGs (expected {mask_dir}/NAME.png)")
        names, image_paths = sorted(masks), None
    else:
        missing = [sub for sub in ("images", "masks") if not (data_dir / sub).is_dir()]
        if missing:
            raise UserError(f"{data_dir} has no {' or '.join(missing)} folder (expected {LAYOUT})")
        images = list_files(data_dir / "images", IMAGE_EXTENSIONS, "image")
        masks = list_files(data_dir / "masks", MASK_EXTENSIONS, "mask")
        if not images and not masks:
            raise UserError(f"{data_dir} holds no images and no masks (expected {LAYOUT})")
        names = pair_names(data_dir, images, masks)
        image_paths = [images[n] for n in names]
    mask_paths = [masks[n] for n in names]
    sizes = [image_size(p, "mask") for p in mask_paths]
    for i, path in enumerate(image_paths or []):
        size = image_size(path)
        if size != sizes[i]:
            raise UserError(f"{mask_paths[i]}: mask is {sizes[i][1]} x {sizes[i][0]} px but its image {path} is "
                            f"{size[1]} x {size[0]} px; masks must have their image's size")
    instance_dir = data_dir / "instances"
    instances = list_files(instance_dir, INSTANCE_EXTENSIONS, "instance map") if instance_dir.is_dir() else {}
    label_set, inferred = choose_classes(data_dir, mask_paths, label_set)
    if not inferred:  # inferring read every mask already
        n = len(names)
        sample = range(n) if check_data or n <= SAMPLE_ITEMS else np.unique(np.linspace(0, n - 1, SAMPLE_ITEMS).round())
        for i in sample:
            read_mask(mask_paths[int(i)], label_set)
    return Folder(data_dir, names, image_paths, mask_paths, instances, sizes, label_set, inferred)


def split_folder(folder, split_file=None, test_fraction=0.2, seed=0, allow_overlap=None):
    """(train_indices, test_indices) into folder.names: from split_file, else D/split.csv
    when present, else split_by_source(names, test_fraction, seed, tile_source). A training
    run passes allow_overlap (True or False) to have a split file checked for a source on both
    sides (dataset.conic.check_split_overlap)."""
    if split_file is None and (folder.data_dir / "split.csv").is_file():
        split_file = folder.data_dir / "split.csv"
    if split_file is None:
        return split_by_source(folder.names, test_fraction=test_fraction, seed=seed, source=tile_source)
    train_idx, test_idx = read_split_file(split_file, folder.names, column="name", listed_in=f"{folder.data_dir}/masks")
    if allow_overlap is not None:
        check_split_overlap(split_file, folder.names, train_idx, test_idx, allow_overlap, source=tile_source)
    return train_idx, test_idx


class FolderTiles(torch.utils.data.Dataset):
    """The tiles `indices` (all by default) of a Folder as (labels, image) items, whole,
    or square crops of crop_size (see the module doc). A folder of masks alone has no
    items; classes(i) and instances(i) give a tile's whole class and instance maps."""

    def __init__(self, folder, indices=None, crop_size=None, augment=False):
        if augment and crop_size is None:
            raise ValueError("augmentation rotates by 90 degrees: it needs square crops (crop_size)")
        self.folder, self.crop_size, self.label_set = folder, crop_size, folder.label_set
        self.indices = np.arange(len(folder.names)) if indices is None else np.asarray(indices, np.int64).reshape(-1)
        self.names = [folder.names[i] for i in self.indices]
        if crop_size is not None:
            for i in self.indices:
                (h, w), path = folder.sizes[i], (folder.image_paths or folder.mask_paths)[i]
                if min(h, w) < crop_size:
                    raise UserError(f"{path} is {w} x {h} px, smaller than --crop-size {crop_size}: give a smaller "
                                    f"--crop-size, or leave out such tiles")
        self.augment = SeededAugmentation(joint_augmentation()) if augment else None

    def __len__(self):
        return len(self.indices)

    def mask_path(self, index):
        return self.folder.mask_paths[self.indices[index]]

    def instance_path(self, index):
        """The tile's instance map file, or None."""
        return self.folder.instance_paths.get(self.names[index])

    def classes(self, index):
        """(H, W) uint8 class map of tile `index`, whole and unaugmented."""
        return read_mask(self.mask_path(index), self.label_set)

    def image(self, index):
        """(H, W, 3) uint8 image of tile `index`, whole and unaugmented."""
        if self.folder.image_paths is None:
            raise ValueError("a folder of masks alone has no images")
        path = self.folder.image_paths[self.indices[index]]
        image = read_rgb(path)
        h, w = self.folder.sizes[self.indices[index]]
        if image.shape[:2] != (h, w):  # the file changed since open_folder checked it
            raise UserError(f"{path}: image is {image.shape[1]} x {image.shape[0]} px but its mask "
                            f"{self.mask_path(index)} is {w} x {h} px; masks must have their image's size")
        return image

    def instances(self, index):
        """(H, W) int32 instance map of tile `index` (0 = no nucleus)."""
        path = self.instance_path(index)
        if path is None:
            raise UserError(f"no instance map for {self.names[index]!r} in {self.folder.data_dir / 'instances'} "
                            f"(expected NAME.png or NAME.npy)")
        if path.suffix.lower() == ".npy":
            instances = load_npy(path, mmap=False)
        else:
            kind, instances = read_mask_pixels(path)
            if kind != "index":
                raise UserError(f"{path}: an instance map must be a greyscale PNG of instance ids")
        size = tuple(self.folder.sizes[self.indices[index]])
        if instances.shape != size or not np.issubdtype(instances.dtype, np.integer):
            raise UserError(f"{path}: expected an integer map of its mask's shape {size}, "
                            f"got {instances.dtype} {instances.shape}")
        return instances.astype(np.int32)

    def __getitem__(self, item):
        index, seed = split_item(item)
        image, labels = self.image(index), self.classes(index)
        if self.crop_size is not None:
            h, w, s = *labels.shape, self.crop_size
            if seed is None:
                y, x = (h - s) // 2, (w - s) // 2
            else:  # a child of the seed, so the position does not follow the flips and rotations
                rng = np.random.default_rng(np.random.SeedSequence(int(seed)).spawn(1)[0])
                y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
            image, labels = image[y:y + s, x:x + s], labels[y:y + s, x:x + s]
        if self.augment:
            image, labels = self.augment(np.ascontiguousarray(image), np.ascontiguousarray(labels), seed)
        return to_item(image, labels)

