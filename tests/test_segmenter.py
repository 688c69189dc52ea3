"""The nucleus segmenter: metrics, loss, model, training CLI (resume, torchrun),
tiled inference, Macenko stain normalisation and make_masks.py.

Training data is conftest's `pannuke_folds` (plain numpy, official fold layout);
UniToPatho fixtures use real CSV rows and real H&E from ../shared/data (skipped
when that folder is absent)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dataset.masks import BACKGROUND, CLASS_NAMES, NUM_CLASSES, PALETTE, rgb_to_labels
from dataset.pannuke import PanNukeFolds
from dataset.unitopatho_mask import read_mask
from metrics import confusion_matrix, dice_iou, mask_scores
from segmenter import (CHECKPOINT_KIND, Segmenter, StainNormalizer, load_encoder_weights, load_segmenter,
                       optical_density, predict_probs, read_segmenter_checkpoint, segment_image, segmentation_loss)
from utils import UserError, atomic_save_torch

ROOT = Path(__file__).resolve().parents[1]

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
UTP_CSV_DIR = SHARED / "unitopatho" / "800"
HE_DIR = SHARED / "he"
HAVE_SHARED = (UTP_CSV_DIR / "train.csv").is_file() and HE_DIR.is_dir()
needs_shared = pytest.mark.skipif(not HAVE_SHARED, reason="../shared/data (UniToPatho CSVs and H&E images) not present")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
TINY = ["--width", "4", "--batch-size", "4", "--lr", "1e-2", "--workers", "0", "--precision", "fp32", "--device", "cpu"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: tiny convolutions gain nothing from more, and on a shared
    2-core machine spinning OpenMP threads made these tests ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- fixtures

def train_args(data_dir, out_dir, epochs, *extra):
    return ["--data-dir", str(data_dir), "--train-folds", "1", "2", "--test-folds", "3", "--out-dir", str(out_dir),
            "--epochs", str(epochs), *TINY, *extra]


@pytest.fixture(scope="module")
def seg_checkpoint(pannuke_folds, tmp_path_factory):
    """A 2-epoch run on the Colon patches of folds 1-2 (6), scored on fold 3's (2)."""
    import train_segmenter
    out = tmp_path_factory.mktemp("seg")
    train_segmenter.main(train_args(pannuke_folds, out, 2))
    return out / "checkpoints" / "last.pt"


def gan_checkpoint(path):
    from gan import CHECKPOINT_KIND as GAN_KIND
    from gan import build_generator
    cfg = dict(ngf=4, ndf=4, norm="batch", dropout=True)
    atomic_save_torch({"kind": GAN_KIND, "version": 1, "generator": build_generator(cfg).state_dict(),
                       "model_config": cfg}, path)
    return path


UTP_ROWS = {"train": [0, 333, 4638], "test": [0, 500]}  # a few real rows, several classes
HE_SOURCES = ["he_512_1.png", "he_512_2.png", "he_500.png", "torchstain_source.png", "unitopatho_target_448.jpg"]


@pytest.fixture
def utp_dir(tmp_path):
    """UniToPatho 800 layout: real CSV rows with their real file names, 300 x 300
    images cut from real H&E."""
    if not HAVE_SHARED:
        pytest.skip("../shared/data (UniToPatho CSVs and H&E images) not present")
    root = tmp_path / "800"
    root.mkdir()
    sources = iter(HE_SOURCES)
    for split, rows in UTP_ROWS.items():
        table = pd.read_csv(UTP_CSV_DIR / f"{split}.csv", index_col=0).iloc[rows]
        table.to_csv(root / f"{split}.csv")
        for label, name in zip(table["top_label_name"], table["image_id"]):
            with Image.open(HE_DIR / next(sources)) as im:
                (root / label).mkdir(exist_ok=True)
                im.convert("RGB").crop((0, 0, 300, 300)).save(root / label / name)
    return root


def expected_masks(utp_dir, out_dir):
    found = []
    for split, folder in (("train", "training"), ("test", "test")):
        table = pd.read_csv(utp_dir / f"{split}.csv", index_col=0)
        found += [(utp_dir / label / name, out_dir / folder / "masks" / name)
                  for label, name in zip(table["top_label_name"], table["image_id"])]
    return found


# --------------------------------------------------------------------------- metrics and loss

def test_dice_iou_hand_made_cases():
    target = torch.tensor([[0, 0, 0, 0], [5, 5, 5, 5], [1, 1, 5, 5]])
    # Perfect: every class present scores 1; classes absent from both are undefined (NaN).
    dice, iou = dice_iou(confusion_matrix(target, target, NUM_CLASSES))
    assert np.allclose(dice[[0, 1, 5]], 1) and np.allclose(iou[[0, 1, 5]], 1)
    assert np.isnan(dice[[2, 3, 4]]).all() and np.isnan(iou[[2, 3, 4]]).all()
    # Disjoint: class 0 predicted exactly where it is absent and vice versa -> 0.
    pred = torch.where(target == 0, 5, torch.where(target == 5, 0, target))
    dice, iou = dice_iou(confusion_matrix(pred, target, NUM_CLASSES))
    assert dice[0] == 0 and iou[0] == 0 and dice[5] == 0 and iou[5] == 0 and dice[1] == 1
    # Partial: class 0 true on 4 px, predicted on 2 of them + 2 background px:
    # TP 2, FP 2, FN 2 -> Dice 4/8 = 0.5, IoU 2/6.
    pred = torch.tensor([[0, 0, 5, 5], [0, 0, 5, 5], [1, 1, 5, 5]])
    dice, iou = dice_iou(confusion_matrix(pred, target, NUM_CLASSES))
    assert dice[0] == pytest.approx(0.5) and iou[0] == pytest.approx(1 / 3)
    # Background: TP 4, FP 2, FN 2 -> Dice 8/12, IoU 4/8.
    assert dice[5] == pytest.approx(2 / 3) and iou[5] == pytest.approx(0.5)
    # A class predicted but absent from the reference scores 0, not NaN.
    pred = torch.tensor([[0, 0, 0, 0], [5, 5, 5, 3], [1, 1, 5, 5]])
    dice, iou = dice_iou(confusion_matrix(pred, target, NUM_CLASSES))
    assert dice[3] == 0 and iou[3] == 0


def test_summary_handles_absent_classes_and_nuclei():
    target = torch.tensor([0, 0, 1, 5, 5, 5])
    pred = torch.tensor([0, 1, 1, 5, 5, 0])
    m = mask_scores(confusion_matrix(pred, target, NUM_CLASSES))
    assert m["dice"]["Dead"] is None and m["iou"]["Connective"] is None  # undefined -> null in JSON
    # Any nucleus vs background: TP 3, FP 1, FN 0 -> Dice 6/7.
    assert m["dice"]["Nuclei"] == pytest.approx(6 / 7)
    # Means over the defined types only: Neoplastic 2/4 (TP 1, FP 1, FN 1) and Inflammatory 2/3 (TP 1, FP 1).
    assert m["dice"]["Neoplastic"] == pytest.approx(1 / 2) and m["dice"]["Inflammatory"] == pytest.approx(2 / 3)
    assert m["mean_dice_types"] == pytest.approx(7 / 12)
    json.dumps(m, allow_nan=False)


def test_loss_drops_in_a_few_steps(pannuke_folds):
    torch.manual_seed(0)
    data = PanNukeFolds(pannuke_folds, [1], "Colon")
    labels, images = map(torch.stack, zip(*(data[i] for i in range(len(data)))))
    x, target = images[..., :128, :128].float() / 255, labels[..., :128, :128].long()
    model = Segmenter("unet", 4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    losses = []
    for _ in range(15):
        loss = segmentation_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_loss_is_cross_entropy_plus_dice():
    target = torch.randint(0, NUM_CLASSES, (2, 8, 8))
    perfect = torch.nn.functional.one_hot(target, NUM_CLASSES).movedim(-1, 1).float() * 50
    assert segmentation_loss(perfect, target).item() < 1e-3
    assert segmentation_loss(torch.zeros(2, NUM_CLASSES, 8, 8), target).item() > np.log(NUM_CLASSES)


# --------------------------------------------------------------------------- model

@pytest.mark.parametrize("encoder,width", [("unet", 4), ("resnet18", 4)])
def test_model_keeps_size(encoder, width):
    model = Segmenter(encoder, width).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 96)).shape == (1, NUM_CLASSES, 64, 96)


def test_encoder_weights_load_torchvision_files(tmp_path):
    import torchvision
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")  # the layout of torchvision's ImageNet files
    model = Segmenter("resnet18", 4)
    load_encoder_weights(model, tmp_path / "resnet18.pth")
    assert torch.equal(model.encoder.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    with pytest.raises(UserError, match="do not fit"):
        load_encoder_weights(Segmenter("unet", 4), tmp_path / "resnet18.pth")


# --------------------------------------------------------------------------- training CLI

def test_train_writes_metrics_and_resumes_exactly(pannuke_folds, seg_checkpoint, tmp_path, capsys):
    import train_segmenter
    # seg_checkpoint ran 2 epochs uninterrupted; here 1 epoch, then resume to 2.
    out = tmp_path / "run"
    train_segmenter.main(train_args(pannuke_folds, out, 1))
    table = capsys.readouterr().out
    assert all(name in table for name in CLASS_NAMES) and "Dice" in table and "IoU" in table
    last = out / "checkpoints" / "last.pt"
    # Width, batch size, lr and folds come from the checkpoint: only where and on what to run is given.
    train_segmenter.main(["--data-dir", str(pannuke_folds), "--out-dir", str(out), "--epochs", "2", "--workers", "0",
                          "--precision", "fp32", "--device", "cpu", "--resume", str(last)])
    assert "--width 4, --batch-size 4, --lr 0.01" in capsys.readouterr().out
    ckpt = torch.load(last, weights_only=True)
    whole = torch.load(seg_checkpoint, weights_only=True)
    assert ckpt["kind"] == CHECKPOINT_KIND and ckpt["epoch"] == 2
    assert ckpt["model_config"] == {"encoder": "unet", "width": 4, "label_set": "pannuke"}
    assert {"optimizer", "scaler", "rng", "history"} <= set(ckpt)
    for k, v in whole["model"].items():
        assert torch.allclose(ckpt["model"][k].float(), v.float(), atol=1e-6), k
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert metrics["classes"] == list(CLASS_NAMES)
    last_epoch = metrics["history"][-1]
    assert set(last_epoch["dice"]) == set(CLASS_NAMES) | {"Nuclei"} and set(last_epoch["iou"]) == set(last_epoch["dice"])
    assert last_epoch["train_loss"] < metrics["history"][0]["train_loss"]


def test_train_under_torchrun(pannuke_folds, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_segmenter.py",
           *train_args(pannuke_folds, out, 1)]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert not any(k.startswith("module.") for k in ckpt["model"])
    assert json.loads((out / "metrics.json").read_text())["history"][0]["epoch"] == 1


def test_checkpoint_kinds_are_not_interchangeable(seg_checkpoint, tmp_path, capsys):
    import make_masks
    import train_segmenter
    from gan import load_generator
    gan = gan_checkpoint(tmp_path / "gan.pt")
    with pytest.raises(UserError, match="pix2pix GAN checkpoint"):
        read_segmenter_checkpoint(gan)
    with pytest.raises(SystemExit) as exit_info:
        make_masks.main(["--checkpoint", str(gan), "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "m")])
    assert exit_info.value.code == 2 and "not a nucleus segmenter" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_segmenter.main(train_args(tmp_path, tmp_path / "r", 1, "--resume", str(gan)))
    assert "pix2pix GAN checkpoint" in capsys.readouterr().err
    with pytest.raises(UserError, match="he-segmenter"):
        load_generator(seg_checkpoint, torch.device("cpu"))


# --------------------------------------------------------------------------- tiled inference

class Pointwise(torch.nn.Module):
    """A 1x1 convolution: its output at a pixel depends on that pixel only, so tiling must change nothing."""
    size_multiple = 1

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, NUM_CLASSES, 1)

    def forward(self, x):
        return self.conv(x)


def test_tiled_blending_matches_one_pass():
    torch.manual_seed(0)
    model, image = Pointwise(), torch.rand(3, 150, 97)
    whole = model(image[None]).softmax(1)[0]
    tiled = predict_probs(model, image, tile=64, overlap=16, batch_size=3)
    assert tiled.shape == whole.shape and torch.allclose(tiled, whole, atol=1e-6)
    assert torch.allclose(predict_probs(model, image[:, :40, :50], tile=64, overlap=16), whole[:, :40, :50], atol=1e-6)


def test_tiles_are_independent_of_batching(seg_checkpoint):
    model, _ = load_segmenter(seg_checkpoint, torch.device("cpu"))
    image = torch.rand(3, 100, 120)
    one = predict_probs(model, image, tile=64, overlap=16, batch_size=1)
    many = predict_probs(model, image, tile=64, overlap=16, batch_size=16)
    assert torch.allclose(one, many, atol=1e-5)


def test_segment_image_resamples_to_model_scale_and_back():
    calls = []

    class RedIsNeoplastic(Pointwise):
        """Neoplastic where the red channel is high, background elsewhere; records tile sizes."""

        def __init__(self):
            super().__init__()
            with torch.no_grad():
                self.conv.weight.zero_()
                self.conv.bias.fill_(-100)
                self.conv.weight[0, 0] = 20
                self.conv.bias[0], self.conv.bias[BACKGROUND] = -10, 0

        def forward(self, x):
            calls.append(tuple(x.shape[-2:]))
            return super().forward(x)

    image = np.zeros((101, 60, 3), np.uint8)
    image[20:60, 10:40, 0] = 255
    labels = segment_image(RedIsNeoplastic(), image, torch.device("cpu"), scale=0.4415 / 0.25, tile=256, overlap=32)
    assert labels.shape == (101, 60) and labels.dtype == np.uint8
    assert calls == [(256, 256)]  # 101 x 60 px -> 178 x 106 px at the model's scale, padded to one tile
    # Back at the image's size with the square's edges where they were, to the pixel.
    assert np.array_equal(labels, np.where(image[..., 0] > 0, 0, BACKGROUND))


# --------------------------------------------------------------------------- stain normalisation

def stain_stats(image):
    """Macenko's estimate for an image: stain vectors (3, 2: H, E) and 99th-percentile concentrations (2,)."""
    import torchstain
    fitted = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    fitted.fit(image)
    return fitted.HERef, fitted.maxCRef


def concentration_percentiles(image, stains):
    """H and E concentrations of the stained pixels in a fixed stain basis: 50th and 99th percentiles."""
    od = optical_density(image).reshape(-1, 3)
    od = od[(od >= 0.15).all(1)]
    return np.percentile(np.linalg.lstsq(stains, od.T, rcond=None)[0], [50, 99], axis=1)


@needs_shared
def test_macenko_moves_stains_towards_the_reference():
    pytest.importorskip("torchstain")
    source = np.asarray(Image.open(HE_DIR / "torchstain_source.png").convert("RGB"))
    target = np.asarray(Image.open(HE_DIR / "torchstain_target.png").convert("RGB"))
    normalized = StainNormalizer(HE_DIR / "torchstain_target.png")(source)
    assert normalized.shape == source.shape and normalized.dtype == np.uint8
    (he_s, c_s), (he_t, c_t), (he_n, c_n) = stain_stats(source), stain_stats(target), stain_stats(normalized)
    distance = lambda a, b: np.abs(a - b).sum()  # noqa: E731
    # Hematoxylin's stain vector and both stains' 99th-percentile concentrations, each
    # estimated afresh on every image, move towards the target's.
    assert distance(he_n[:, 0], he_t[:, 0]) < 0.5 * distance(he_s[:, 0], he_t[:, 0])
    assert distance(c_n, c_t) < 0.5 * distance(c_s, c_t)
    # And in the target's stain basis, the H and E concentration distributions do too.
    target_pct = concentration_percentiles(target, he_t)
    assert (distance(concentration_percentiles(normalized, he_t), target_pct)
            < 0.7 * distance(concentration_percentiles(source, he_t), target_pct))


def test_stain_normalizer_leaves_glass_alone():
    pytest.importorskip("torchstain")
    glass = np.full((64, 64, 3), 245, np.uint8)
    glass[:2, :2] = (120, 40, 140)  # a speck of stain is not enough to estimate stain vectors
    assert StainNormalizer()(glass) is glass


# --------------------------------------------------------------------------- make_masks.py

def mask_args(ckpt, utp_dir, out_dir, *extra):
    return ["--checkpoint", str(ckpt), "--data-dir", str(utp_dir), "--out-dir", str(out_dir), "--tile", "128",
            "--overlap", "32", "--device", "cpu", "--precision", "fp32", "--workers", "0", *extra]


def test_make_masks_writes_one_palette_mask_per_image_and_resumes(seg_checkpoint, utp_dir, tmp_path, capsys):
    import make_masks
    out = tmp_path / "masks"
    make_masks.main(mask_args(seg_checkpoint, utp_dir, out))
    pairs = expected_masks(utp_dir, out)
    assert sorted(p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".run.")) == sorted(m for _, m in pairs)
    for image_path, mask_path in pairs:
        rgb = np.asarray(Image.open(mask_path).convert("RGB"))
        with Image.open(image_path) as im:
            assert rgb.shape == (im.height, im.width, 3)
        labels = rgb_to_labels(rgb, tolerance=0, source=str(mask_path))  # exact palette colours only
        assert np.array_equal(PALETTE[labels], rgb)
        assert np.array_equal(read_mask(mask_path, image_path), labels)  # as train_utp.py reads it
    stamps = {m: m.stat().st_mtime_ns for _, m in pairs}
    capsys.readouterr()
    make_masks.main(mask_args(seg_checkpoint, utp_dir, out))
    assert "0 written" in capsys.readouterr().out
    assert {m: m.stat().st_mtime_ns for _, m in pairs} == stamps
    # A removed mask is the only one made again.
    pairs[0][1].unlink()
    make_masks.main(mask_args(seg_checkpoint, utp_dir, out))
    assert "1 written" in capsys.readouterr().out and pairs[0][1].is_file()


def test_make_masks_with_stain_normalisation_and_torchrun(seg_checkpoint, utp_dir, tmp_path):
    pytest.importorskip("torchstain")
    out = tmp_path / "masks_stain"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "make_masks.py",
           *mask_args(seg_checkpoint, utp_dir, out, "--stain-normalize", "--reference",
                      str(HE_DIR / "torchstain_target.png"))]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pairs = expected_masks(utp_dir, out)
    assert sorted(p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".run.")) == sorted(m for _, m in pairs)


def test_truncated_image_is_a_clear_error(seg_checkpoint, utp_dir, tmp_path):
    image_path, _ = expected_masks(utp_dir, tmp_path)[0]
    data = image_path.read_bytes()
    image_path.write_bytes(data[:len(data) // 2])
    proc = subprocess.run([sys.executable, "make_masks.py", *mask_args(seg_checkpoint, utp_dir, tmp_path / "m")],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: cannot decode image") and str(image_path) in errors[0]


# --------------------------------------------------------------------------- stopping and killing (loop.Loop)

def _start_segmenter(*args):
    return subprocess.Popen([sys.executable, "train_segmenter.py", *args], cwd=ROOT, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _mid_epoch(path):
    if not path.is_file():
        return None
    ckpt = torch.load(path, weights_only=True)  # atomic rename: whatever is there is whole
    return ckpt if ckpt["batches_done"] > 0 else None


@pytest.fixture(scope="module")
def batch1_reference(pannuke_folds, tmp_path_factory):
    """2 epochs at batch 1 (6 steps an epoch), uninterrupted."""
    import train_segmenter
    out = tmp_path_factory.mktemp("seg_batch1")
    train_segmenter.main(train_args(pannuke_folds, out, 2, "--batch-size", "1"))
    return torch.load(out / "checkpoints" / "last.pt", weights_only=True)


def assert_same_run(ckpt, reference):
    assert (ckpt["epoch"], ckpt["batches_done"], ckpt["step"]) == (reference["epoch"], 0, reference["step"])
    for key in ("model", "optimizer"):
        for k, v in reference[key].items() if key == "model" else reference[key]["state"].items():
            got = ckpt[key][k] if key == "model" else ckpt[key]["state"][k]
            if isinstance(v, dict):
                assert all(torch.equal(got[n], t) for n, t in v.items()), f"{key}.{k}"
            else:
                assert torch.equal(got, v), f"{key}.{k}"
    assert [h["epoch"] for h in ckpt["history"]] == [1, 2]
    assert ckpt["history"][-1]["train_loss"] == pytest.approx(reference["history"][-1]["train_loss"], rel=1e-6)


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_stopped_or_killed_mid_epoch_resumes_as_if_uninterrupted(how, pannuke_folds, batch1_reference, tmp_path):
    """SIGTERM saves where the run stands and exits 143 without a traceback; after SIGKILL the
    last --save-every-steps checkpoint is whole. Either way the resumed run equals the uninterrupted one."""
    import signal

    import train_segmenter
    from conftest import wait_for
    out = tmp_path / "run"
    last = out / "checkpoints" / "last.pt"
    proc = _start_segmenter(*train_args(pannuke_folds, out, 2, "--batch-size", "1", "--save-every-steps", "1"))
    try:
        wait_for(lambda: _mid_epoch(last), proc, 240, "a mid-epoch checkpoint")
        proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        stdout, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    if how == "sigterm":
        assert proc.returncode == 143, err[-2000:]
        assert "Traceback" not in err and "stopped by signal" in stdout + err
    else:
        assert proc.returncode == -signal.SIGKILL
    stopped = torch.load(last, weights_only=True)
    assert (stopped["epoch"], stopped["batches_done"]) < (2, 0), "nothing left to resume"
    train_segmenter.main(train_args(pannuke_folds, out, 2, "--batch-size", "1", "--resume", str(last)))
    assert_same_run(torch.load(last, weights_only=True), batch1_reference)
