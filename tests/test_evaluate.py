"""metrics.py on cases with known answers, the FID feature-network paths, and
evaluate.py end to end on tiny class folders of real H&E crops."""
import base64
import io
import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

import evaluate
import metrics
from dataset.masks import NUM_CLASSES, labels_to_rgb
from report import save_loss_plot
from segmenter import CHECKPOINT_KIND as SEGMENTER_KIND
from segmenter import build_segmenter
from utils import UserError

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HE_IMAGES = ["he_500.png", "he_512_1.png", "he_512_2.png", "torchstain_source.png", "torchstain_target.png",
             "unitopatho_target_448.jpg"]
SMALL_NET = dict(widths=(8, 16, 32), features=32)


pytestmark = pytest.mark.usefixtures("one_thread")


def random_images(n, seed):
    return torch.randint(0, 256, (n, 3, 299, 299), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.fixture(scope="module")
def feature_file(tmp_path_factory):
    return metrics.save_feature_net(tmp_path_factory.mktemp("fid") / "fid_features.pt", seed=0, **SMALL_NET)


# --------------------------------------------------------------------------- known answers

def test_fid_identical_near_zero_and_different_larger():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 16, generator=g, dtype=torch.float64)
    b = torch.randn(400, 16, generator=g, dtype=torch.float64) * 1.5 + 0.5
    scale = torch.cov(a.T).trace().item()  # FID's natural scale: the total variance
    assert abs(metrics.fid(a, a)) < 1e-3 * scale
    assert metrics.fid(a, b) > 1.0
    assert metrics.fid(a[:1], b) is None


def test_kid_identical_near_zero_and_different_larger():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(300, 16, generator=g, dtype=torch.float64)
    b = torch.randn(300, 16, generator=g, dtype=torch.float64) + 1.0
    same, _ = metrics.kid(a, a, subsets=10, subset_size=100)
    different, _ = metrics.kid(a, b, subsets=10, subset_size=100)
    # The unbiased MMD^2 of a set with itself is slightly negative (diagonal terms), not exactly 0.
    assert abs(same) < 0.05 * different
    assert metrics.kid(a[:1], b) == (None, None)


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_fid_kid_match_torchmetrics_with_the_same_feature_network(feature_file):
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    net, info = metrics.load_feature_extractor(feature_file)
    assert info["network"] == metrics.FEATURES_KIND and not info["comparable_to_published_fid"]
    real, fake = random_images(40, 0), random_images(40, 1) // 2
    f_real = metrics.extract_features(net, [real[:20], real[20:]], torch.device("cpu"))
    f_fake = metrics.extract_features(net, [fake], torch.device("cpu"))
    assert f_real.shape == (40, SMALL_NET["features"]) and f_real.dtype == torch.float64

    tm_fid = FrechetInceptionDistance(feature=net)
    tm_kid = KernelInceptionDistance(feature=net, subsets=1, subset_size=40)  # whole sets: deterministic
    for metric in (tm_fid, tm_kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    assert metrics.fid(f_real, f_fake) == pytest.approx(tm_fid.compute().item(), rel=1e-3)
    assert metrics.kid(f_real, f_fake, subsets=1, subset_size=40)[0] == pytest.approx(tm_kid.compute()[0].item(), rel=1e-3)
    assert abs(metrics.fid(f_real, f_real)) < 1e-3 * torch.cov(f_real.T).trace().item()


def test_mask_scores_self_is_one_and_disjoint_is_zero():
    labels = torch.full((32, 32), 5, dtype=torch.uint8)  # background
    labels[4:12, 4:12] = 0
    labels[20:28, 20:28] = 1
    same = metrics.mask_scores(metrics.confusion_matrix(labels, labels, NUM_CLASSES))
    assert same["dice"]["Neoplastic"] == same["dice"]["Inflammatory"] == same["iou"]["Neoplastic"] == 1.0
    assert same["dice"]["Dead"] is None  # absent from both: undefined, not 1
    moved = torch.full_like(labels, 5)
    moved[14:18, 0:8] = 0  # Neoplastic elsewhere, no Inflammatory at all
    disjoint = metrics.mask_scores(metrics.confusion_matrix(moved, labels, NUM_CLASSES))
    assert disjoint["dice"]["Neoplastic"] == disjoint["iou"]["Neoplastic"] == 0.0
    assert disjoint["dice"]["Inflammatory"] == 0.0


def test_accuracy_and_balanced_accuracy():
    target = torch.tensor([0] * 8 + [1] * 2)
    pred = torch.zeros(10, dtype=torch.long)  # always the majority class
    cm = metrics.confusion_matrix(pred, target, 3)
    assert cm.tolist() == [[8, 0, 0], [2, 0, 0], [0, 0, 0]]
    assert metrics.accuracy(cm) == pytest.approx(0.8)
    assert metrics.balanced_accuracy(cm) == pytest.approx(0.5)  # class 2 absent: not averaged in


# --------------------------------------------------------------------------- feature networks

def test_fid_features_file_round_trip(feature_file, tmp_path):
    net, _ = metrics.load_feature_extractor(feature_file)
    again, _ = metrics.load_feature_extractor(metrics.save_feature_net(tmp_path / "same.pt", seed=0, **SMALL_NET))
    x = random_images(2, 3)
    assert torch.equal(net(x), again(x))
    ckpt = torch.load(feature_file, weights_only=True)
    assert ckpt["kind"] == "fid-features" and ckpt["config"] == {"widths": [8, 16, 32], "features": 32}


def test_official_inception_path_loads_a_state_dict(tmp_path):
    """The real path, with random weights in the official architecture's layout
    (torchvision's Inception3 with 1008 classes has the FID Inception's parameter names)."""
    import torchvision
    weights = tmp_path / metrics.INCEPTION_FILES[1]
    torch.save(torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False,
                                               num_classes=1008).state_dict(), weights)
    net, info = metrics.load_feature_extractor(weights)
    assert info["features"] == 2048 and info["comparable_to_published_fid"]
    assert net(random_images(1, 0)).shape == (1, 2048)


def test_unusable_weight_files_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="not found"):
        metrics.load_feature_extractor(tmp_path / "missing.pth")
    torch.save({"kind": "he-segmenter"}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="neither the FID Inception"):
        metrics.load_feature_extractor(tmp_path / "other.pt")

    def offline(target):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(metrics, "download_inception", offline)
    with pytest.raises(UserError, match="--inception-weights PATH") as err:
        metrics.load_feature_extractor(None)
    assert str(tmp_path / "hub" / "checkpoints" / metrics.INCEPTION_FILES[0]) in str(err.value)
    assert metrics.INCEPTION_URL in str(err.value)


# --------------------------------------------------------------------------- evaluate.py end to end

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """R/<class>/<name> real H&E crops, S/<class>/<name> perturbed copies, M/<name> masks
    (dark pixels as nuclei), a segmenter checkpoint and a run folder with loss curves."""
    if not all((SHARED / "he" / name).is_file() for name in HE_IMAGES):
        pytest.skip(f"real H&E images not found under {SHARED / 'he'}")
    root = tmp_path_factory.mktemp("eval")
    for i, name in enumerate(HE_IMAGES):
        group = ("HP", "TA.LG")[i % 2]
        image = Image.open(SHARED / "he" / name).convert("RGB").crop((40, 40, 136, 136))
        fake = image.filter(ImageFilter.GaussianBlur(2)).point(lambda v: min(255, v + 30))
        file = f"{Path(name).stem} (x, 1).png"  # spaces, parentheses and commas, as in UniToPatho
        for folder, im in (("R", image), ("S", fake)):
            (root / folder / group).mkdir(parents=True, exist_ok=True)
            im.save(root / folder / group / file)
        gray = np.asarray(image.convert("L"))
        labels = np.where(gray < np.percentile(gray, 15), i % 5, 5).astype(np.uint8)
        (root / "M").mkdir(exist_ok=True)
        Image.fromarray(labels_to_rgb(labels)).save(root / "M" / file)
    (root / "S" / "test.csv").write_text("not an image\n")
    Image.new("RGB", (8, 8)).save(root / "S" / "HP" / "only_synthetic.png")
    torch.manual_seed(0)
    cfg = {"encoder": "unet", "width": 4}
    torch.save({"kind": SEGMENTER_KIND, "version": 1, "model_config": cfg, "model": build_segmenter(cfg).state_dict()},
               root / "segmenter.pt")
    save_loss_plot([{"epoch": e, "loss_d": 1 / e, "loss_l1": 2 / e} for e in (1, 2, 3)], root / "run" / "loss_curves.png")
    return root


class ImageSources(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def test_evaluate_end_to_end(folders, feature_file):
    out = folders / "E"
    evaluate.main(["--real", str(folders / "R"), "--fake", str(folders / "S"), "--masks", str(folders / "M"),
                   "--segmenter", str(folders / "segmenter.pt"), "--inception-weights", str(feature_file),
                   "--run-dir", str(folders / "run"), "--out-dir", str(out), "--source-mpp", "0.25",
                   "--tile", "64", "--overlap", "16", "--kid-subsets", "5", "--batch-size", "4", "--workers", "0",
                   "--grid-rows", "2", "--precision", "fp32"])
    result = json.loads((out / "metrics.json").read_text())
    assert result["pairs"] == 6 and result["unmatched"] == {"real": 0, "fake": 1}
    assert set(result["per_class"]) == {"HP", "TA.LG"}
    for scores in [result["overall"], *result["per_class"].values()]:
        assert scores["images"] == (6 if scores is result["overall"] else 3)
        assert scores["fid"] > 0 and scores["kid_mean"] is not None and scores["kid_std"] is not None
    assert result["feature_extractor"]["network"] == "fid-features"
    fidelity = result["mask_fidelity"]
    assert fidelity["overall"]["images"] == 6 and set(fidelity["per_class"]) == {"HP", "TA.LG"}
    for side in ("synthetic", "real"):
        dice = fidelity["overall"][side]["dice"]
        assert set(dice) >= {"Neoplastic", "Background", "Nuclei"}
        assert all(v is None or 0 <= v <= 1 for v in dice.values())

    page = (out / "report.html").read_text()
    parser = ImageSources()
    parser.feed(page)
    assert len(parser.sources) == 3  # one grid per class + the loss curves
    for src in parser.sources:
        if src.startswith("data:"):
            Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
        else:
            assert (out / src).is_file()
    assert "Mask fidelity" in page and "TA.LG" in page and "not comparable" in page


def test_evaluate_identical_sets_score_zero_fid(folders, feature_file, tmp_path):
    evaluate.main(["--real", str(folders / "R"), "--fake", str(folders / "R"), "--inception-weights",
                   str(feature_file), "--out-dir", str(tmp_path), "--kid-subsets", "2", "--workers", "0"])
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert abs(result["overall"]["fid"]) < 1e-6 and result["mask_fidelity"] is None


def test_missing_inception_weights_file_is_a_clear_error(folders, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--real", str(folders / "R"), "--fake",
                           str(folders / "S"), "--out-dir", str(tmp_path), "--inception-weights",
                           str(tmp_path / "pt_inception-2015-12-05-6726825d.pth")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: --inception-weights file not found")


def test_bad_inputs_are_user_errors(folders, feature_file, tmp_path, capsys):
    common = ["--inception-weights", str(feature_file), "--out-dir", str(tmp_path)]
    cases = [(["--real", str(folders / "R"), "--fake", str(folders / "M")], "no image under --fake"),
             (["--real", str(folders / "R"), "--fake", str(folders / "S"), "--segmenter", "x.pt"], "add --masks"),
             (["--real", str(tmp_path / "nope"), "--fake", str(folders / "S")], "--real folder not found"),
             (["--real", str(folders / "R"), "--fake", str(folders / "S"), "--masks", str(folders / "run")],
              "mask(s) missing")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main(argv + common)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_evaluate_without_inception_weights_reports_the_rest(folders, tmp_path, monkeypatch, capsys):
    """An offline cluster with no Inception weights still gets C2ST, the domain
    distances and mask fidelity; FID/KID are skipped with a one-line note."""
    def offline(target):
        raise OSError("network unreachable")

    monkeypatch.setattr(metrics, "download_inception", offline)
    monkeypatch.setattr(metrics, "inception_cache_dir", lambda: tmp_path / "empty_cache")
    out = tmp_path / "E"
    evaluate.main(["--real", str(folders / "R"), "--fake", str(folders / "S"), "--masks", str(folders / "M"),
                   "--segmenter", str(folders / "segmenter.pt"), "--out-dir", str(out), "--source-mpp", "0.25",
                   "--tile", "64", "--overlap", "16", "--kid-subsets", "5", "--workers", "0", "--precision", "fp32",
                   "--c2st-crops", "4", "--c2st-size", "32"])
    err = capsys.readouterr().err
    assert err.count("note: FID/KID skipped") == 1
    result = json.loads((out / "metrics.json").read_text())
    assert result["overall"] is None and result["feature_extractor"] is None
    free = result["weight_free"]
    assert free["crops"] == 6 * 4
    for side in ("synthetic", "real_vs_real"):
        assert 0 <= free["c2st"][side]["accuracy"] <= 1
        assert free["domain"][side]["frechet"] >= 0
    assert result["mask_fidelity"]["overall"]["images"] == 6
    page = (out / "report.html").read_text()
    assert "Skipped: no Inception weights" in page and "C2ST accuracy" in page and "Mask fidelity" in page
