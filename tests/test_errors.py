"""Bad inputs: each gets one clear `error: ...` line naming the culprit, exit status 2,
and no traceback. The scripts run as real subprocesses (two at a time, to save time)."""
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()


def _tiny(data_dir, out_dir, *extra, folds=("1",)):
    return ["--data-dir", data_dir, "--out-dir", out_dir, "--train-folds", *folds, "--test-folds", folds[0],
            "--allow-overlap", "--ngf", "8", "--ndf", "8", "--epochs", "1", "--batch-size", "3", "--workers", "0",
            "--precision", "fp32", "--device", "cpu", "--wandb", "disabled", "--num-samples", "1", *extra]


def _generate(checkpoint, data_dir, out_dir, *extra):
    return ["--checkpoint", checkpoint, "--data-dir", data_dir, "--out-dir", out_dir, "--device", "cpu",
            "--precision", "fp32", *extra]


def _bad_fold(root, w, **override):
    """Fold 1 with two Colon patches, some file replaced (None: missing)."""
    image, mask, _ = w.patch(7)
    arrays = dict(images=np.stack([image, image]), masks=np.stack([mask, mask]), types=np.array(["Colon", "Colon"]))
    arrays.update(override)
    w.fold(root, 1, arrays["images"], arrays["masks"], arrays["types"])
    return w.files(root, 1)


def build_cases(tmp, w, folds, ckpt):
    """{case id: (script, argv, strings the error line must contain, stderr must be only that line)}."""
    cases = {}
    out = tmp / "out"

    missing = tmp / "no_such_dir"
    cases["missing-data-dir"] = ("train_pannuke.py", _tiny(missing, out), [str(missing)], True)

    root = tmp / "no_masks"
    w.folds(root, {1: ["Colon", "Colon"], 2: ["Colon"]})
    gone = w.files(root, 2).masks
    gone.unlink()
    cases["fold-without-masks"] = ("train_pannuke.py", _tiny(root, out, folds=("1", "2")), [str(gone)], True)

    files = _bad_fold(tmp / "chw_images", w, images=np.zeros((2, 3, 256, 256)))
    cases["images-wrong-shape"] = ("train_pannuke.py", _tiny(tmp / "chw_images", out), [str(files.images)], True)

    files = _bad_fold(tmp / "five_channels", w, masks=np.zeros((2, 256, 256, 5)))
    cases["masks-wrong-channels"] = ("train_pannuke.py", _tiny(tmp / "five_channels", out), [str(files.masks)], True)

    files = _bad_fold(tmp / "types_len", w, types=np.array(["Colon"] * 3))
    cases["types-wrong-length"] = ("train_pannuke.py", _tiny(tmp / "types_len", out), [str(files.types)], True)

    cases["tissue-matches-nothing"] = ("train_pannuke.py", _tiny(folds, out, "--tissue", "Brain"),
                                       ["'Brain'", str(folds), "Colon"], True)

    truncated = tmp / "truncated.pt"
    data = ckpt.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    cases["truncated-checkpoint"] = ("train_pannuke.py", _tiny(folds, out, "--resume", truncated), [str(truncated)], True)
    cases["truncated-checkpoint-test.py"] = ("test.py", _generate(truncated, folds, out), [str(truncated)], True)

    npy = tmp / "not_a_checkpoint.npy"
    np.save(npy, np.arange(10))
    cases["npy-as-checkpoint"] = ("train_pannuke.py", _tiny(folds, out, "--resume", npy), [str(npy)], True)

    foreign = tmp / "foreign.pt"
    torch.save({"foo": 1}, foreign)
    cases["foreign-checkpoint"] = ("train_pannuke.py", _tiny(folds, out, "--resume", foreign), [str(foreign)], True)
    cases["foreign-checkpoint-test.py"] = ("test.py", _generate(foreign, folds, out), [str(foreign)], True)

    cases["other-architecture"] = ("train_pannuke.py", _tiny(folds, out, "--resume", ckpt, "--ngf", "16"),
                                   [str(ckpt), "--ngf"], True)
    # A checkpoint whose weights do not fit the architecture it declares.
    lying = tmp / "lying.pt"
    state = torch.load(ckpt, weights_only=True)
    state["model_config"] = dict(state["model_config"], ngf=16)
    torch.save(state, lying)
    cases["weights-do-not-fit-test.py"] = ("test.py", _generate(lying, folds, out), [str(lying)], True)

    missing_ckpt = tmp / "missing.pt"
    cases["missing-checkpoint-test.py"] = ("test.py", _generate(missing_ckpt, folds, out), [str(missing_ckpt)], True)
    cases["negative-batch-test.py"] = ("test.py", _generate(ckpt, folds, out, "--batch-size", "-1"),
                                       ["--batch-size must be at least 1"], True)
    segmenter = ["--data-dir", folds, "--out-dir", out, "--train-folds", "1", "--test-folds", "1", "--epochs", "1",
                 "--workers", "0", "--device", "cpu", "--wandb", "disabled", "--lr", "inf"]
    cases["infinite-lr-train_segmenter.py"] = ("train_segmenter.py", segmenter, ["--lr must be a finite number"], True)

    if not CUDA:
        cases["cuda-without-gpu"] = ("train_pannuke.py", _tiny(folds, out, "--device", "cuda"), ["cuda"], True)

    # A truncated PNG in the converted layout's training split: it fails inside the data
    # loader (in the training loop), also from a worker process.
    conv = tmp / "converted"
    w.converted(conv)
    png = conv / "train" / "data" / "a_001.png"
    data = png.read_bytes()
    png.write_bytes(data[: len(data) // 3])
    for workers in ("0", "1"):
        argv = _tiny(conv, tmp / f"out_png{workers}") + ["--workers", workers]
        cases[f"truncated-png-workers{workers}"] = ("train_pannuke.py", argv, [str(png)], False)
    # Each case its own --out-dir: two run at a time, and a folder is claimed before its data is read.
    for case, (script, argv, needles, only) in cases.items():
        cases[case] = (script, [tmp / f"out_{case}" if a == out else a for a in argv], needles, only)
    return cases


CASE_IDS = ["missing-data-dir", "fold-without-masks", "images-wrong-shape", "masks-wrong-channels",
            "types-wrong-length", "tissue-matches-nothing", "truncated-checkpoint", "truncated-checkpoint-test.py",
            "npy-as-checkpoint", "foreign-checkpoint", "foreign-checkpoint-test.py", "other-architecture",
            "weights-do-not-fit-test.py", "missing-checkpoint-test.py", "negative-batch-test.py",
            "infinite-lr-train_segmenter.py",
            "cuda-without-gpu", "truncated-png-workers0", "truncated-png-workers1"]


@pytest.fixture(scope="module")
def error_runs(tmp_path_factory, pannuke_folds, pannuke_writer, trained_checkpoint, run_script):
    """Every case built and run once (two subprocesses at a time)."""
    cases = build_cases(tmp_path_factory.mktemp("errors"), pannuke_writer, pannuke_folds, trained_checkpoint)
    assert set(cases) <= set(CASE_IDS)

    def run(item):
        case, (script, argv, _, _) = item
        return case, run_script(script, *argv, timeout=300)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(pool.map(run, cases.items()))
    return {case: (cases[case], results[case]) for case in cases}


@pytest.mark.parametrize("case", CASE_IDS)
def test_clean_error(error_runs, case):
    if case not in error_runs:
        pytest.skip("CUDA is available here")
    (script, argv, needles, alone), res = error_runs[case]
    assert res.returncode == 2, f"exit {res.returncode}\n{res.stderr[-3000:]}"
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], res.stderr[-3000:]
    if alone:
        assert lines == errors, f"more than the error line on stderr:\n{res.stderr}"
    print(errors[0])
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
