"""The study's judge, piece by piece: precision/recall/density/coverage on feature sets
with known answers (and against the `prdc` package when it is installed), paired
differences and t-intervals against hand-worked numbers, CoNIC's two panoptic
qualities on a hand-made pair of images where the per-image mean and the pooled value
differ, and the calibration ladder's degradations on real lizard_128 tiles."""
from pathlib import Path

import numpy as np
import pytest
import torch

import degradations
import metrics

LIZARD = Path(__file__).resolve().parents[2] / "shared" / "data" / "lizard_128"

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- precision, recall, density, coverage

def gaussian_features(n, seed, dim=8):
    return np.random.default_rng(seed).standard_normal((n, dim))


def test_prdc_of_identical_sets_is_one():
    x = gaussian_features(200, seed=0)
    result = metrics.prdc(x, x, k=5)
    assert result["precision"] == result["recall"] == result["coverage"] == 1.0
    # Each real ball holds its own centre and the k - 1 neighbours strictly inside it: k per ball, k / k per fake.
    assert result["density"] == pytest.approx(1.0)


def test_prdc_of_a_set_shifted_far_away_is_zero():
    x = gaussian_features(200, seed=0)
    assert metrics.prdc(x, x + 100.0, k=5) == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_prdc_by_hand_on_a_line():
    # Reals 0, 1, 2, 3 with k = 1: every real ball has radius 1 (its nearest other real).
    # Fakes 0.5 and 10: fake balls have radius 9.5.
    #   precision: 0.5 lies in the balls of reals 0 and 1; 10 lies in none -> 1/2
    #   recall:    every real is within 9.5 of the fake 0.5 -> 1
    #   density:   (2 balls + 0 balls) / k=1, averaged over the 2 fakes -> 1
    #   coverage:  reals 0 and 1 have a fake (0.5) closer than 1; reals 2 and 3 do not -> 1/2
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.5], [10.0]])
    assert metrics.prdc(real, fake, k=1) == {"precision": 0.5, "recall": 1.0, "density": 1.0, "coverage": 0.5}


def test_prdc_separates_fidelity_from_diversity():
    # Reals in two far-apart modes; fakes drawn from the first mode only: they look real
    # but cover half of the real variety.
    real = np.concatenate([gaussian_features(150, seed=0), gaussian_features(150, seed=1) + 20.0])
    one_mode = gaussian_features(150, seed=2)
    result = metrics.prdc(real, one_mode, k=5)
    assert result["precision"] > 0.85 and result["density"] > 0.75, result
    assert result["coverage"] < 0.55 and result["recall"] < 0.55, result
    both_modes = np.concatenate([one_mode[:75], gaussian_features(75, seed=3) + 20.0])
    assert metrics.prdc(real, both_modes, k=5)["coverage"] > 0.75


def test_prdc_matches_the_prdc_package():
    compute_prdc = pytest.importorskip("prdc").compute_prdc
    real, fake = gaussian_features(150, seed=1, dim=16), gaussian_features(120, seed=2, dim=16) * 1.2 + 0.3
    expected = compute_prdc(real, fake, nearest_k=5)
    result = metrics.prdc(real, fake, k=5)
    for name in ("precision", "recall", "density", "coverage"):
        assert result[name] == pytest.approx(float(expected[name]), abs=1e-12), name


def test_prdc_rejects_k_too_large_and_mismatched_features():
    x = gaussian_features(5, seed=0)
    with pytest.raises(ValueError, match="k < the size"):
        metrics.prdc(x, x, k=5)
    with pytest.raises(ValueError, match="same D"):
        metrics.prdc(x, x[:, :3], k=2)


# --------------------------------------------------------------------------- paired differences

def test_paired_difference_by_hand():
    # Per-seed differences 0.04, 0.01, 0.03, 0.05: mean 0.0325; squared deviations
    # 0.0075^2 + 0.0225^2 + 0.0025^2 + 0.0175^2 = 0.000875, / 3 = 0.00029167, sd 0.0170783,
    # standard error sd / 2 = 0.0085391; t(0.975, 3 degrees of freedom) = 3.1824 (t table),
    # half width 0.027175 -> (0.005325, 0.059675), above 0.
    with_aug = [0.70, 0.65, 0.72, 0.68]
    real_only = [0.66, 0.64, 0.69, 0.63]
    result = metrics.paired_difference(with_aug, real_only)
    assert result["n"] == 4 and result["excludes_zero"] is True
    assert result["mean"] == pytest.approx(0.0325)
    assert result["ci95"] == pytest.approx((0.005325, 0.059675), abs=2e-6)
    # Each side alone varies by seed far more than the differences do: unpaired, the interval would span 0.
    assert metrics.t_interval(with_aug)[1][1] - metrics.t_interval(with_aug)[1][0] > 2 * 0.0325


def test_paired_difference_around_zero_missing_scores_and_one_seed():
    # Differences 0.02, -0.03, 0.01 (the pair with None left out): mean 0, interval spans 0.
    result = metrics.paired_difference([0.52, 0.47, 0.51, None], [0.50, 0.50, 0.50, 0.50])
    assert result["n"] == 3 and result["mean"] == pytest.approx(0.0, abs=1e-12)
    assert result["ci95"][0] < 0 < result["ci95"][1] and result["excludes_zero"] is False
    one = metrics.paired_difference([0.6], [0.5])
    assert one == {"mean": pytest.approx(0.1), "ci95": None, "n": 1, "excludes_zero": False}
    with pytest.raises(ValueError, match="one value per seed"):
        metrics.paired_difference([0.6, 0.7], [0.5])


def test_t_interval_by_hand():
    # 1, 2, 3: mean 2, sd 1, standard error 1 / sqrt(3); t(0.975, 2) = 4.3027 -> 2 +- 2.4841.
    mean, (lo, hi) = metrics.t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and (lo, hi) == pytest.approx((2 - 2.4841, 2 + 2.4841), abs=1e-4)
    assert metrics.t_interval([0.7]) == (0.7, None)
    assert metrics.t_interval([]) == (None, None)


# --------------------------------------------------------------------------- CoNIC's panoptic qualities

def boxes(*spec, shape=(12, 12)):
    """(instance map, class map) with box k = (y0, y1, x0, x1, class) holding id k + 1."""
    instances, classes = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    for k, (y0, y1, x0, x1, c) in enumerate(spec):
        instances[y0:y1, x0:x1] = k + 1
        classes[y0:y1, x0:x1] = c
    return instances, classes


# Image 1. True: A (Neutrophil, 4 px) and B (Epithelial, 6 px). Predicted: A exactly (IoU 1)
# and 5 of B's 6 px (IoU 5/6). Binary: TP 2, FP 0, FN 0 -> PQ (1 + 5/6) / 2 = 11/12.
TRUE_1 = boxes((0, 2, 0, 2, 1), (4, 6, 0, 3, 2))
PRED_1 = boxes((0, 2, 0, 2, 1), (4, 6, 0, 3, 2))
PRED_1[0][5, 2] = PRED_1[1][5, 2] = 0
# Image 2. True: C, D, F (Neutrophil, 4 px each). Predicted: C exactly, and E (Epithelial,
# 3 px) where nothing is. Binary: TP 1, FP 1 (E), FN 2 (D, F) -> PQ 1 / (1 + 1/2 + 1) = 2/5.
TRUE_2 = boxes((0, 2, 0, 2, 1), (4, 6, 4, 6, 1), (8, 10, 8, 10, 1))
PRED_2 = boxes((0, 2, 0, 2, 1), (0, 1, 6, 9, 2))


def stacked(*pairs):
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def test_pq_per_image_mean_differs_from_the_pooled_value():
    pred, _ = stacked(PRED_1, PRED_2)
    true, _ = stacked(TRUE_1, TRUE_2)
    # CoNIC's "pq", per image then the mean: (11/12 + 2/5) / 2 = 79/120 = 0.6583.
    assert metrics.pq_per_image(pred, true) == pytest.approx(79 / 120)
    # Pooled over both images: TP 3 (IoUs 1 + 5/6 + 1 = 17/6), FP 1, FN 2 -> (17/6) / 4.5 = 17/27 = 0.6296.
    assert metrics.panoptic_quality(pred, true)["pq"] == pytest.approx(17 / 27)


def test_pq_per_image_counts_an_empty_image_as_zero():
    empty = np.zeros((12, 12), np.int32)
    pred, true = np.stack([PRED_1[0], empty]), np.stack([TRUE_1[0], empty])
    assert metrics.pq_per_image(pred, true) == pytest.approx((11 / 12 + 0) / 2)  # as CoNIC's code scores it
    assert metrics.pq_per_image(PRED_1[0], TRUE_1[0]) == pytest.approx(11 / 12)  # one (H, W) map works too


def test_mpq_plus_pools_each_class_over_images_and_averages_all_six():
    pred_instances, pred_classes = stacked(PRED_1, PRED_2)
    true_instances, true_classes = stacked(TRUE_1, TRUE_2)
    result = metrics.mpq_plus(pred_instances, pred_classes, true_instances, true_classes)
    # Neutrophil over both images: A and C matched (IoU 1 each), D and F missed: 2 / (2 + 0 + 2/2) = 2/3.
    # Epithelial: B matched (IoU 5/6), E a false positive: (5/6) / (1 + 1/2) = 5/9.
    # Lymphocyte, Plasma, Eosinophil, Connective: no instance on either side -> 0, and still counted.
    assert result["per_class"] == pytest.approx({"Neutrophil": 2 / 3, "Epithelial": 5 / 9, "Lymphocyte": 0.0,
                                                 "Plasma": 0.0, "Eosinophil": 0.0, "Connective": 0.0})
    assert result["mpq+"] == pytest.approx((2 / 3 + 5 / 9) / 6)  # 11/54 = 0.2037


def test_mpq_plus_a_wrong_class_is_a_miss_in_one_class_and_a_false_positive_in_another():
    true = boxes((0, 2, 0, 2, 1))
    pred = boxes((0, 2, 0, 2, 3))  # the right nucleus, called Lymphocyte instead of Neutrophil
    assert metrics.pq_per_image(pred[0], true[0]) == 1.0
    result = metrics.mpq_plus(pred[0], pred[1], true[0], true[1])
    assert result["per_class"]["Neutrophil"] == 0.0 and result["per_class"]["Lymphocyte"] == 0.0
    assert result["mpq+"] == 0.0
    with pytest.raises(ValueError, match="one shape"):
        metrics.mpq_plus(pred[0], pred[1][:5], true[0], true[1])


# --------------------------------------------------------------------------- the calibration ladder

@pytest.fixture(scope="module")
def lizard_tiles():
    """Eight real uint8 (128, 128, 3) lizard_128 tiles."""
    if not (LIZARD / "images.npy").is_file():
        pytest.skip(f"lizard_128 not found under {LIZARD}")
    return np.array(np.load(LIZARD / "images.npy", mmap_mode="r")[::130][:8])


def mean_abs_change(a, b):
    return float(np.abs(a.astype(np.float64) - b).mean())


@pytest.mark.parametrize("name", ["blur", "jpeg", "stain"])
def test_each_rung_changes_real_tiles_by_a_bounded_amount(name, lizard_tiles):
    before = lizard_tiles.copy()
    degraded = degradations.calibration_ladder(lizard_tiles)[name]
    assert degraded.dtype == np.uint8 and degraded.shape == lizard_tiles.shape
    assert np.array_equal(lizard_tiles, before)  # the input is untouched
    # Visible (over 1 grey level on average) but far from a different image (about 47 between two different tiles here).
    assert 1.0 < mean_abs_change(degraded, lizard_tiles) < 20.0
    assert np.array_equal(degraded, degradations.calibration_ladder(lizard_tiles)[name])  # deterministic


def test_blur_keeps_brightness_and_flat_tiles(lizard_tiles):
    blurred = degradations.gaussian_blur(lizard_tiles)
    assert abs(blurred.mean() - lizard_tiles.mean()) < 0.5  # a normalised kernel moves no mass
    flat = np.full((1, 16, 16, 3), 200, np.uint8)
    assert np.array_equal(degradations.gaussian_blur(flat), flat)
    # Fine detail goes: the mean squared difference between neighbouring pixels drops.
    def detail(x):
        return np.square(np.diff(x.astype(np.float64), axis=2)).mean()
    assert detail(blurred) < 0.7 * detail(lizard_tiles)


def test_jpeg_quality_orders_the_damage(lizard_tiles):
    assert (mean_abs_change(degradations.jpeg(lizard_tiles, quality=30), lizard_tiles)
            > mean_abs_change(degradations.jpeg(lizard_tiles, quality=90), lizard_tiles) > 0)


def test_stain_shift_makes_tiles_bluer(lizard_tiles):
    # More haematoxylin (blue-purple) and less eosin (pink): blue gains on red.
    shifted = degradations.stain_shift(lizard_tiles).astype(np.float64)
    original = lizard_tiles.astype(np.float64)
    assert (shifted[..., 2] - shifted[..., 0]).mean() > (original[..., 2] - original[..., 0]).mean() + 5
    # With no shift the round trip through stain space is near lossless: the change above is the shift's.
    assert mean_abs_change(degradations.stain_shift(lizard_tiles, shift=(0, 0, 0)), lizard_tiles) < 0.5


def test_ladder_rejects_what_is_not_uint8_rgb_tiles():
    with pytest.raises(ValueError, match="uint8 RGB tiles"):
        degradations.gaussian_blur(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8 RGB tiles"):
        degradations.jpeg(np.zeros((8, 8, 3), np.uint8))


# --------------------------------------------------------------------------- the whole-tile C2ST

def test_tile_c2st_scores_blurred_real_tiles_above_the_real_vs_real_floor():
    """A small, fast configuration (64 whole tiles a side, 3 folds, 10 epochs): two
    disjoint halves of real tiles sit at chance, and the same second half blurred with
    sigma = 1 above the floor's interval."""
    if not (LIZARD / "images.npy").is_file():
        pytest.skip(f"lizard_128 not found under {LIZARD}")
    images = np.load(LIZARD / "images.npy", mmap_mode="r")
    tiles = np.array(images[np.sort(np.random.default_rng(0).choice(len(images), 128, replace=False))])
    a, b = metrics.real_vs_real_split(len(tiles), seed=0)
    small = dict(epochs=10, folds=3, seed=0)
    floor = metrics.tile_c2st(tiles[a], tiles[b], **small)
    blurred = metrics.tile_c2st(tiles[a], degradations.gaussian_blur(tiles[b]), **small)
    for result in (floor, blurred):
        assert result["n"] == 128 and len(result["folds"]) == 3
        assert result["accuracy"] == pytest.approx(np.mean(result["folds"]))
        assert 0 <= result["ci95"][0] <= result["accuracy"] <= result["ci95"][1] <= 1
        assert result["config"]["epochs"] == 10 and result["config"]["folds"] == 3
    assert floor["ci95"][0] <= 0.5 <= floor["ci95"][1], floor
    assert blurred["accuracy"] > floor["ci95"][1], (floor, blurred)


# --------------------------------------------------------------------------- the C2ST in feature space

def test_feature_c2st_is_at_chance_for_one_distribution_and_near_one_for_a_shifted_one():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 16)), rng.normal(size=(200, 16))
    same = metrics.feature_c2st(a, b, seed=0)
    assert same["ci95"][0] <= 0.5 <= same["ci95"][1] and len(same["folds"]) == 5 and same["n"] == 400
    shifted = metrics.feature_c2st(a, b + np.eye(16)[0] * 4, seed=0)
    assert shifted["accuracy"] > 0.95
    assert metrics.feature_c2st(a, b, seed=0) == same  # deterministic for a seed
    with pytest.raises(ValueError, match="folds"):
        metrics.feature_c2st(a[:3], b[:3], folds=5)


def test_feature_c2st_scores_blurred_real_tiles_above_the_floor():
    """In the pooled features of a fixed, untrained segmenter (the study uses its trained reference
    segmenter's): real halves at chance, the second half blurred clearly above."""
    if not (LIZARD / "images.npy").is_file():
        pytest.skip(f"lizard_128 not found under {LIZARD}")
    from segmenter import build_segmenter, segmenter_features
    images = np.load(LIZARD / "images.npy", mmap_mode="r")
    tiles = np.array(images[np.sort(np.random.default_rng(0).choice(len(images), 160, replace=False))])
    torch.manual_seed(0)
    model = build_segmenter({"encoder": "unet", "width": 8, "label_set": "conic"}).eval()
    cpu = torch.device("cpu")
    with torch.no_grad():
        real, blurred = (segmenter_features(model, t, cpu) for t in (tiles, degradations.gaussian_blur(tiles)))
    a, b = metrics.real_vs_real_split(len(tiles), seed=0)
    floor, blur = metrics.feature_c2st(real[a], real[b]), metrics.feature_c2st(real[a], blurred[b])
    assert floor["ci95"][0] <= 0.5 <= floor["ci95"][1], floor
    assert blur["accuracy"] > floor["ci95"][1], (floor, blur)
