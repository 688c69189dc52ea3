"""PanNuke masks -> class maps, the palette, and the dataset classes (official folds,
converted layout, the real three-patch fixture), including joint augmentation."""
import numpy as np
import pytest
import torch
from conftest import assert_augmentation_keeps_alignment

from dataset.masks import (BACKGROUND, NUM_CLASSES, PALETTE, labels_to_onehot, labels_to_rgb, pannuke_to_labels,
                           rgb_to_labels)
from dataset.pannuke import PanNukeConverted, PanNukeFolds, build_pannuke

# --------------------------------------------------------------------------- masks

def _mask(h=8, w=8):
    m = np.zeros((h, w, 6), dtype=np.float64)
    m[..., 5] = 1.0
    return m


def test_instance_ids_become_their_channel_class():
    m = _mask()
    m[1, 1, 0] = 7      # instance ids, not 0/1
    m[2, 3, 2] = 1234
    m[4, 4, 4] = 1
    m[5, 6, 3] = 2
    m[6, 6, 1] = 3
    for y, x, _ in [(1, 1, 0), (2, 3, 2), (4, 4, 4), (5, 6, 3), (6, 6, 1)]:
        m[y, x, 5] = 0
    labels = pannuke_to_labels(m)
    assert labels.dtype == np.uint8 and labels.shape == (8, 8)
    assert (labels[1, 1], labels[2, 3], labels[4, 4], labels[5, 6], labels[6, 6]) == (0, 2, 4, 3, 1)
    assert (labels == BACKGROUND).sum() == 64 - 5


def test_channel_5_is_a_background_map_not_a_class_id():
    # Channel 5 is 1 on background; a nucleus pixel wins even if channel 5 is (wrongly) also set there,
    # and channel 5 = 0 without any nucleus is still background (all-zero patches in the release).
    m = _mask()
    m[3, 3, 2] = 5          # channel 5 still 1 here
    m[0, 0, 5] = 0          # no nucleus, no background flag
    labels = pannuke_to_labels(m)
    assert labels[3, 3] == 2
    assert labels[0, 0] == BACKGROUND
    assert (labels == BACKGROUND).sum() == 63


def test_all_zero_mask_is_all_background():
    labels = pannuke_to_labels(np.zeros((256, 256, 6)))
    assert labels.shape == (256, 256)
    assert (labels == BACKGROUND).all() and BACKGROUND == 5


@pytest.mark.parametrize("channels", [(1, 3), (3, 1), (0, 4), (2, 4), (0, 1, 2, 3, 4)])
def test_overlapping_classes_lowest_channel_wins(channels):
    m = _mask()
    for c in channels:
        m[2, 2, c] = 11
    m[2, 2, 5] = 0
    assert pannuke_to_labels(m)[2, 2] == min(channels)


def test_labels_to_onehot_sums_to_one():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, NUM_CLASSES, (2, 3, 16, 16), generator=g, dtype=torch.uint8)
    onehot = labels_to_onehot(labels)
    assert onehot.shape == (2, 3, NUM_CLASSES, 16, 16)
    assert onehot.dtype == torch.float32
    assert torch.equal(onehot.sum(-3), torch.ones(2, 3, 16, 16))
    assert torch.equal(onehot.argmax(-3), labels.long())
    assert set(onehot.unique().tolist()) == {0.0, 1.0}


def test_palette_is_matplotlib_bgrcmw():
    assert PALETTE.shape == (6, 3) and PALETTE.dtype == np.uint8
    assert len({tuple(c) for c in PALETTE}) == 6
    assert tuple(PALETTE[5]) == (255, 255, 255)                  # background white
    assert np.argmax(PALETTE[0]) == 2 and np.argmax(PALETTE[2]) == 0  # blue, red


def test_palette_round_trip():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, NUM_CLASSES, size=(40, 50)).astype(np.uint8)
    rgb = labels_to_rgb(labels)
    assert rgb.shape == (40, 50, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb_to_labels(rgb), labels)


def test_near_palette_colours_snap():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, NUM_CLASSES, size=(64, 64)).astype(np.uint8)
    noisy = labels_to_rgb(labels).astype(np.int16) + rng.integers(-30, 31, size=(64, 64, 3))
    noisy = np.clip(noisy, 0, 255).astype(np.uint8)
    assert np.array_equal(rgb_to_labels(noisy), labels)


def test_near_palette_after_jpeg_snaps(tmp_path):
    from PIL import Image
    labels = np.full((64, 64), BACKGROUND, np.uint8)
    labels[8:40, 8:40] = 0
    labels[40:60, 30:60] = 2
    path = tmp_path / "mask.jpg"
    Image.fromarray(labels_to_rgb(labels)).save(path, quality=95, subsampling=0)
    decoded = np.asarray(Image.open(path).convert("RGB"))
    assert not np.array_equal(decoded, labels_to_rgb(labels))  # JPEG did change colours
    assert np.array_equal(rgb_to_labels(decoded), labels)


def test_off_palette_colour_raises_naming_source_and_colour():
    rgb = labels_to_rgb(np.full((10, 10), BACKGROUND, np.uint8)).copy()
    rgb[3:5, 3:5] = (128, 128, 128)
    with pytest.raises(ValueError) as info:
        rgb_to_labels(rgb, source="masks/case_7.png")
    msg = str(info.value)
    assert "masks/case_7.png" in msg
    assert "(128, 128, 128)" in msg
    assert "\n" not in msg


# --------------------------------------------------------------------------- official folds

def _expected_labels(root, k, i):
    return pannuke_to_labels(np.load(root / f"Fold {k}" / "masks" / f"fold{k}" / "masks.npy")[i])


def test_default_tissue_is_colon_and_names(pannuke_folds, pannuke_folds_info):
    ds = PanNukeFolds(pannuke_folds, [1, 2, 3])
    expected = [f"fold{k}_{i:05d}" for k in (1, 2, 3) for i in pannuke_folds_info.colon[k]]
    assert ds.names == expected
    assert len(ds) == len(expected) == 8
    sub = PanNukeFolds(pannuke_folds, [2])
    assert sub.names == [f"fold2_{i:05d}" for i in pannuke_folds_info.colon[2]]


@pytest.mark.parametrize("tissue", ["colon", "COLON", "CoLoN"])
def test_tissue_filter_is_case_insensitive(pannuke_folds, tissue):
    assert PanNukeFolds(pannuke_folds, [1, 2, 3], tissue=tissue).names == PanNukeFolds(pannuke_folds, [1, 2, 3]).names


def test_tissue_all_and_others(pannuke_folds, pannuke_folds_info):
    types = pannuke_folds_info.types
    everything = PanNukeFolds(pannuke_folds, [1, 2, 3], tissue="all")
    assert len(everything) == sum(map(len, types.values()))
    assert everything.names == [f"fold{k}_{i:05d}" for k in (1, 2, 3) for i in range(len(types[k]))]
    assert len(PanNukeFolds(pannuke_folds, [1, 2, 3], tissue="ALL")) == len(everything)
    breast = PanNukeFolds(pannuke_folds, [1, 3], tissue="breast")
    assert breast.names == ["fold1_00002", "fold3_00001"]


def test_items_are_uint8_and_match_the_files(pannuke_folds, pannuke_folds_info):
    ds = PanNukeFolds(pannuke_folds, [1, 2, 3], tissue="all")
    images = {k: np.load(pannuke_folds / f"Fold {k}" / "images" / f"fold{k}" / "images.npy") for k in (1, 2, 3)}
    for n, name in enumerate(ds.names):
        k, i = int(name[4]), int(name[-5:])
        labels, image = ds[n]
        assert labels.dtype == torch.uint8 and labels.shape == (256, 256)
        assert image.dtype == torch.uint8 and image.shape == (3, 256, 256)
        assert np.array_equal(image.permute(1, 2, 0).numpy(), images[k][i].astype(np.uint8))
        assert np.array_equal(labels.numpy(), _expected_labels(pannuke_folds, k, i))


def test_empty_patch_and_double_label_in_dataset(pannuke_folds, pannuke_folds_info):
    ds = PanNukeFolds(pannuke_folds, [1], tissue="all")
    k, i = pannuke_folds_info.empty
    labels, _ = ds[ds.names.index(f"fold{k}_{i:05d}")]
    assert (labels == BACKGROUND).all()
    k, i, (y, x), chans = pannuke_folds_info.double
    labels, _ = ds[ds.names.index(f"fold{k}_{i:05d}")]
    assert labels[y, x] == min(chans)
    assert len(labels.unique()) > 2  # the synthetic patch has several classes


def test_plain_index_and_index_seed_pair_without_augmentation(pannuke_folds):
    ds = PanNukeFolds(pannuke_folds, [1])
    a, b = ds[0], ds[(0, 12345)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_real_fixture_loads(pannuke_tiny_real):
    ds = build_pannuke(pannuke_tiny_real, [1, 2, 3], "Colon", augment=False, split="train")
    assert isinstance(ds, PanNukeFolds)
    assert len(ds) == 3
    assert ds.names == ["fold1_00000", "fold2_00000", "fold3_00000"]
    for n in range(3):
        labels, image = ds[n]
        assert labels.dtype == torch.uint8 and labels.shape == (256, 256)
        assert image.dtype == torch.uint8 and image.shape == (3, 256, 256)
        assert image.float().std() > 10  # real tissue, not a blank
        nuclei = (labels != BACKGROUND).float().mean()
        assert 0.01 < nuclei < 0.9
        assert np.array_equal(labels.numpy(), _expected_labels(pannuke_tiny_real, n + 1, 0))
    assert len(PanNukeFolds(pannuke_tiny_real, [2], tissue="all")) == 1


# --------------------------------------------------------------------------- converted layout

def test_converted_layout_loads(pannuke_converted):
    from PIL import Image
    train = build_pannuke(pannuke_converted, [1, 2], "Colon", augment=False, split="train")
    test = build_pannuke(pannuke_converted, [3], "Colon", augment=False, split="test")
    assert isinstance(train, PanNukeConverted) and isinstance(test, PanNukeConverted)
    assert train.names == ["a_000", "a_001", "b_000"]
    assert test.names == ["t_000", "t_001"]
    for ds, split in ((train, "train"), (test, "test")):
        for n, name in enumerate(ds.names):
            labels, image = ds[n]
            assert labels.dtype == torch.uint8 and labels.shape == (256, 256)
            assert image.dtype == torch.uint8 and image.shape == (3, 256, 256)
            png = np.asarray(Image.open(pannuke_converted / split / "data" / f"{name}.png").convert("RGB"))
            assert np.array_equal(image.permute(1, 2, 0).numpy(), png)
            mask = np.load(pannuke_converted / split / "masks" / f"{name}.npy")
            assert np.array_equal(labels.numpy(), pannuke_to_labels(mask))


# --------------------------------------------------------------------------- augmentation

@pytest.fixture
def colour_coded_folds(tmp_path, pannuke_writer, pannuke_folds_info):
    """A fold whose image colour is an exact, noise-free function of the class map."""
    images, masks = [], []
    for i in range(2):
        _, mask, labels = pannuke_writer.patch(100 + i, n_nuclei=25, noise=0)
        images.append(pannuke_folds_info.colours[labels])
        masks.append(mask)
    pannuke_writer.fold(tmp_path, 1, np.stack(images), np.stack(masks), np.array(["Colon", "Colon"]))
    return tmp_path


def test_augmentation_keeps_image_and_mask_aligned(colour_coded_folds, pannuke_folds_info):
    colours = torch.from_numpy(pannuke_folds_info.colours.astype(np.uint8))
    plain = PanNukeFolds(colour_coded_folds, [1])
    aug = PanNukeFolds(colour_coded_folds, [1], augment=True)
    for index in range(len(aug)):
        labels0 = assert_augmentation_keeps_alignment(plain, aug, index, colours, 256)
        # A plain index (no seed) is not augmented.
        assert torch.equal(aug[index][0], labels0)
