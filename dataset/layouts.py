"""New nucleus layouts made from real ones, for generating images from masks no real tile has.

A layout is a (class map, instance map) pair of (H, W) integer arrays: class ids with
`background` (0 in the CoNIC convention) where there is no nucleus, and instance ids
with 0 there. Valid layouts (what `check_layout` accepts and every function here
returns) have a nucleus pixel exactly where the instance map is > 0. elastic_deform
and new_layouts return each instance as one 4-connected component of one class, ids
1..K (then pasted ones above them), which is how lizard_128 labels its instances;
copy_nuclei keeps the input's instances as they are and gives pasted nuclei fresh ids
above every existing one.

    elastic_deform(classes, instances, rng)       warp both maps by one smooth random field
    copy_nuclei(classes, instances, donors, rng)  paste whole nuclei from other layouts
    new_layouts(class_maps, instance_maps, count) both, on randomly chosen sources

Returned instance maps are int32; class maps keep their dtype.
"""
import numpy as np
from scipy import ndimage

from utils import UserError


def check_layout(classes, instances, background=0, what="layout"):
    """(classes, instances) as numpy arrays, or a UserError saying what is wrong: both
    (H, W) integer maps of one shape, instance ids >= 0, and instance > 0 exactly where
    the class is not `background`."""
    classes, instances = np.asarray(classes), np.asarray(instances)
    if classes.ndim != 2 or classes.shape != instances.shape:
        raise UserError(f"{what}: class and instance maps must be (H, W) arrays of one shape, "
                        f"got {classes.shape} and {instances.shape}")
    for name, a in (("class", classes), ("instance", instances)):
        if not np.issubdtype(a.dtype, np.integer):
            raise UserError(f"{what}: the {name} map must hold integers, got {a.dtype}")
    if instances.size and instances.min() < 0:
        raise UserError(f"{what}: negative instance ids")
    disagree = int(((instances > 0) != (classes != background)).sum())
    if disagree:
        raise UserError(f"{what}: {disagree} pixels are nucleus in one map and background in the other "
                        f"(instance > 0 must be exactly class != {background})")
    return classes, instances


def relabel_instances(classes, instances, background=0):
    """int32 instance map in which every 4-connected piece of one class within one input
    instance is its own instance, numbered 1..K (by input id, then piece). Pixels of
    class `background` get 0."""
    classes, instances = np.asarray(classes), np.asarray(instances)
    out = np.zeros(classes.shape, dtype=np.int32)
    ids, compact = np.unique(np.where(classes != background, instances, 0), return_inverse=True)
    compact = compact.reshape(classes.shape)
    if ids[0] != 0:  # no background pixel: shift so that find_objects sees every id
        compact = compact + 1
    next_id = 1
    for i, box in enumerate(ndimage.find_objects(compact), start=1):
        if box is None:
            continue
        inside, cls = compact[box] == i, classes[box]
        for c in np.unique(cls[inside]):
            pieces, n = ndimage.label(inside & (cls == c))
            target = out[box]
            target[pieces > 0] = pieces[pieces > 0] + (next_id - 1)
            next_id += n
    return out


def _reflect(index, n):
    """Indices mirrored into [0, n) the way scipy's mode='reflect' does (d c b a | a b c d | d c b a)."""
    index = np.mod(index, 2 * n)
    return np.where(index >= n, 2 * n - 1 - index, index)


def _smooth_field(rng, shape, alpha, sigma):
    """Gaussian-filtered white noise scaled to an RMS of `alpha` pixels."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    std = field.std()
    return field * (alpha / std) if std > 0 else field


def _drop_crumbs(classes, pieces, source_ids, min_piece, background):
    """Clear pieces smaller than `min_piece` pixels that are not the largest piece of
    their source instance (crumbs torn off by nearest-neighbour sampling); renumber."""
    sizes = np.bincount(pieces.ravel())
    source = np.zeros(len(sizes), dtype=np.int64)
    source[pieces.ravel()] = source_ids.ravel()
    largest = {}
    for piece in np.argsort(-sizes[1:], kind="stable") + 1:
        largest.setdefault(int(source[piece]), int(piece))
    crumbs = [p for p in range(1, len(sizes)) if sizes[p] < min_piece and largest[int(source[p])] != p]
    if not crumbs:
        return classes, pieces
    drop = np.isin(pieces, crumbs)
    classes = np.where(drop, np.asarray(background, dtype=classes.dtype), classes)
    return classes, relabel_instances(classes, np.where(drop, 0, pieces), background)


def elastic_deform(classes, instances, rng, alpha=4.0, sigma=12.0, background=0, tries=5, min_piece=4):
    """Warp a layout by a smooth random displacement field (Simard et al. 2003).

    Each axis' displacement is white noise filtered by a Gaussian of std `sigma` pixels
    (the smoothness) and scaled to an RMS of `alpha` pixels (the strength); alpha/sigma
    well below 1 keeps nuclei from folding. Both maps are sampled at the displaced
    positions with nearest neighbour, reflecting at the borders, so class ids stay
    valid and the maps stay consistent. Instances are then relabelled 1..K, each
    4-connected piece its own instance (a nucleus torn in two, or mirrored in at a
    border, becomes two); pieces under `min_piece` pixels are cleared to background
    unless they are the largest piece of their nucleus (so no nucleus vanishes this way).

    Guarantee: every class present in the input is present in the output. A draw that
    loses one (a small nucleus skipped by the sampling, or pushed out of the tile) is
    redrawn, up to `tries` draws; if all lose one, the input itself is returned
    (relabelled). `rng`: a numpy Generator or a seed. Returns (classes, int32 instances).
    """
    classes, instances = check_layout(classes, instances, background)
    rng = np.random.default_rng(rng)
    h, w = classes.shape
    present = set(np.unique(classes).tolist())
    rows, cols = np.mgrid[:h, :w]
    warped = classes
    for _ in range(max(1, tries)):
        dy, dx = _smooth_field(rng, (h, w), alpha, sigma), _smooth_field(rng, (h, w), alpha, sigma)
        r = _reflect(np.rint(rows + dy).astype(np.int64), h)
        c = _reflect(np.rint(cols + dx).astype(np.int64), w)
        warped, warped_instances = classes[r, c], instances[r, c]
        if present <= set(np.unique(warped).tolist()):
            pieces = relabel_instances(warped, warped_instances, background)
            return _drop_crumbs(warped, pieces, warped_instances, min_piece, background)
    return classes.copy(), relabel_instances(classes, instances, background)


class NucleusBank:
    """Whole nuclei cut out of donor layouts: `classes[k]` and the boolean mask
    `masks[k]` of its bounding box. Nuclei that touch their donor tile's border are left
    out (they may be cut off). Build once, pass to copy_nuclei many times."""

    def __init__(self, donors, background=0):
        self.classes, self.masks = [], []
        for k, (donor_classes, donor_instances) in enumerate(donors):
            donor_classes, _ = check_layout(donor_classes, donor_instances, background, what=f"donor layout {k}")
            pieces = relabel_instances(donor_classes, donor_instances, background)
            h, w = pieces.shape
            for i, box in enumerate(ndimage.find_objects(pieces), start=1):
                if box is None or box[0].start == 0 or box[1].start == 0 or box[0].stop == h or box[1].stop == w:
                    continue
                mask = pieces[box] == i
                self.classes.append(int(donor_classes[box][mask][0]))
                self.masks.append(mask)
        self.classes = np.array(self.classes, dtype=np.int64)

    def __len__(self):
        return len(self.masks)

    def weights(self, class_weights=None):
        """Sampling probability of each nucleus: uniform, times class_weights[class] (default 1)."""
        w = np.ones(len(self), dtype=np.float64)
        for c, weight in (class_weights or {}).items():
            if not weight >= 0:
                raise UserError(f"class_weights: weight of class {c} must be >= 0, got {weight}")
            w[self.classes == c] = weight
        total = w.sum()
        return w / total if total > 0 else None


def copy_nuclei(classes, instances, donors, rng, count=5, class_weights=None, background=0, tries=10, gap=1):
    """Paste `count` whole nuclei from donor layouts into the background of a layout.

    donors: a list of (classes, instances) layouts or a NucleusBank. Each draw picks a
    nucleus (uniformly over all donor nuclei, times class_weights[class], so {1: 5.0}
    makes each class-1 nucleus five times as likely), rotates it by a random multiple of
    90 degrees and maybe mirrors it, and tries up to `tries` random positions where it
    lies fully inside the tile on background pixels at least `gap` pixels from any
    nucleus; a nucleus that fits nowhere tried is skipped. It keeps its class and gets a
    fresh id above every id in the layout.

    Guarantee: existing nuclei are untouched (so every class present before is present
    after), pasted ones never overlap or touch them. Returns (classes, int32 instances).
    """
    classes, instances = check_layout(classes, instances, background)
    bank = donors if isinstance(donors, NucleusBank) else NucleusBank(donors, background)
    rng = np.random.default_rng(rng)
    classes, instances = classes.copy(), instances.astype(np.int32)
    p = bank.weights(class_weights)
    if count <= 0 or p is None:
        return classes, instances
    h, w = classes.shape
    structure = np.ones((3, 3), dtype=bool)
    blocked = classes != background
    if gap > 0:
        blocked = ndimage.binary_dilation(blocked, structure, iterations=gap)
    next_id = int(instances.max(initial=0)) + 1
    for k in rng.choice(len(bank), size=count, p=p):
        mask = np.rot90(bank.masks[k], int(rng.integers(4)))
        if rng.random() < 0.5:
            mask = mask[:, ::-1]
        mh, mw = mask.shape
        if mh > h or mw > w:
            continue
        for _ in range(tries):
            y, x = int(rng.integers(h - mh + 1)), int(rng.integers(w - mw + 1))
            if blocked[y:y + mh, x:x + mw][mask].any():
                continue
            classes[y:y + mh, x:x + mw][mask] = bank.classes[k]
            instances[y:y + mh, x:x + mw][mask] = next_id
            next_id += 1
            # Block the pasted nucleus and its `gap` margin (clipped at the tile border).
            y0, x0, y1, x1 = max(0, y - gap), max(0, x - gap), min(h, y + mh + gap), min(w, x + mw + gap)
            padded = np.zeros((mh + 2 * gap, mw + 2 * gap), dtype=bool)
            padded[gap:gap + mh, gap:gap + mw] = mask
            if gap > 0:
                padded = ndimage.binary_dilation(padded, structure, iterations=gap)
            blocked[y0:y1, x0:x1] |= padded[y0 - (y - gap):y1 - (y - gap), x0 - (x - gap):x1 - (x - gap)]
            break
    return classes, instances


def new_layouts(class_maps, instance_maps, count, seed=0, elastic=True, copies=5, class_weights=None, background=0,
                alpha=4.0, sigma=12.0):
    """An iterator over `count` new (classes, int32 instances) layouts.

    Each is a source layout chosen at random (with replacement) from class_maps[i],
    instance_maps[i] ((N, H, W) arrays or sequences of (H, W) maps), elastically
    deformed (elastic_deform with alpha, sigma) when `elastic`, then given `copies`
    nuclei pasted from all the sources (copy_nuclei with class_weights). Every class
    of the chosen source is present in its new layout. The sources are checked, and
    the nucleus bank built, before this returns; layouts are made lazily, so
    list(new_layouts(...)) or a for loop. Deterministic for a seed."""
    if len(class_maps) != len(instance_maps):
        raise UserError(f"new_layouts: {len(class_maps)} class maps but {len(instance_maps)} instance maps")
    if len(class_maps) == 0:
        raise UserError("new_layouts: no source layouts")
    sources = [check_layout(c, i, background, what=f"source layout {k}")
               for k, (c, i) in enumerate(zip(class_maps, instance_maps))]
    bank = NucleusBank(sources, background) if copies > 0 else None

    def generate():
        rng = np.random.default_rng(seed)
        for _ in range(count):
            classes, instances = sources[int(rng.integers(len(sources)))]
            if elastic:
                classes, instances = elastic_deform(classes, instances, rng, alpha=alpha, sigma=sigma,
                                                    background=background)
            else:
                classes, instances = classes.copy(), relabel_instances(classes, instances, background)
            if bank is not None:
                classes, instances = copy_nuclei(classes, instances, bank, rng, count=copies,
                                                 class_weights=class_weights, background=background)
            yield classes, instances

    return generate()
