"""Evaluation metrics as small functions, plus the feature networks FID/KID run on.

Distribution metrics take (N, D) feature matrices (float64), so the features of a
set are computed once and reused for the overall score and every class subset:
    fid(real, fake)                Frechet distance between Gaussian fits (Heusel et al. 2017)
    kid(real, fake, ...)           mean/std of the unbiased cubic-kernel MMD^2 over random subsets
                                   (Binkowski et al. 2018; torchmetrics' poly_mmd)
Label metrics work on confusion matrices (rows: true class, columns: predicted):
    confusion_matrix(pred, target, num_classes)
    accuracy(cm), balanced_accuracy(cm)
    mask_scores(cm)                per-class Dice/IoU of nucleus maps (segmenter.summarize)

Feature networks (`load_feature_extractor`), both mapping uint8 (N, 3, 299, 299) to (N, D):
  - the FID Inception (TF 2015-12-05 weights, 2048-d pool features) as torchmetrics
    uses it (torch-fidelity's FeatureExtractorInceptionV3); scores comparable to
    published FIDs;
  - a 'fid-features' file: a small randomly initialised Inception-shaped network
    (`save_feature_net`), for tests and for runs without the official weights.
    Its scores rank models on the same data but are not comparable to published FIDs.
"""
import socket
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from runtime import load_model_state
from segmenter import summarize
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


def mask_scores(cm):
    """Per-class Dice and IoU from a 6-class confusion matrix summed over a whole set,
    plus 'Nuclei' (any type vs background) and means over the five nucleus types;
    classes absent from both sides are None. The segmenter's own definition, so
    numbers here match train_segmenter.py's."""
    return summarize(cm)


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

