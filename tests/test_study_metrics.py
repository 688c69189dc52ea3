"""The weight-free realism metrics in metrics.py: Frechet and kernel distances on
feature arrays with known answers, and the classifier two-sample test (C2ST) at
chance for two halves of one real set and near 1 for blurred or colour-shifted
copies. Real lizard_128 crops when present, a synthetic H&E-like set otherwise."""
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

import metrics

LIZARD = Path(__file__).resolve().parents[2] / "shared" / "data" / "lizard_128"
CROP = 64
N_IMAGES = 400

pytestmark = pytest.mark.usefixtures("one_thread")


def synthetic_he(n, seed, size=CROP):
    """uint8 (n, size, size, 3) H&E-like tiles: pink stroma with smooth texture, dark
    purple nuclei as soft-edged ellipses, per-tile stain jitter and pixel noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    pink, purple = np.array([232.0, 180.0, 210.0]), np.array([95.0, 50.0, 140.0])
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for k in range(n):
        texture = ndimage.gaussian_filter(rng.standard_normal((size, size)), 2.0)
        image = pink + rng.normal(0, 4, 3) + 60 * texture[..., None] * np.array([0.3, 1.0, 0.5])
        nuclei = np.zeros((size, size))
        for _ in range(rng.integers(4, 12)):
            cy, cx = rng.uniform(0, size, 2)
            ry, rx = rng.uniform(2.5, 6, 2)
            r2 = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
            nuclei = np.maximum(nuclei, 1 / (1 + np.exp(np.minimum(4 * (r2 - 1), 50))))
        colour = purple + rng.normal(0, 6, 3)
        image = image * (1 - nuclei[..., None]) + colour * nuclei[..., None]
        out[k] = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).round().astype(np.uint8)
    return out


@pytest.fixture(scope="module")
def real_images():
    """N_IMAGES uint8 (CROP, CROP, 3) images, one random crop from each of as many
    random lizard_128 tiles when present, else synthetic_he."""
    if not (LIZARD / "images.npy").is_file():
        return synthetic_he(N_IMAGES, seed=0)
    images = np.load(LIZARD / "images.npy", mmap_mode="r")
    rng = np.random.default_rng(0)
    tiles = np.sort(rng.choice(len(images), N_IMAGES, replace=False))
    corners = rng.integers(0, images.shape[1] - CROP + 1, size=(N_IMAGES, 2))
    return np.stack([images[t, y:y + CROP, x:x + CROP] for t, (y, x) in zip(tiles, corners)])


@pytest.fixture(scope="module")
def halves(real_images):
    a, b = metrics.real_vs_real_split(len(real_images), seed=0)
    return real_images[a], real_images[b]


def blurred(images, sigma=1.0):
    return np.stack([ndimage.gaussian_filter(im.astype(np.float64), (sigma, sigma, 0)) for im in images]
                    ).round().clip(0, 255).astype(np.uint8)


def colour_shifted(images, shift=(12, -6, -10)):
    return np.clip(images.astype(np.int16) + np.array(shift, dtype=np.int16), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- real_vs_real_split

def test_real_vs_real_split_gives_disjoint_seeded_halves():
    a, b = metrics.real_vs_real_split(11, seed=3)
    assert len(a) == len(b) == 5
    assert not set(a.tolist()) & set(b.tolist())
    assert set(a.tolist()) | set(b.tolist()) <= set(range(11))
    a2, b2 = metrics.real_vs_real_split(11, seed=3)
    assert np.array_equal(a, a2) and np.array_equal(b, b2)
    assert not np.array_equal(a, metrics.real_vs_real_split(11, seed=4)[0])
    assert not np.array_equal(a, np.arange(5)), "the halves should be random, not the first and second half"


# --------------------------------------------------------------------------- Frechet / kernel distance

def gaussian_features(n, d, seed):
    return np.random.default_rng(seed).standard_normal((n, d)) @ np.diag(np.linspace(0.5, 2.0, d))


def test_frechet_distance_known_answers():
    a = gaussian_features(500, 16, 0)
    scale = np.cov(a.T).trace()
    assert abs(metrics.frechet_distance(a, a)) < 1e-6 * scale
    # A pure translation leaves the covariance alone: exactly |shift|^2.
    shift = np.linspace(-1, 1, 16)
    assert metrics.frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)
    # Doubling every feature: tr(S + 4S - 2 * 2S) = tr(S), plus the change of the mean.
    mean = a.mean(0)
    assert metrics.frechet_distance(a, 2 * a) == pytest.approx(scale + float(mean @ mean), rel=1e-6)
    # Numpy and torch inputs agree, and it is the same maths as fid.
    assert metrics.frechet_distance(torch.from_numpy(a), torch.from_numpy(a + 1)) == pytest.approx(16.0, rel=1e-6)
    b = gaussian_features(500, 16, 1)
    assert metrics.frechet_distance(a, b) == pytest.approx(metrics.fid(a, b), rel=1e-12)


def test_frechet_distance_grows_with_mean_shift_and_handles_singular_covariances():
    a, b = gaussian_features(400, 8, 2), gaussian_features(400, 8, 3)
    values = [metrics.frechet_distance(a, b + s) for s in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert all(x < y for x, y in zip(values, values[1:])), values
    assert values[0] < 0.5 < values[-1]
    # Fewer rows than dimensions: singular covariances, complex rounding in the square root.
    small_a, small_b = gaussian_features(10, 32, 4), gaussian_features(12, 32, 5)
    value = metrics.frechet_distance(small_a, small_b)
    assert isinstance(value, float) and np.isfinite(value) and value > 0
    assert metrics.frechet_distance(a[:1], b) is None
    with pytest.raises(ValueError, match="same D"):
        metrics.frechet_distance(a, b[:, :4])


def test_kernel_distance_near_zero_for_one_distribution_and_grows_with_shift():
    # Features of about unit scale (the cubic kernel's values grow with the norms; at this
    # scale the unbiased estimate for a set against itself is about -0.01).
    a, b = gaussian_features(300, 16, 6) / 2, gaussian_features(300, 16, 7) / 2
    same, same_std = metrics.kernel_distance(a, a, subsets=20, subset_size=100)
    assert abs(same) < 0.05 and same_std >= 0
    means = [metrics.kernel_distance(a, b + s, subsets=20, subset_size=100)[0] for s in (0.0, 0.5, 1.0, 2.0)]
    assert abs(means[0]) < 0.05
    assert all(x < y for x, y in zip(means, means[1:])), means
    assert means[-1] > 1.0 and abs(same) < 0.01 * means[-1]
    assert metrics.kernel_distance(a, b, subsets=5, seed=1) == metrics.kernel_distance(a, b, subsets=5, seed=1)
    assert metrics.kernel_distance(a[:1], b) == (None, None)


# --------------------------------------------------------------------------- C2ST

def check_result(result, n):
    assert result["n"] == n and len(result["folds"]) == 5
    lo, hi = result["ci95"]
    assert 0 <= lo <= result["accuracy"] <= hi <= 1
    assert result["accuracy"] == pytest.approx(np.mean(result["folds"]), abs=0.02)  # equal folds: mean of folds


def test_c2st_real_halves_are_indistinguishable(halves):
    a, b = halves
    result = metrics.c2st(a, b, seed=0)
    check_result(result, 2 * len(a))
    assert abs(result["accuracy"] - 0.5) < 0.15, result
    lo, hi = result["ci95"]
    assert lo - 0.03 <= 0.5 <= hi + 0.03, result


def test_c2st_detects_blurred_copies(halves):
    a, b = halves
    result = metrics.c2st(a, blurred(b), seed=0)
    check_result(result, 2 * len(a))
    assert result["accuracy"] > 0.9, result


def test_c2st_detects_colour_shifted_copies(halves):
    a, b = halves
    result = metrics.c2st(torch.from_numpy(a).permute(0, 3, 1, 2), colour_shifted(b), seed=0)  # torch NCHW works too
    check_result(result, 2 * len(a))
    assert result["accuracy"] > 0.9 and result["ci95"][0] > 0.8, result


def test_c2st_balances_classes_and_is_deterministic(real_images):
    real, fake = real_images[:30], real_images[30:80]
    first = metrics.c2st(real, fake, folds=3, epochs=2, seed=1)
    assert first["n"] == 60  # the 50 fakes subsampled to 30
    assert first == metrics.c2st(real, fake, folds=3, epochs=2, seed=1)
    assert first != metrics.c2st(real, fake, folds=3, epochs=2, seed=2)


def test_c2st_rejects_bad_input(real_images):
    with pytest.raises(ValueError, match="uint8"):
        metrics.c2st(real_images[:10].astype(np.float32), real_images[10:20])
    with pytest.raises(ValueError, match="differ in size"):
        metrics.c2st(real_images[:10], real_images[10:20, :32, :32])
    with pytest.raises(ValueError, match="at least"):
        metrics.c2st(real_images[:3], real_images[3:10], folds=5)
