"""classify_utp.py on a tiny UniToPatho fixture: real rows and file names from the
official CSVs, small images written at those names."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import classify_utp

REPO = Path(__file__).resolve().parents[1]
SHARED_UTP = Path(__file__).resolve().parents[2] / "shared" / "data" / "unitopatho" / "800"
FAST = ["--image-size", "32", "--batch-size", "4", "--epochs", "1", "--workers", "0", "--precision", "fp32"]


pytestmark = pytest.mark.usefixtures("one_thread")


def write_split(rows, root, split, seed):
    """rows -> root/split.csv (official format, index column included) and small images
    whose colour depends on the class, so there is something to learn."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows.reset_index(drop=True).to_csv(root / f"{split}.csv")
    for label, name, code in zip(rows["top_label_name"], rows["image_id"], rows["top_label"]):
        image = np.clip(rng.normal(40 * code + 30, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
        (root / label).mkdir(exist_ok=True)
        Image.fromarray(image).save(root / label / name)


@pytest.fixture(scope="module")
def utp(tmp_path_factory):
    if not (SHARED_UTP / "train.csv").is_file():
        pytest.skip(f"UniToPatho CSVs not found under {SHARED_UTP}")
    root = tmp_path_factory.mktemp("utp")
    splits = {}
    for split, per_class in (("train", 2), ("test", 2)):
        rows = pd.read_csv(SHARED_UTP / f"{split}.csv", index_col=0)
        splits[split] = rows.groupby("top_label_name", sort=True).head(per_class)
        write_split(splits[split], root / "800", split, seed=len(split))
    # Synthetic training images: one per class, drawn from training rows (as generated from training masks).
    write_split(splits["train"].groupby("top_label_name").head(1), root / "synthetic", "train", seed=7)
    return root


def run(utp, out, *extra):
    classify_utp.main(["--data-dir", str(utp / "800"), "--out-dir", str(out), *FAST, *extra])
    return json.loads((out / "metrics.json").read_text())


def test_real_and_synthetic_runs_take_the_same_steps(utp, tmp_path):
    real = run(utp, tmp_path / "real")
    synth = run(utp, tmp_path / "synth", "--synthetic-dir", str(utp / "synthetic"))
    for result in (real, synth):
        assert 0 <= result["accuracy"] <= 1 and 0 <= result["balanced_accuracy"] <= 1
        cm = np.array(result["confusion_matrix"])
        assert cm.shape == (6, 6) and cm.sum() == result["test_images"] == 12
        assert cm.sum(1).tolist() == [2] * 6
    assert (tmp_path / "real" / "confusion_matrix.png").is_file()
    assert torch.load(tmp_path / "real" / "classifier.pt", weights_only=True)["kind"] == "utp-classifier"
    assert real["train"]["real_images"] == synth["train"]["real_images"] == 12
    assert real["train"]["synthetic_images"] == 0 and synth["train"]["synthetic_images"] == 6
    assert real["train"]["optimizer_steps"] == synth["train"]["optimizer_steps"] == 3  # 12 draws / batch 4


def test_grade_target_skips_rows_without_grade(utp, tmp_path):
    result = run(utp, tmp_path, "--target", "grade")
    assert result["classes"] == ["LG", "HG"]
    assert result["test_images"] == 8  # HP and NORM rows (grade -1) left out
    assert result["train"]["real_images"] == 8 and np.array(result["confusion_matrix"]).shape == (2, 2)


def test_imagenet_weights_file_loads_before_the_head_is_replaced(utp, tmp_path, capsys):
    import torchvision
    weights = tmp_path / "resnet18-f37072fd.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)  # ImageNet layout, 1000 classes
    assert run(utp, tmp_path / "out", "--weights", str(weights))["train"]["weights"] == str(weights)
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "resnet34.pth")
    with pytest.raises(SystemExit):
        run(utp, tmp_path / "bad", "--weights", str(tmp_path / "resnet34.pth"))
    assert "does not fit this ResNet-18" in capsys.readouterr().err


def test_resize_cache_gives_the_same_items_and_results(utp, tmp_path):
    from dataset.unitopatho import UniToPatho
    real, synthetic = UniToPatho(utp / "800", "train"), UniToPatho(utp / "synthetic", "train")
    plain = classify_utp.ClassifierImages([real, synthetic], 32, augment=True)
    cached = classify_utp.ClassifierImages([real, synthetic], 32, augment=True, cache_dir=tmp_path / "cache")
    # Item 12 is the synthetic twin of a real image (same file name): each has its own entry.
    for item in [(0, 5), (12, 6), (0, 5), (12, 6), 3]:  # repeats read the memory-mapped entry
        a, b = plain[item], cached[item]
        assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert real.names[0] == synthetic.names[0]
    assert isinstance(cached.resized(real, 0), np.memmap)
    assert len(list((tmp_path / "cache").glob("*.resized.npy"))) == 3
    # Another size is another entry, not a stale hit.
    bigger = classify_utp.ClassifierImages([real], 40, augment=False, cache_dir=tmp_path / "cache")
    assert bigger[0][0].shape == (3, 40, 40) and len(list((tmp_path / "cache").glob("*.npy"))) == 4

    uncached_run = run(utp, tmp_path / "plain")
    cached_run = run(utp, tmp_path / "cached", "--cache-dir", str(tmp_path / "run-cache"))
    assert cached_run["confusion_matrix"] == uncached_run["confusion_matrix"]
    assert cached_run["balanced_accuracy"] == uncached_run["balanced_accuracy"]
    assert len(list((tmp_path / "run-cache").glob("*.resized.npy"))) >= 12  # at least the 12 test images


def test_balanced_sampler_balances_classes_and_splits_draws_between_processes():
    targets = np.array([0] * 90 + [1] * 9 + [2] * 1)
    draws = [list(classify_utp.BalancedSampler(targets, 3000, 1, 0, seed=0))]
    frequencies = np.bincount(targets[[i for i, _ in draws[0]]], minlength=3) / 3000
    assert np.allclose(frequencies, 1 / 3, atol=0.04)
    shards = [list(classify_utp.BalancedSampler(targets, 3000, 2, r, seed=0)) for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == sorted(draws[0])  # the same draws, dealt out
    again = classify_utp.BalancedSampler(targets, 3000, 1, 0, seed=0)
    again.set_epoch(1)
    assert list(again) != draws[0]


def test_errors_are_clear(utp, tmp_path, capsys):
    test_only = tmp_path / "test_only"
    shutil.copytree(utp / "synthetic", test_only)
    os.replace(test_only / "train.csv", test_only / "test.csv")
    leaky = tmp_path / "leaky"
    rows = pd.read_csv(utp / "800" / "test.csv", index_col=0)
    write_split(rows.head(3), leaky, "train", seed=0)
    cases = [(["--data-dir", str(tmp_path / "nope")], "--data-dir not found"),
             (["--data-dir", str(leaky)], "test.csv"),
             (["--synthetic-dir", str(tmp_path / "nope")], "--synthetic-dir not found"),
             (["--synthetic-dir", str(test_only)], "would leak the test set"),
             (["--synthetic-dir", str(leaky)], "share their file name with the real test split")]
    for extra, message in cases:
        argv = ["--data-dir", str(utp / "800"), "--out-dir", str(tmp_path / "out"), *FAST, *extra]
        with pytest.raises(SystemExit) as exit_info:
            classify_utp.main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_torchrun_two_processes(utp, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(REPO / "classify_utp.py"),
                           "--data-dir", str(utp / "800"), "--synthetic-dir", str(utp / "synthetic"),
                           "--out-dir", str(tmp_path), *FAST],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert result["train"]["world_size"] == 2
    assert result["train"]["optimizer_steps"] == 2  # 6 draws per process / batch 4
    assert np.array(result["confusion_matrix"]).sum() == 12  # every test image, gathered from both


# --------------------------------------------------------------------------- runs on loop.Loop: refusal, stop, kill

LONG = ["--image-size", "32", "--batch-size", "2", "--epochs", "2", "--workers", "0", "--precision", "fp32",
        "--wandb", "disabled"]


def test_a_finished_run_is_not_replaced_silently(utp, tmp_path, capsys):
    """Case 6: a re-run keeps classifier.pt and metrics.json; a folder of epoch checkpoints
    without last.pt is not taken for an empty one."""
    out = tmp_path / "out"
    run(utp, out)
    kept = {name: (out / name).read_bytes() for name in ("classifier.pt", "metrics.json")}
    with pytest.raises(SystemExit) as exit_info:
        run(utp, out)
    assert exit_info.value.code == 2
    assert "already holds a run" in capsys.readouterr().err
    assert kept == {name: (out / name).read_bytes() for name in kept}
    assert run(utp, out, "--overwrite")["test_images"] == 12
    epochs_only = tmp_path / "epochs_only"
    (epochs_only / "checkpoints").mkdir(parents=True)
    (epochs_only / "checkpoints" / "epoch_0001.pt").write_bytes(b"a run's")
    with pytest.raises(SystemExit):
        run(utp, epochs_only)
    assert "did not write" in capsys.readouterr().err
    assert (epochs_only / "checkpoints" / "epoch_0001.pt").read_bytes() == b"a run's"


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_stopped_or_killed_classifier_resumes_as_if_uninterrupted(how, utp, tmp_path):
    import signal

    from conftest import wait_for
    argv = ["--data-dir", str(utp / "800"), *LONG]
    classify_utp.main([*argv, "--out-dir", str(tmp_path / "straight")])
    out = tmp_path / "run"
    last = out / "checkpoints" / "last.pt"

    def mid_epoch():
        return last.is_file() and torch.load(last, weights_only=True)["batches_done"] > 0

    proc = subprocess.Popen([sys.executable, str(REPO / "classify_utp.py"), *argv, "--out-dir", str(out),
                             "--save-every-steps", "1"], cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_for(mid_epoch, proc, 240, "a mid-epoch checkpoint")
        proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        stdout, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == (143 if how == "sigterm" else -signal.SIGKILL), err[-2000:]
    assert "Traceback" not in err
    stopped = torch.load(last, weights_only=True)
    assert (stopped["epoch"], stopped["batches_done"]) < (2, 0), "nothing left to resume"
    classify_utp.main([*argv, "--out-dir", str(out), "--resume", str(last)])
    resumed = json.loads((out / "metrics.json").read_text())
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert resumed["confusion_matrix"] == straight["confusion_matrix"]
    assert resumed["train"]["loss_history"] == straight["train"]["loss_history"]
    a, b = (torch.load(p / "classifier.pt", weights_only=True)["model"] for p in (out, tmp_path / "straight"))
    assert all(torch.equal(a[k], b[k]) for k in a)
