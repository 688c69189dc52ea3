"""dataset/layouts.py: elastic deformation, nucleus copying and new_layouts keep layouts
valid (maps agree, one class and one 4-connected piece per instance id), keep every
class of the source, and change the layout. On drawn disks always, and on real
lizard_128 tiles when they are present."""
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from dataset.layouts import NucleusBank, check_layout, copy_nuclei, elastic_deform, new_layouts, relabel_instances
from utils import UserError

LIZARD = Path(__file__).resolve().parents[2] / "shared" / "data" / "lizard_128"


# --------------------------------------------------------------------------- helpers

def disk_layout(seed, size=96, n=8, classes=(1, 2, 3, 4, 5, 6), margin=14, radius=(3, 6), background=0):
    """(classes uint8, instances uint16): n disks with ids 1..n, classes cycling through
    `classes` (all present when n >= len(classes)), at least 2 px apart, all at least
    `margin` px from the border."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    cls = np.full((size, size), background, dtype=np.uint8)
    ins = np.zeros((size, size), dtype=np.uint16)
    placed = 0
    while placed < n:
        r = int(rng.integers(radius[0], radius[1] + 1))
        cy, cx = rng.integers(margin + r, size - margin - r, size=2)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        if (ndimage.binary_dilation(disk, iterations=2) & (ins > 0)).any():
            continue
        cls[disk] = classes[placed % len(classes)]
        ins[disk] = placed + 1
        placed += 1
    return cls, ins


def assert_valid_layout(classes, instances, shape, background=0):
    """Shapes, maps agreeing pixel by pixel, and each instance id one class and one
    4-connected component."""
    classes, instances = np.asarray(classes), np.asarray(instances)
    assert classes.shape == shape and instances.shape == shape
    assert np.array_equal(instances > 0, classes != background), "class and instance maps disagree"
    boxes = ndimage.find_objects(instances.astype(np.int64))
    for i, box in enumerate(boxes, start=1):
        if box is None:
            continue
        inside = instances[box] == i
        assert len(np.unique(classes[box][inside])) == 1, f"instance {i} has several classes"
        assert ndimage.label(inside)[1] == 1, f"instance {i} is not one 4-connected component"


def present_classes(classes, background=0):
    return set(np.unique(classes).tolist()) - {background}


def instance_sizes(instances):
    return np.bincount(np.asarray(instances, dtype=np.int64).ravel())[1:]


@pytest.fixture(scope="module")
def lizard():
    """(classes, instances) of 60 seeded random lizard_128 tiles that hold nuclei."""
    if not (LIZARD / "labels.npy").is_file():
        pytest.skip(f"no lizard_128 data at {LIZARD}")
    labels = np.load(LIZARD / "labels.npy", mmap_mode="r")
    rng = np.random.default_rng(0)
    picked = []
    for i in rng.permutation(len(labels)):
        if labels[i, ..., 0].any():
            picked.append(i)
        if len(picked) == 60:
            break
    picked = np.sort(picked)
    return np.asarray(labels[picked, ..., 1]), np.asarray(labels[picked, ..., 0])


# --------------------------------------------------------------------------- the checks themselves

def test_validity_check_catches_broken_layouts():
    cls, ins = disk_layout(0)
    assert_valid_layout(cls, ins, cls.shape)
    two_pieces = ins.copy()
    assert cls[ins == 7][0] == cls[ins == 1][0]
    two_pieces[ins == 7] = 1  # one id, two disks of one class
    with pytest.raises(AssertionError, match="connected"):
        assert_valid_layout(cls, two_pieces, cls.shape)
    two_classes = cls.copy()
    two_classes[np.argwhere(ins == 1)[0][0], np.argwhere(ins == 1)[0][1]] = cls[ins == 2][0]
    with pytest.raises(AssertionError, match="several classes"):
        assert_valid_layout(two_classes, ins, cls.shape)
    unlabelled = ins.copy()
    unlabelled[ins == 3] = 0
    with pytest.raises(AssertionError, match="disagree"):
        assert_valid_layout(cls, unlabelled, cls.shape)


def test_check_layout_rejects_bad_input():
    cls, ins = disk_layout(1)
    with pytest.raises(UserError, match="one shape"):
        check_layout(cls, ins[:-1])
    with pytest.raises(UserError, match="integers"):
        check_layout(cls.astype(float), ins)
    broken = ins.copy()
    broken[ins == 1] = 0
    with pytest.raises(UserError, match=f"{int((ins == 1).sum())} pixels"):
        check_layout(cls, broken)
    check_layout(cls, ins)


def test_relabel_splits_pieces_and_numbers_consecutively():
    cls, ins = disk_layout(2, n=6)
    ids = ins.astype(np.int64)
    merged = np.where(ids > 0, 7 * (1 + (ids - 1) // 2), 0)  # ids 7, 14, 21 for three pairs of disks
    out = relabel_instances(cls, merged)
    assert sorted(np.unique(out).tolist()) == list(range(7))
    assert_valid_layout(cls, out, cls.shape)
    # Same partition as the original disks.
    pairs = set(zip(ins[ins > 0].tolist(), out[ins > 0].tolist()))
    assert len(pairs) == 6


# --------------------------------------------------------------------------- elastic_deform

@pytest.mark.parametrize("seed", range(8))
def test_elastic_on_disks_keeps_classes_nuclei_and_area(seed):
    cls, ins = disk_layout(seed)
    out_cls, out_ins = elastic_deform(cls, ins, np.random.default_rng(seed), alpha=3.0, sigma=12.0)
    assert_valid_layout(out_cls, out_ins, cls.shape)
    assert present_classes(out_cls) == present_classes(cls)
    assert not np.array_equal(out_cls, cls), "the layout did not change"
    assert out_ins.max() == ins.max(), "disks away from the border should neither vanish nor split"
    for c in present_classes(cls):
        ratio = (out_cls == c).sum() / (cls == c).sum()
        assert 0.6 < ratio < 1.6, (c, ratio)


def test_elastic_is_seeded_and_alpha_zero_is_identity():
    cls, ins = disk_layout(3)
    a = elastic_deform(cls, ins, 5)
    b = elastic_deform(cls, ins, 5)
    c = elastic_deform(cls, ins, 6)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    same_cls, same_ins = elastic_deform(cls, ins, 0, alpha=0.0)
    assert np.array_equal(same_cls, cls) and np.array_equal(same_ins, ins)


def test_elastic_never_loses_a_class_even_when_violent():
    """A 2-pixel eosinophil under a violent field is often skipped by the sampling;
    the guarantee (redraw, else return the input) keeps its class every time."""
    cls, ins = disk_layout(4, size=48, n=2, classes=(2, 3), margin=4)
    spot = np.argwhere(cls == 0)[0]
    cls[spot[0], spot[1]:spot[1] + 2], ins[spot[0], spot[1]:spot[1] + 2] = 5, 9
    check_layout(cls, ins)
    lost_without_retry = 0
    for seed in range(30):
        out_cls, out_ins = elastic_deform(cls, ins, seed, alpha=15.0, sigma=1.5, tries=3)
        assert present_classes(out_cls) == {2, 3, 5}
        assert_valid_layout(out_cls, out_ins, cls.shape)
        single, _ = elastic_deform(cls, ins, seed, alpha=15.0, sigma=1.5, tries=1)
        assert 5 in present_classes(single)
        lost_without_retry += np.array_equal(single, cls)  # the one draw lost it: the input came back
    assert lost_without_retry > 0, "the test field is not violent enough to exercise the guarantee"


def test_elastic_on_lizard_tiles(lizard):
    cls_maps, ins_maps = lizard
    rng = np.random.default_rng(0)
    changed = nuclei_before = nuclei_after = 0
    for cls, ins in zip(cls_maps, ins_maps):
        out_cls, out_ins = elastic_deform(cls, ins, rng)
        assert_valid_layout(out_cls, out_ins, cls.shape)
        assert present_classes(out_cls) == present_classes(cls)
        changed += not np.array_equal(out_cls, cls)
        nuclei_before += len(np.unique(ins)) - 1
        nuclei_after += int(out_ins.max())
    assert changed >= 0.9 * len(cls_maps)
    assert 0.85 < nuclei_after / nuclei_before < 1.15, (nuclei_before, nuclei_after)


# --------------------------------------------------------------------------- copy_nuclei

def test_copy_nuclei_pastes_whole_donor_nuclei_into_background_only():
    cls, ins = disk_layout(10, n=6, classes=(2, 3))
    donors = [disk_layout(s, n=6, classes=(1, 4, 5, 6)) for s in (11, 12)]
    donor_sizes = set(np.concatenate([instance_sizes(d[1]) for d in donors]).tolist())
    out_cls, out_ins = copy_nuclei(cls, ins, donors, np.random.default_rng(0), count=8)
    assert_valid_layout(out_cls, out_ins, cls.shape)
    old = ins > 0
    assert np.array_equal(out_cls[old], cls[old]) and np.array_equal(out_ins[old], ins[old])
    assert present_classes(cls) <= present_classes(out_cls)
    new = out_ins > ins.max()
    assert np.array_equal(new, out_ins != ins)
    new_ids = np.unique(out_ins[new])
    assert 4 <= len(new_ids) <= 8
    assert set(np.unique(out_cls[new]).tolist()) <= {1, 4, 5, 6}
    for i in new_ids:  # each a whole donor nucleus (rotation/mirroring keeps its size) ...
        assert int((out_ins == i).sum()) in donor_sizes
    # ... not touching the old ones.
    assert not (ndimage.binary_dilation(old, np.ones((3, 3), bool)) & new).any()


def test_copy_nuclei_class_weights_oversample_a_rare_class():
    rare = disk_layout(20, n=1, classes=(1,))
    common = [disk_layout(s, n=5, classes=(2,)) for s in range(21, 25)]  # 20 class-2 nuclei
    empty = (np.zeros((128, 128), np.uint8), np.zeros((128, 128), np.uint16))
    bank = NucleusBank([rare] + common)
    assert len(bank) == 21

    def rare_fraction(weights):
        out_cls, out_ins = copy_nuclei(*empty, bank, np.random.default_rng(1), count=40, class_weights=weights)
        classes = [int(out_cls[out_ins == i][0]) for i in range(1, out_ins.max() + 1)]
        assert len(classes) >= 20
        return classes.count(1) / len(classes)

    assert rare_fraction(None) < 0.2
    assert rare_fraction({1: 50.0}) > 0.5


def test_copy_nuclei_skips_what_cannot_be_whole_or_placed():
    cut = np.zeros((32, 32), np.uint8), np.zeros((32, 32), np.uint16)
    cut[0][0:4, 10:14], cut[1][0:4, 10:14] = 3, 1  # touches its tile's border: maybe cut off, not a donor
    assert len(NucleusBank([cut])) == 0
    cls, ins = disk_layout(30, size=64, n=4, margin=6)
    out = copy_nuclei(cls, ins, [cut], 0, count=5)
    assert np.array_equal(out[0], cls) and np.array_equal(out[1], ins)
    full = np.full((16, 16), 2, np.uint8), np.ones((16, 16), np.uint16)  # no background left
    out = copy_nuclei(*full, [disk_layout(31)], 0, count=5)
    assert np.array_equal(out[0], full[0]) and np.array_equal(out[1], full[1])


def test_copy_nuclei_on_lizard_keeps_every_class_and_old_nucleus(lizard):
    cls_maps, ins_maps = lizard
    bank = NucleusBank(zip(cls_maps, ins_maps))
    rng = np.random.default_rng(0)
    pasted = 0
    for cls, ins in zip(cls_maps, ins_maps):
        out_cls, out_ins = copy_nuclei(cls, ins, bank, rng, count=5, class_weights={1: 5.0, 5: 5.0})
        assert_valid_layout(out_cls, out_ins, cls.shape)
        assert present_classes(cls) <= present_classes(out_cls)
        old = ins > 0
        assert np.array_equal(out_cls[old], cls[old]) and np.array_equal(out_ins[old], ins[old])
        pasted += len(np.unique(out_ins[out_ins > ins.max()]))
    assert pasted >= 2 * len(cls_maps)


# --------------------------------------------------------------------------- new_layouts

def test_new_layouts_from_one_source_keep_its_classes():
    cls, ins = disk_layout(40, n=7)
    out = list(new_layouts([cls], [ins], 6, seed=0, copies=4))
    assert len(out) == 6
    for out_cls, out_ins in out:
        assert_valid_layout(out_cls, out_ins, cls.shape)
        assert present_classes(out_cls) == present_classes(cls)  # copies come from the same source's classes
        assert out_ins.max() > ins.max(), "no nucleus was pasted"
        assert not np.array_equal(out_cls, cls)
    again = list(new_layouts([cls], [ins], 6, seed=0, copies=4))
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(out, again))
    other = list(new_layouts([cls], [ins], 6, seed=1, copies=4))
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(out, other))


def test_new_layouts_checks_sources_eagerly():
    cls, ins = disk_layout(41)
    with pytest.raises(UserError, match="2 class maps but 1"):
        new_layouts([cls, cls], [ins], 3)
    with pytest.raises(UserError, match="source layout 0"):
        new_layouts([cls], [np.zeros_like(ins)], 3)


def test_new_layouts_on_lizard(lizard):
    cls_maps, ins_maps = lizard
    out = list(new_layouts(cls_maps, ins_maps, 40, seed=0, copies=6, class_weights={5: 10.0}))
    assert len(out) == 40
    sources = [present_classes(c) for c in cls_maps]
    for out_cls, out_ins in out:
        assert_valid_layout(out_cls, out_ins, cls_maps[0].shape)
        # Some source with no class outside this layout's (the deformed tile keeps all of its own).
        assert any(s <= present_classes(out_cls) for s in sources)
    eosinophil_tiles = sum(5 in present_classes(c) for c, _ in out)
    assert eosinophil_tiles > sum(5 in s for s in sources) / len(sources) * len(out)
