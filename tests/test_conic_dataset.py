"""CoNIC release layout: loading, items, source-image splits, split files, augmentation,
the PanNuke mapping, and one-line errors for malformed data (dataset/conic.py)."""

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, assert_augmentation_keeps_alignment
from conic_fixtures import CLASS_COLOURS, NAMES, SOURCES, conic_patch, make_conic, write_conic

from dataset.conic import CoNIC, build_conic, open_conic, patch_source, read_split_file, split_by_source, write_split_file
from dataset.masks import CONIC, CONIC_TO_PANNUKE, PANNUKE
from utils import UserError

LIZARD = SHARED_DATA / "lizard_128"


@pytest.fixture(scope="module")
def conic(tmp_path_factory):
    """(root, images, labels) of the default tiny CoNIC folder (14 patches, 6 sources, 32 px).
    Shared by the module: do not change the files."""
    return make_conic(tmp_path_factory.mktemp("conic"))


@pytest.fixture(scope="module")
def lizard():
    if not all((LIZARD / f).is_file() for f in ("images.npy", "labels.npy", "patch_info.csv")):
        pytest.skip(f"real Lizard tiles not found at {LIZARD}")
    return LIZARD


def one_line_error(info, filename):
    msg = str(info.value)
    assert filename in msg, msg
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------- names and sources

@pytest.mark.parametrize("name, source", [
    ("consep_1-0000", "consep_1"), ("crag_10__64_960", "crag_10"), ("glas_3__0_0", "glas_3"),
    ("a__b-c", "a"), ("a-b__c", "a"), ("pannuke_4", "pannuke_4")])
def test_patch_source(name, source):
    assert patch_source(name) == source


def test_fixture_sources_match_patch_source():
    assert [patch_source(n) for n in NAMES] == SOURCES


# --------------------------------------------------------------------------- items

def test_items_match_the_files(conic):
    root, images, labels = conic
    ds = CoNIC(root)
    assert len(ds) == len(NAMES) and ds.names == NAMES and ds.sources == SOURCES
    assert ds.tile_size == 32 and ds.label_set is CONIC
    for i in range(len(ds)):
        lab, img = ds[i]
        assert lab.dtype == torch.uint8 and lab.shape == (32, 32)
        assert img.dtype == torch.uint8 and img.shape == (3, 32, 32)
        assert np.array_equal(img.permute(1, 2, 0).numpy(), images[i])
        assert np.array_equal(lab.numpy(), labels[i, ..., 1])
        inst = ds.instances(i)
        assert inst.dtype == np.int32 and inst.shape == (32, 32)
        assert np.array_equal(inst, labels[i, ..., 0])
        cls = ds.classes(i)
        assert cls.dtype == np.uint8 and np.array_equal(cls, labels[i, ..., 1])
    assert len(np.unique(labels[..., 1])) == 7   # the fixture draws every class


def test_indices_select_items_and_names(conic):
    root, images, labels = conic
    ds = CoNIC(root, indices=[5, 0, 13])
    assert ds.names == [NAMES[5], NAMES[0], NAMES[13]]
    assert ds.sources == ["consep_2", "consep_1", "pannuke_4"]
    lab, img = ds[2]
    assert np.array_equal(img.permute(1, 2, 0).numpy(), images[13])
    assert np.array_equal(ds.instances(0), labels[5, ..., 0])


def test_plain_index_equals_index_seed_pair_without_augmentation(conic):
    ds = CoNIC(conic[0])
    a, b = ds[3], ds[(3, 777)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_pannuke_mapping(conic):
    root, _, labels = conic
    ds = CoNIC(root, label_set="pannuke")
    assert ds.label_set is PANNUKE
    for i in range(len(ds)):
        lab, _ = ds[i]
        assert lab.dtype == torch.uint8
        assert np.array_equal(lab.numpy(), CONIC_TO_PANNUKE[labels[i, ..., 1]])
        assert np.array_equal(ds.classes(i), labels[i, ..., 1])   # raw classes stay CoNIC
    lab = ds[0][0].numpy()
    raw = labels[0, ..., 1]
    assert (lab[raw == 0] == PANNUKE.background).all()
    assert (lab[raw == 2] == PANNUKE.class_names.index("Epithelial")).all()
    assert (lab[raw == 3] == PANNUKE.class_names.index("Inflammatory")).all()
    assert (lab[raw == 6] == PANNUKE.class_names.index("Connective")).all()


def test_unknown_label_set(conic):
    with pytest.raises(UserError, match="label set"):
        CoNIC(conic[0], label_set="lizard")


# --------------------------------------------------------------------------- augmentation

def test_augmentation_moves_image_and_labels_together(tmp_path):
    root, _, _ = make_conic(tmp_path, names=["a-0", "b-0"], size=32, n_nuclei=10, noise=0)
    colours = torch.from_numpy(CLASS_COLOURS)
    plain, aug = CoNIC(root), CoNIC(root, augment=True)
    for index in range(2):
        labels0 = assert_augmentation_keeps_alignment(plain, aug, index, colours, 32)
        assert torch.equal(aug[index][0], labels0)   # no seed, no augmentation
        assert np.array_equal(aug.instances(index), plain.instances(index))   # never augmented


# --------------------------------------------------------------------------- splits

def _check_split(sources, train, test):
    """Both sides non-empty, disjoint, covering everything, no source on both sides;
    `sources` is the known source of each patch (not from patch_source)."""
    assert len(train) and len(test)
    assert not set(train.tolist()) & set(test.tolist())
    assert sorted(train.tolist() + test.tolist()) == list(range(len(sources)))
    train_sources = {sources[i] for i in train}
    test_sources = {sources[i] for i in test}
    assert not train_sources & test_sources, f"on both sides: {train_sources & test_sources}"


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5, 0.9])
def test_split_keeps_sources_on_one_side(fraction):
    for seed in range(10):
        train, test = split_by_source(NAMES, test_fraction=fraction, seed=seed)
        assert train.dtype == np.int64 and test.dtype == np.int64
        _check_split(SOURCES, train, test)


def test_split_is_seeded():
    a = split_by_source(NAMES, seed=3)
    b = split_by_source(NAMES, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    outcomes = {tuple(split_by_source(NAMES, seed=s)[1].tolist()) for s in range(10)}
    assert len(outcomes) >= 3


def test_split_fraction_is_roughly_kept():
    # 40 sources of 5 patches: test should be close to the fraction.
    names = [f"src_{s}__{k}_0" for s in range(40) for k in range(5)]
    sources = [f"src_{s}" for s in range(40) for k in range(5)]
    for fraction in (0.1, 0.25, 0.5):
        for seed in range(5):
            train, test = split_by_source(names, test_fraction=fraction, seed=seed)
            _check_split(sources, train, test)
            assert abs(len(test) / len(names) - fraction) <= 0.0125 + 1e-9


def test_split_needs_two_sources():
    with pytest.raises(UserError, match="source"):
        split_by_source(["crag_1__0_0", "crag_1__0_64", "crag_1__64_0"])
    train, test = split_by_source(["crag_1__0_0", "crag_2__0_0"], test_fraction=0.2)
    assert len(train) == 1 and len(test) == 1
    with pytest.raises(UserError, match="fraction"):
        split_by_source(NAMES, test_fraction=1.0)


def test_real_lizard_split_keeps_sources_apart(lizard):
    _, _, names = open_conic(lizard, check_data=True)   # the real data passes the full check
    assert len(names) == 1045
    for seed in range(5):
        train, test = split_by_source(names, test_fraction=0.2, seed=seed)
        _check_split([n.split("__")[0] for n in names], train, test)   # lizard_128: <source>__<y>_<x>
        assert 0.1 <= len(test) / len(names) <= 0.3
    ds = build_conic(lizard, "test", seed=1)
    lab, img = ds[0]
    assert lab.shape == (128, 128) and img.shape == (3, 128, 128) and ds.tile_size == 128
    first = int(split_by_source(names, seed=1)[1][0])
    assert ds.names[0] == names[first]
    assert np.array_equal(img.permute(1, 2, 0).numpy(), np.load(lizard / "images.npy", mmap_mode="r")[first])
    assert np.array_equal(lab.numpy(), np.load(lizard / "labels.npy", mmap_mode="r")[first, ..., 1])
    assert not set(ds.sources) & set(build_conic(lizard, "train", seed=1).sources)


def test_build_conic_sides(conic):
    root = conic[0]
    train, test = build_conic(root, "train", seed=2), build_conic(root, "test", seed=2)
    assert sorted(train.names + test.names) == sorted(NAMES)
    assert not set(train.sources) & set(test.sources)
    expected_train, expected_test = split_by_source(NAMES, seed=2)
    assert train.names == [NAMES[i] for i in expected_train]
    assert test.names == [NAMES[i] for i in expected_test]
    with pytest.raises(ValueError):
        build_conic(root, "val")


# --------------------------------------------------------------------------- split files

def test_split_file_round_trip(conic, tmp_path):
    root = conic[0]
    train, test = split_by_source(NAMES, seed=4)
    path = tmp_path / "split.csv"
    write_split_file(path, NAMES, train, test)
    lines = path.read_text().splitlines()
    assert lines[0] == "patch_info,split" and len(lines) == len(NAMES) + 1
    assert lines[1] == f"{NAMES[0]},{'test' if 0 in test else 'train'}"
    r_train, r_test = read_split_file(path, NAMES)
    assert np.array_equal(r_train, train) and np.array_equal(r_test, test)
    # build_conic follows the file, not its own seed.
    ds = build_conic(root, "test", seed=99, split_file=path)
    assert ds.names == [NAMES[i] for i in test]


def test_split_file_order_free_and_subset(tmp_path):
    path = tmp_path / "split.csv"
    path.write_text("split,patch_info\ntest,glas_3__0_0\ntrain,consep_1-0000\ntrain,crag_10__0_0\n")
    train, test = read_split_file(path, NAMES)
    assert train.tolist() == [0, 3] and test.tolist() == [NAMES.index("glas_3__0_0")]


@pytest.mark.parametrize("text, what", [
    ("patch_info,split\nconsep_1-0000,train\nnot_a_patch,test\n", ["line 3", "not_a_patch"]),
    ("patch_info,split\nconsep_1-0000,train\ncrag_7__0_0,validation\n", ["line 3", "validation"]),
    ("patch_info,side\nconsep_1-0000,train\n", ["split"]),
    ("name,split\nconsep_1-0000,train\n", ["patch_info"]),
    ("patch_info,split\nconsep_1-0000,train\nconsep_1-0000,test\n", ["line 3", "twice"]),
])
def test_bad_split_file(tmp_path, text, what):
    path = tmp_path / "my_split.csv"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        read_split_file(path, NAMES)
    msg = one_line_error(info, "my_split.csv")
    for w in what:
        assert w in msg, msg


def test_split_file_with_empty_side(conic, tmp_path):
    path = tmp_path / "split.csv"
    path.write_text("patch_info,split\nconsep_1-0000,train\n")
    assert len(build_conic(conic[0], "train", split_file=path)) == 1
    with pytest.raises(UserError, match="no test patches"):
        build_conic(conic[0], "test", split_file=path)


# --------------------------------------------------------------------------- malformed data

def _good(n=4, size=16):
    patches = [conic_patch(i, size=size, n_nuclei=6) for i in range(n)]
    return (np.stack([p[0] for p in patches]), np.stack([p[1] for p in patches]),
            [f"s{i % 2}-{i:04d}" for i in range(n)])


def test_good_small_data_loads(tmp_path):
    # The baseline the malformed cases below start from.
    images, labels, names = _good()
    write_conic(tmp_path, images, labels, names)
    ds = CoNIC(tmp_path)
    assert len(ds) == 4 and ds.sources == ["s0", "s1", "s0", "s1"]


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(UserError) as info:
        open_conic(tmp_path / "nowhere")
    assert "images.npy" in one_line_error(info, "nowhere")
    images, labels, names = _good()
    write_conic(tmp_path, images, None, names)
    with pytest.raises(UserError) as info:
        open_conic(tmp_path)
    msg = one_line_error(info, "labels.npy")
    assert "missing labels.npy" in msg and "layout" in msg


def _bad_images_shape(images, labels, names):
    return np.concatenate([images, images[..., :1]], axis=-1), labels, names


def _bad_images_dtype(images, labels, names):
    return images.astype(np.float64), labels, names


def _bad_labels_shape(images, labels, names):
    return images, labels[..., 1], names


def _bad_labels_size(images, labels, names):
    return images, labels[:, :8], names


def _bad_labels_dtype(images, labels, names):
    return images, labels.astype(np.float32), names


def _too_few_rows(images, labels, names):
    return images, labels, names[:-1]


@pytest.mark.parametrize("corrupt, filename, words", [
    (_bad_images_shape, "images.npy", ["(N, H, W, 3)"]),
    (_bad_images_dtype, "images.npy", ["uint8", "float64"]),
    (_bad_labels_shape, "labels.npy", ["(N, H, W, 2)"]),
    (_bad_labels_size, "labels.npy", ["does not match"]),
    (_bad_labels_dtype, "labels.npy", ["integer", "float32"]),
    (_too_few_rows, "patch_info.csv", ["3 rows", "4 patches"]),
])
def test_malformed_arrays(tmp_path, corrupt, filename, words):
    write_conic(tmp_path, *corrupt(*_good()))
    with pytest.raises(UserError) as info:
        CoNIC(tmp_path)
    msg = one_line_error(info, filename)
    for w in words:
        assert w in msg, msg


def test_patch_info_without_its_column(tmp_path):
    images, labels, names = _good()
    write_conic(tmp_path, images, labels, None)
    (tmp_path / "patch_info.csv").write_text("name\n" + "\n".join(names) + "\n")
    with pytest.raises(UserError) as info:
        open_conic(tmp_path)
    assert "'patch_info' column" in one_line_error(info, "patch_info.csv")


def _set_class_7(labels, i):
    y, x = np.argwhere(labels[i, ..., 0] > 0)[0]
    labels[i, y, x, 1] = 7


def _set_instance_without_class(labels, i):
    labels[i, 0, 0] = (50, 0)


def _set_class_without_instance(labels, i):
    y, x = np.argwhere(labels[i, ..., 0] > 0)[0]
    labels[i, y, x, 0] = 0


@pytest.mark.parametrize("corrupt, words", [
    (_set_class_7, ["class id 7", "0..6"]),
    (_set_instance_without_class, ["class 0"]),
    (_set_class_without_instance, ["instance id 0"]),
])
def test_bad_label_values(tmp_path, corrupt, words):
    images, labels, names = _good()
    corrupt(labels, 2)
    write_conic(tmp_path, images, labels, names)
    with pytest.raises(UserError) as info:
        open_conic(tmp_path)
    msg = one_line_error(info, "labels.npy")
    assert "item 2" in msg, msg
    for w in words:
        assert w in msg, msg


def test_full_check_finds_what_the_start_up_sample_misses(tmp_path):
    # 200 items: start-up checks 64 evenly spaced ones (0, 3, 6, ...), never item 1.
    image, label, _ = conic_patch(0, size=8, n_nuclei=2, noise=0)
    images, labels = np.repeat(image[None], 200, 0), np.repeat(label[None], 200, 0)
    labels[1, 0, 0] = (0, 7)
    write_conic(tmp_path, images, labels, [f"s{i % 3}-{i:04d}" for i in range(200)])
    ds = CoNIC(tmp_path)                          # sample only: passes
    assert len(ds) == 200
    ds[0]
    with pytest.raises(UserError) as info:        # the bad item itself is checked when read
        ds[1]
    assert "item 1" in one_line_error(info, "labels.npy")
    with pytest.raises(UserError) as info:
        CoNIC(tmp_path, check_data=True)
    msg = one_line_error(info, "labels.npy")
    assert "item 1 " in msg and "class id 7" in msg
    labels[0, 0, 0] = (0, 9)                      # item 0 is always in the sample
    write_conic(tmp_path, images, labels, None)
    with pytest.raises(UserError) as info:
        CoNIC(tmp_path)
    assert "item 0 " in one_line_error(info, "labels.npy")


def test_signed_and_other_integer_label_dtypes(tmp_path):
    images, labels, names = _good()
    for dtype in (np.int32, np.uint8, np.int64):
        write_conic(tmp_path, images, labels.astype(dtype), names)
        ds = CoNIC(tmp_path)
        assert np.array_equal(ds.instances(1), labels[1, ..., 0])
    bad = labels.astype(np.int16)
    bad[3, 1, 1] = (-1, 2)
    write_conic(tmp_path, images, bad, names)
    with pytest.raises(UserError, match="item 3 has a negative instance id"):
        open_conic(tmp_path)


def test_duplicate_patch_names(tmp_path):
    images, labels, names = _good()
    names[3] = names[0]
    write_conic(tmp_path, images, labels, names)
    with pytest.raises(UserError) as info:
        open_conic(tmp_path)
    assert "twice" in one_line_error(info, "patch_info.csv")
