"""Evaluation metrics as small functions, plus the feature networks FID/KID run on.

Distribution metrics take (N, D) feature matrices (float64), so the features of a
set are computed once and reused for the overall score and every class subset:
    fid(real, fake)                Frechet distance between Gaussian fits (Heusel et al. 2017)
    kid(real, fake, ...)           mean/std of the unbiased cubic-kernel MMD^2 over random subsets
                                   (Binkowski et al. 2018; torchmetrics' poly_mmd)
Label metrics work on confusion matrices (rows: true class, columns: predicted):
    confusion_matrix(pred, target, num_classes)
    accuracy(cm), balanced_accuracy(cm)
    dice_iou(cm), mask_scores(cm, labels_set), format_mask_table(scores)
                                   per-class Dice/IoU of nucleus maps

Weight-free realism, for clusters (and machines) that cannot download Inception:
    frechet_distance(a, b), kernel_distance(a, b, ...)
                                   the same distances in any feature space, e.g. the
                                   pooled encoder features of a segmenter trained on the
                                   user's real tiles (a "domain" distance, not FID/KID)
    c2st(real, fake, ...)          classifier two-sample test: held-out accuracy of a
                                   small CNN trained from scratch (0.5 = indistinguishable)
    tile_c2st(real, fake, ...)     the same on whole tiles at the config.py C2ST_* settings,
                                   with a t-interval over folds
    real_vs_real_split(n)          two disjoint halves, for every metric's real-vs-real floor
    prdc(real, fake, k)            precision, recall, density, coverage (Naeem et al. 2020):
                                   fidelity and diversity as separate numbers
Statistics over repeated runs:
    t_interval(values)             mean and t-interval of independent values (e.g. C2ST folds)
    paired_difference(a, b)        mean per-seed difference a - b with its t-interval
Instance metrics:
    panoptic_quality(pred, true)   PQ pooled over all maps
    pq_per_image(pred, true)       CoNIC's binary "pq": mean over images
    mpq_plus(...)                  CoNIC's "mpq+": per class pooled over images, mean over classes

Feature networks (`load_feature_extractor`), both mapping uint8 (N, 3, 299, 299) to (N, D):
  - the FID Inception (TF 2015-12-05 weights, 2048-d pool features) as torchmetrics
    uses it (torch-fidelity's FeatureExtractorInceptionV3); scores comparable to
    published FIDs;
  - a 'fid-features' file: a small randomly initialised Inception-shaped network
    (`save_feature_net`), for tests and for runs without the official weights.
    Its scores rank models on the same data but are not comparable to published FIDs.
"""
import math
import socket
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from config import (C2ST_BATCH_SIZE, C2ST_EPOCHS, C2ST_FOLDS, C2ST_LR, C2ST_WIDTHS, FEATURE_C2ST_FOLDS,
                    FEATURE_C2ST_WEIGHT_DECAY, PRDC_K)
from dataset.masks import CONIC, PANNUKE
from report import fmt
from runtime import load_model_state
from utils import UserError, atomic_save_torch, safe_torch_load

INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
# torch-fidelity/torchmetrics and pytorch-fid cache the same TF weights under these names.
INCEPTION_FILES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
INCEPTION_SIZE = 299
FEATURES_KIND = "fid-features"
FEATURES_VERSION = 1


# --------------------------------------------------------------------------- distribution metrics

def fid(real, fake):
    """FID = |mu_r - mu_f|^2 + tr(S_r + S_f - 2 (S_r S_f)^(1/2)), in float64.

    tr((S_r S_f)^(1/2)) is the sum of square roots of the eigenvalues of S_r S_f (real
    and non-negative up to rounding for PSD S_r, S_f), as torchmetrics computes it."""
    real, fake = torch.as_tensor(real, dtype=torch.float64), torch.as_tensor(fake, dtype=torch.float64)
    if len(real) < 2 or len(fake) < 2:
        return None
    mu_r, mu_f = real.mean(0), fake.mean(0)
    cov_r, cov_f = torch.cov(real.T), torch.cov(fake.T)
    covmean_trace = torch.linalg.eigvals(cov_r @ cov_f).sqrt().real.sum()
    return float((mu_r - mu_f).square().sum() + cov_r.trace() + cov_f.trace() - 2 * covmean_trace)


def kid(real, fake, subsets=100, subset_size=1000, seed=0):
    """(mean, std) of KID over `subsets` random subsets of min(subset_size, N) images
    from each side; (None, None) with fewer than 2 images on a side."""
    from torchmetrics.image.kid import poly_mmd

    real, fake = torch.as_tensor(real, dtype=torch.float64), torch.as_tensor(fake, dtype=torch.float64)
    m = min(len(real), len(fake), subset_size)
    if m < 2:
        return None, None
    g = torch.Generator().manual_seed(seed)
    values = torch.stack([poly_mmd(real[torch.randperm(len(real), generator=g)[:m]],
                                   fake[torch.randperm(len(fake), generator=g)[:m]]) for _ in range(subsets)])
    return float(values.mean()), float(values.std(unbiased=False))


# --------------------------------------------------------------------------- label metrics

def confusion_matrix(pred, target, num_classes):
    """(C, C) int64 counts; rows are the true class, columns the predicted one."""
    pred, target = torch.as_tensor(pred).reshape(-1).long(), torch.as_tensor(target).reshape(-1).long()
    return torch.bincount(target * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def accuracy(cm):
    cm = torch.as_tensor(cm, dtype=torch.float64)
    return float(cm.diag().sum() / cm.sum().clamp(min=1))


def balanced_accuracy(cm):
    """Mean recall over the classes present in the reference (sklearn's definition)."""
    cm = torch.as_tensor(cm, dtype=torch.float64)
    support = cm.sum(1)
    present = support > 0
    return float((cm.diag()[present] / support[present]).mean()) if present.any() else None


def dice_iou(cm):
    """Per-class Dice = 2TP / (2TP + FP + FN) and IoU = TP / (TP + FP + FN) from a
    confusion matrix summed over the whole evaluation set (not averaged per image).

    A class absent from both reference and prediction (TP + FP + FN = 0) has no
    defined score: NaN, left out of means. A class never present but predicted
    somewhere scores 0, as does one present but never predicted."""
    cm = torch.as_tensor(cm, dtype=torch.float64)
    tp = cm.diag()
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    return (2 * tp / (2 * tp + fp + fn)).numpy(), (tp / (tp + fp + fn)).numpy()


def nuclei_cm(cm, background=PANNUKE.background):
    """Collapse to 2 classes, any nucleus vs background (type confusions count as hits)."""
    cm = torch.as_tensor(cm)
    nuc = [c for c in range(len(cm)) if c != background]
    return torch.tensor([[cm[nuc][:, nuc].sum().item(), cm[nuc, background].sum().item()],
                         [cm[background, nuc].sum().item(), cm[background, background].item()]])


def _num(x):
    return None if np.isnan(x) else float(x)  # NaN -> null in JSON


def _mean_defined(values):
    return None if np.isnan(values).all() else float(np.nanmean(values))


def mask_scores(cm, labels_set=PANNUKE):
    """Per-class Dice/IoU of nucleus maps from a confusion matrix summed over a whole
    set, 'Nuclei' (any type vs background), and means over the nucleus types ignoring
    undefined classes (None). train_segmenter.py, evaluate.py and study.py all score
    with it, so their numbers compare."""
    dice, iou = dice_iou(cm)
    dice_n, iou_n = dice_iou(nuclei_cm(cm, labels_set.background))
    types = labels_set.nucleus_classes
    cm = torch.as_tensor(cm)
    names = labels_set.class_names
    return {"dice": {n: _num(v) for n, v in zip(names, dice)} | {"Nuclei": _num(dice_n[0])},
            "iou": {n: _num(v) for n, v in zip(names, iou)} | {"Nuclei": _num(iou_n[0])},
            "mean_dice_types": _mean_defined(dice[types]), "mean_iou_types": _mean_defined(iou[types]),
            "pixel_accuracy": _num(cm.diag().sum().item() / max(1, cm.sum().item()))}


def format_mask_table(scores):
    rows = [f"{'class':<14}{'Dice':>7}{'IoU':>7}"]
    rows += [f"{n:<14}{fmt(scores['dice'][n]):>7}{fmt(scores['iou'][n]):>7}" for n in scores["dice"]]
    rows.append(f"{'mean (types)':<14}{fmt(scores['mean_dice_types']):>7}{fmt(scores['mean_iou_types']):>7}")
    return "\n".join(rows)


# --------------------------------------------------------------------------- feature networks

class MixedBlock(nn.Module):
    """A reduced Inception module: 1x1, 3x3, double-3x3 and pool-1x1 branches, concatenated."""

    def __init__(self, cin, cout):
        super().__init__()
        c = cout // 4
        self.b1 = nn.Conv2d(cin, c, 1)
        self.b3 = nn.Sequential(nn.Conv2d(cin, c, 1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))
        self.b5 = nn.Sequential(nn.Conv2d(cin, c, 1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                                nn.Conv2d(c, cout - 3 * c, 3, padding=1))
        self.bp = nn.Conv2d(cin, c, 1)

    def forward(self, x):
        pooled = self.bp(F.avg_pool2d(x, 3, stride=1, padding=1))
        return F.relu(torch.cat([self.b1(x), self.b3(x), self.b5(x), pooled], 1))


class FeatureNet(nn.Module):
    """Inception-shaped stand-in: strided stem, mixed blocks with max-pool reductions,
    global average pool. Same interface as the FID Inception: uint8 images in (scaled
    as (x - 128) / 128), one feature vector per image out."""

    def __init__(self, widths=(16, 32, 64), features=128):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, stride=2), nn.ReLU(), nn.MaxPool2d(3, stride=2))
        self.blocks = nn.ModuleList(MixedBlock(cin, cout) for cin, cout in zip(widths, widths[1:]))
        self.head = nn.Conv2d(widths[-1], features, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # He init keeps activations at unit scale through the ReLUs
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.stem((x.float() - 128) / 128)
        for block in self.blocks:
            x = F.max_pool2d(block(x), 3, stride=2)
        return self.head(x).mean((2, 3))


def save_feature_net(path, seed=0, widths=(16, 32, 64), features=128):
    """Write a randomly initialised FeatureNet as a 'fid-features' file:
    {'kind', 'version', 'config': {'widths', 'features'}, 'state_dict'}, loadable
    with weights_only=True. E.g. python -c "import metrics; metrics.save_feature_net('fid_features.pt')"."""
    config = {"widths": list(widths), "features": int(features)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FeatureNet(**config)
    atomic_save_torch({"kind": FEATURES_KIND, "version": FEATURES_VERSION, "config": config, "seed": seed,
                       "state_dict": net.state_dict()}, path)
    return Path(path)


def inception_cache_dir():
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_or_fetch_inception():
    """The FID Inception weights from the torch hub cache, downloading them there if
    absent; a UserError that says how to supply them when that fails."""
    cache = inception_cache_dir()
    for name in INCEPTION_FILES:
        if (cache / name).is_file():
            return cache / name
    target = cache / INCEPTION_FILES[0]
    try:
        download_inception(target)
    except OSError as exc:  # URLError, timeouts and disk errors are all OSErrors
        raise UserError(
            f"the FID Inception weights are not in {cache} and could not be downloaded ({exc}). "
            f"Fetch {INCEPTION_URL} on a machine with internet access and either copy it to {target} "
            f"or pass its path with --inception-weights PATH (pytorch-fid's {INCEPTION_FILES[1]} is the same "
            f"network and works too). Without them, --inception-weights can be a 'fid-features' file from "
            f"metrics.save_feature_net (scores not comparable to published FIDs).") from None
    return target


def download_inception(target):
    target.parent.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)  # a firewalled network should fail, not hang
    try:
        torch.hub.download_url_to_file(INCEPTION_URL, str(target), progress=True)
    finally:
        socket.setdefaulttimeout(previous)


def load_feature_extractor(path=None):
    """(network, description) for FID/KID features. `path`: the official Inception
    weights (a state dict), or a 'fid-features' file; None looks in the torch hub cache
    (downloading when possible). Both file kinds are read with weights_only=True."""
    if path is None:
        path = find_or_fetch_inception()
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--inception-weights file not found: {path} (expected the FID Inception weights "
                        f"{INCEPTION_FILES[0]} from {INCEPTION_URL}, or a 'fid-features' file from "
                        f"metrics.save_feature_net)")
    state = safe_torch_load(path, "Inception weights")
    if isinstance(state, dict) and state.get("kind") == FEATURES_KIND:
        net = FeatureNet(**state["config"])
        load_model_state(net, state["state_dict"], path, f"fid-features network ({state['config']})")
        info = {"network": FEATURES_KIND, "weights": str(path), "config": state["config"], "features": net.head.out_channels,
                "comparable_to_published_fid": False}
    elif isinstance(state, dict) and "Mixed_7c.branch_pool.conv.weight" in state:
        from torchmetrics.image.fid import NoTrainInceptionV3
        try:
            # The file already loaded with weights_only=True above, so torch-fidelity's
            # own unrestricted torch.load of it runs no code.
            net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                     feature_extractor_weights_path=str(path))
        except RuntimeError as exc:
            raise UserError(f"{path} does not fit the FID Inception: {str(exc).splitlines()[0]}") from None
        info = {"network": "inception-v3-fid (torch-fidelity / torchmetrics)", "weights": str(path), "features": 2048,
                "comparable_to_published_fid": True}
    else:
        found = state.get("kind", "a dict without Inception keys") if isinstance(state, dict) else type(state).__name__
        raise UserError(f"{path} is neither the FID Inception weights nor a {FEATURES_KIND!r} file (found {found!r})")
    return net.eval().requires_grad_(False), info


@torch.no_grad()
def extract_features(net, batches, device):
    """Stack the float64 features of uint8 (B, 3, 299, 299) batches. Always fp32
    inside, with TF32 convolutions off too: FID is sensitive to feature precision."""
    net = net.to(device)
    cudnn = torch.backends.cudnn
    with cudnn.flags(enabled=cudnn.enabled, deterministic=cudnn.deterministic, allow_tf32=False):
        return torch.cat([net(batch.to(device)).double().cpu() for batch in batches])



# --------------------------------------------------------------------------- weight-free realism metrics
# Distances in a "domain feature space" (e.g. pooled encoder features of a segmenter
# trained on the user's own real tiles) and a classifier two-sample test on pixels.
# None needs downloaded weights. Every metric should be reported with its real-vs-real
# floor: the same metric between two disjoint halves of the real set (real_vs_real_split).

def _check_features(feats_a, feats_b):
    a, b = torch.as_tensor(feats_a, dtype=torch.float64), torch.as_tensor(feats_b, dtype=torch.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected two (N, D) feature arrays with the same D, got {tuple(a.shape)} and {tuple(b.shape)}")
    return a, b


def frechet_distance(feats_a, feats_b):
    """Frechet distance between Gaussians fitted to two (N, D) feature arrays (numpy or
    torch): |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), in float64.

    The maths of `fid`, which it calls (eigenvalues of S_a S_b, square roots, real
    parts: tiny imaginary parts from rounding are dropped). It is FID only when the
    features are the FID Inception's; on a domain feature space it is a distance in
    that space, not comparable to published FIDs. None when a side has < 2 rows."""
    return fid(*_check_features(feats_a, feats_b))


def kernel_distance(feats_a, feats_b, subsets=100, subset_size=1000, seed=0):
    """(mean, std) over `subsets` random subsets of the unbiased MMD^2 with the cubic
    polynomial kernel k(x, y) = (x.y / D + 1)^3 between two (N, D) feature arrays, each
    subset min(subset_size, N_a, N_b) rows a side. The estimator of `kid` (which it
    calls); it is KID only when the features are the FID Inception's. About 0 (either
    sign) for sets from one distribution; (None, None) when a side has < 2 rows."""
    return kid(*_check_features(feats_a, feats_b), subsets=subsets, subset_size=subset_size, seed=seed)


def real_vs_real_split(n, seed=0):
    """Two disjoint, equally long index arrays (n // 2 each, random, sorted) splitting
    range(n): score a metric between the halves of the real set for its floor."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    half = n // 2
    return np.sort(perm[:half]), np.sort(perm[half:2 * half])


def prdc(real, fake, k=PRDC_K):
    """Precision, recall, density and coverage (Naeem et al. 2020) of two (N, D) feature
    arrays, with k-nearest-neighbour balls: each point's ball reaches its k-th nearest
    neighbour in its own set (itself not counted), and "inside" means strictly closer.

    precision: share of fakes inside some real ball ("looks real");
    recall:    share of reals inside some fake ball ("covers the real variety");
    density:   real balls holding each fake, / k, averaged over fakes (1 for two sets
               from one distribution; above 1 where fakes crowd dense real regions);
    coverage:  share of reals whose ball holds at least one fake.
    Euclidean distances in float64. Needs 1 <= k < the size of each set."""
    real, fake = _check_features(real, fake)
    if not 1 <= k < min(len(real), len(fake)):
        raise ValueError(f"prdc: need 1 <= k < the size of each set, got k={k} with {len(real)} real "
                         f"and {len(fake)} fake rows")

    def distances(a, b):  # exact differences, not the |a|^2 - 2ab + |b|^2 shortcut, so ties stay ties
        return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")

    # k + 1: every point is its own nearest neighbour, at distance 0.
    real_radius = distances(real, real).kthvalue(k + 1, dim=1).values
    fake_radius = distances(fake, fake).kthvalue(k + 1, dim=1).values
    real_to_fake = distances(real, fake)
    in_real_ball = real_to_fake < real_radius[:, None]
    return {"precision": float(in_real_ball.any(0).double().mean()),
            "recall": float((real_to_fake < fake_radius[None, :]).any(1).double().mean()),
            "density": float(in_real_ball.sum(0).double().mean() / k),
            "coverage": float((real_to_fake.min(1).values < real_radius).double().mean())}


def wilson_interval(successes, n, z=1.96):
    """Wilson score interval (lo, hi) of a binomial proportion (95% for z = 1.96)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


class C2STNet(nn.Module):
    """The C2ST classifier: one stride-2 conv-BN-ReLU block per entry of `widths`, global
    average pool, one logit (about 15k parameters for the default widths). Sees uint8
    images as (x - 128) / 128, so colour and sharpness differences are both visible."""

    def __init__(self, widths=(8, 16, 32, 32)):
        super().__init__()
        widths = (3, *widths)
        self.features = nn.Sequential(*[layer for cin, cout in zip(widths, widths[1:]) for layer in (
            nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())])
        self.head = nn.Linear(widths[-1], 1)

    def forward(self, x):
        # channels_last: about 1.5x faster for these small convolutions on CPU
        x = ((x.float() - 128) / 128).contiguous(memory_format=torch.channels_last)
        return self.head(self.features(x).mean((2, 3))).squeeze(1)


def _c2st_images(images, what):
    """uint8 (N, H, W, 3) numpy or (N, 3, H, W) torch -> uint8 (N, 3, H, W) tensor."""
    if isinstance(images, torch.Tensor):
        x = images.detach().cpu()
    else:
        x = torch.from_numpy(np.ascontiguousarray(images))
        if x.ndim == 4:
            x = x.permute(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"c2st: {what} must be uint8 images, numpy (N, H, W, 3) or torch (N, 3, H, W); "
                         f"got {x.dtype} {tuple(images.shape)}")
    return x.contiguous()


def c2st(real, fake, folds=5, epochs=15, seed=0, device="cpu", batch_size=32, lr=1e-2, widths=(8, 16, 32, 32)):
    """Classifier two-sample test (Lopez-Paz & Oquab 2017): how well a small CNN trained
    from scratch tells real from fake images it has not seen.

    real, fake: uint8 images, numpy (N, H, W, 3) or torch (N, 3, H, W), all one size.
    The larger set is subsampled (seeded) to the size of the smaller; stratified
    `folds`-fold cross-validation trains a fresh C2STNet per fold (Adam with a one-cycle
    schedule peaking at `lr`, `epochs` epochs, random horizontal/vertical flips),
    re-estimates its BatchNorm statistics on the fold's training images with the final
    weights, and predicts the held-out fold.
    Returns {"accuracy": pooled held-out accuracy, "ci95": Wilson 95% interval over the
    pooled predictions, "folds": per-fold accuracies, "n": number of held-out
    predictions (2 x the balanced set size)}. 0.5 means indistinguishable to this
    classifier, 1.0 fully separable. Deterministic for a seed on CPU. 200 + 200 64x64
    images take under 10 s on one CPU thread (small convolutions: one thread is
    usually fastest, torch.set_num_threads(1)); the cost grows with N x H x W."""
    real, fake = _c2st_images(real, "real"), _c2st_images(fake, "fake")
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(f"c2st: real and fake images differ in size: {tuple(real.shape[1:])} vs {tuple(fake.shape[1:])}")
    g = torch.Generator().manual_seed(seed)
    m = min(len(real), len(fake))
    if m < folds or folds < 2:
        raise ValueError(f"c2st: need folds >= 2 and at least `folds` images a side, got {len(real)} real, "
                         f"{len(fake)} fake, folds={folds}")
    # Balance, then split each class into `folds` random parts (stratified k-fold).
    real = real[torch.randperm(len(real), generator=g)[:m]]
    fake = fake[torch.randperm(len(fake), generator=g)[:m]]
    x = torch.cat([real, fake]).to(device)
    y = torch.cat([torch.ones(m), torch.zeros(m)]).to(device)
    parts = [torch.cat(p) for p in zip(torch.randperm(m, generator=g).tensor_split(folds),
                                       (torch.randperm(m, generator=g) + m).tensor_split(folds))]
    correct, fold_acc = torch.zeros(2 * m, dtype=torch.bool), []
    for fold, test_idx in enumerate(parts):
        train_idx = torch.cat([p for j, p in enumerate(parts) if j != fold])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + fold)
            net = C2STNet(widths).to(device, memory_format=torch.channels_last)
        # Batches of one are dropped (BatchNorm needs two samples); one-cycle steps count the rest.
        steps = sum(1 for b in train_idx.split(batch_size) if len(b) >= 2)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, epochs * steps))
        net.train()
        for _ in range(epochs):
            order = train_idx[torch.randperm(len(train_idx), generator=g)]
            for batch in order.split(batch_size):
                if len(batch) < 2:
                    continue
                xb = x[batch]
                flips = torch.rand(2, len(batch), generator=g).lt(0.5)
                for dim, flip in ((3, flips[0]), (2, flips[1])):  # random horizontal and vertical flips
                    idx = flip.nonzero().squeeze(1).to(device)
                    xb[idx] = xb[idx].flip(dim)
                loss = F.binary_cross_entropy_with_logits(net(xb), y[batch])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
        with torch.no_grad():
            # Running BatchNorm averages lag the fast-moving weights: recompute them with the
            # final weights (cumulative average over shuffled, near-equal training batches).
            for module in net.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.reset_running_stats()
                    module.momentum = None
            order = train_idx[torch.randperm(len(train_idx), generator=g)]
            for b in order.tensor_split(math.ceil(len(order) / 256)):
                net(x[b])
            net.eval()
            pred = torch.cat([net(x[b]) > 0 for b in test_idx.split(256)])
        hit = (pred == y[test_idx].bool()).cpu()
        correct[test_idx.cpu()] = hit
        fold_acc.append(float(hit.float().mean()))
    n, hits = len(correct), int(correct.sum())
    return {"accuracy": hits / n, "ci95": wilson_interval(hits, n), "folds": fold_acc, "n": n}


def tile_c2st(real, fake, widths=C2ST_WIDTHS, epochs=C2ST_EPOCHS, folds=C2ST_FOLDS, batch_size=C2ST_BATCH_SIZE,
              lr=C2ST_LR, seed=0, device="cpu"):
    """The C2ST of whole tiles at the config.py C2ST_* settings: `c2st`'s classifier and
    training, with `widths` (capacity), `epochs` and `folds` fixed in one place so that
    the calibration ladder and every generator are judged by one configuration.

    Pass whole tiles, not crops. Score the ladder's degraded real tiles beside each
    generator, both against the same real tiles, to read where the generator sits.
    Returns {"accuracy": mean of the fold accuracies, "ci95": its 95% t-interval over
    the folds (t_interval, clipped to [0, 1]), "folds", "n": held-out predictions,
    "config": the settings used}."""
    result = c2st(real, fake, folds=folds, epochs=epochs, seed=seed, device=device, batch_size=batch_size, lr=lr,
                  widths=widths)
    accuracy, ci95 = t_interval(result["folds"])
    return {"accuracy": accuracy, "ci95": (max(0.0, ci95[0]), min(1.0, ci95[1])), "folds": result["folds"],
            "n": result["n"], "config": {"widths": list(widths), "epochs": epochs, "folds": folds,
                                         "batch_size": batch_size, "lr": lr}}


def feature_c2st(real, other, folds=FEATURE_C2ST_FOLDS, weight_decay=FEATURE_C2ST_WEIGHT_DECAY, seed=0):
    """A classifier two-sample test in a feature space: L2-regularised logistic regression (L-BFGS) on
    (N, D) features, standardised on each fold's training part, stratified `folds`-fold cross-validation
    on balanced sets. A linear probe of pooled features sees what the features carry (tissue, stain,
    nucleus appearance) and not every lost pixel of detail, so it keeps range where the pixel C2ST
    saturates. Returns {"accuracy": mean fold accuracy, "ci95": its t-interval clipped to [0, 1],
    "folds", "n", "config"}. Deterministic for a seed."""
    real, other = (torch.as_tensor(np.asarray(x), dtype=torch.float64) for x in (real, other))
    g = torch.Generator().manual_seed(seed)
    m = min(len(real), len(other))
    if m < folds or folds < 2:
        raise ValueError(f"feature_c2st: need folds >= 2 and at least `folds` vectors a side, got {len(real)} and "
                         f"{len(other)}, folds={folds}")
    x = torch.cat([real[torch.randperm(len(real), generator=g)[:m]], other[torch.randperm(len(other), generator=g)[:m]]])
    y = torch.cat([torch.ones(m), torch.zeros(m)]).double()
    parts = [torch.cat(p) for p in zip(torch.randperm(m, generator=g).tensor_split(folds),
                                       (torch.randperm(m, generator=g) + m).tensor_split(folds))]
    fold_acc = []
    for fold, test_idx in enumerate(parts):
        train_idx = torch.cat([p for j, p in enumerate(parts) if j != fold])
        mean, std = x[train_idx].mean(0), x[train_idx].std(0) + 1e-8
        z = (x - mean) / std
        w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

        def loss():
            opt.zero_grad()
            value = nn.functional.binary_cross_entropy_with_logits(z[train_idx] @ w + b, y[train_idx])
            value = value + weight_decay * w.square().sum()
            value.backward()
            return value

        opt.step(loss)
        with torch.no_grad():
            fold_acc.append(float(((z[test_idx] @ w + b > 0).double() == y[test_idx]).double().mean()))
    accuracy, ci95 = t_interval(fold_acc)
    return {"accuracy": accuracy, "ci95": (max(0.0, ci95[0]), min(1.0, ci95[1])), "folds": fold_acc, "n": 2 * m,
            "config": {"folds": folds, "weight_decay": weight_decay}}


# --------------------------------------------------------------------------- statistics over repeated runs

def t_interval(values):
    """(mean, 95% Student-t interval (lo, hi)) of independent values, e.g. one score per
    seed or per fold: mean +- t(0.975, n - 1) x sd / sqrt(n), sd with n - 1. The
    interval is None for fewer than two values, the mean too for none."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n == 0:
        return None, None
    mean = float(values.mean())
    if n < 2:
        return mean, None
    from scipy.stats import t

    half = float(t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n))
    return mean, (mean - half, mean + half)


def paired_difference(a, b):
    """Mean of the per-seed differences a[i] - b[i] with its 95% t-interval
    (t_interval of the differences, not of a and b apart: the seed's share of the
    noise cancels in each pair). Pairs where either side is None (an undefined score)
    are left out. Returns {"mean", "ci95", "n": pairs used, "excludes_zero": whether
    the interval lies wholly above or below 0 (False without an interval)}."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference: need one value per seed on each side, got {len(a)} and {len(b)}")
    differences = [x - y for x, y in zip(a, b) if x is not None and y is not None]
    mean, ci95 = t_interval(differences)
    return {"mean": mean, "ci95": ci95, "n": len(differences),
            "excludes_zero": ci95 is not None and (ci95[0] > 0 or ci95[1] < 0)}


# --------------------------------------------------------------------------- instance metrics

def _instance_stacks(*maps):
    """Integer maps of one shape, (H, W) or (N, H, W), as (N, H, W) arrays."""
    maps = [np.asarray(m) for m in maps]
    if len({m.shape for m in maps}) != 1 or maps[0].ndim not in (2, 3):
        raise ValueError(f"expected (H, W) or (N, H, W) maps of one shape, got {' and '.join(str(m.shape) for m in maps)}")
    return [m[None] if m.ndim == 2 else m for m in maps]


def panoptic_quality(pred_instances, true_instances):
    """Panoptic quality (Kirillov et al. 2019) of nucleus instance maps, as HoVer-Net and CoNIC score them.

    pred_instances, true_instances: integer instance maps of one shape, (H, W) or a stack
    (N, H, W); 0 is no instance and ids are local to each map. A predicted and a true
    instance match when their IoU is above 0.5 (so each has at most one match). Pooling
    the matches of all maps: PQ = (sum of matched IoUs) / (TP + FP/2 + FN/2) = SQ x DQ, with
    SQ the mean matched IoU and DQ = TP / (TP + FP/2 + FN/2). Returns {"pq", "sq", "dq",
    "tp", "fp", "fn"}; pq and dq are None when neither side has an instance, sq when
    nothing matched."""
    pred, true = _instance_stacks(pred_instances, true_instances)
    tp = fp = fn = 0
    iou_sum = 0.0
    for p, t in zip(pred.astype(np.int64), true.astype(np.int64)):
        p_ids, p_area = np.unique(p[p > 0], return_counts=True)
        t_ids, t_area = np.unique(t[t > 0], return_counts=True)
        both = (p > 0) & (t > 0)
        (p_hit, t_hit), overlap = np.unique(np.stack([p[both], t[both]]), axis=1, return_counts=True)
        iou = overlap / (p_area[np.searchsorted(p_ids, p_hit)] + t_area[np.searchsorted(t_ids, t_hit)] - overlap)
        matched = iou > 0.5
        tp += int(matched.sum())
        fp += len(p_ids) - int(matched.sum())
        fn += len(t_ids) - int(matched.sum())
        iou_sum += float(iou[matched].sum())
    denominator = tp + fp / 2 + fn / 2
    return {"pq": iou_sum / denominator if denominator else None, "sq": iou_sum / tp if tp else None,
            "dq": tp / denominator if denominator else None, "tp": tp, "fp": fp, "fn": fn}


def _zero_if_undefined(pq):
    # CoNIC's code divides by TP + FP/2 + FN/2 + 1e-6: with no instance on either side PQ is 0, not undefined.
    return 0.0 if pq is None else pq


def pq_per_image(pred_instances, true_instances):
    """CoNIC's binary panoptic quality "pq" (TissueImageAnalytics/CoNIC compute_stats.py):
    the PQ of each (H, W) map on its own, averaged over the maps, with every nucleus
    counted whatever its class. A map with no instance on either side scores 0, as there.

    panoptic_quality on the same stack pools the matches of all maps first, which weighs
    each nucleus equally instead of each image: the two differ whenever images differ in
    nucleus count and quality."""
    pred, true = _instance_stacks(pred_instances, true_instances)
    return float(np.mean([_zero_if_undefined(panoptic_quality(p, t)["pq"]) for p, t in zip(pred, true)]))


def mpq_plus(pred_instances, pred_classes, true_instances, true_classes, labels_set=CONIC):
    """CoNIC's multi-class panoptic quality "mpq+": for each nucleus class, the PQ of the
    instances of that class (an instance map masked by its class map), pooled over all
    maps; then the mean over the classes. A class with no instance on either side in
    the whole set scores 0 and still counts in the mean, as in CoNIC's compute_stats.py.

    All four arrays: integer maps of one shape, (H, W) or (N, H, W). Returns {"mpq+",
    "per_class": {class name: pooled PQ}}."""
    pred_instances, pred_classes, true_instances, true_classes = _instance_stacks(
        pred_instances, pred_classes, true_instances, true_classes)
    per_class = {labels_set.class_names[c]: _zero_if_undefined(panoptic_quality(
        np.where(pred_classes == c, pred_instances, 0), np.where(true_classes == c, true_instances, 0))["pq"])
        for c in labels_set.nucleus_classes}
    return {"mpq+": float(np.mean(list(per_class.values()))), "per_class": per_class}
