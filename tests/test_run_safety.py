"""A run is never lost or mixed silently: re-running a training command over an
existing run is refused (train_pannuke.py, train_segmenter.py), impossible options
and bad data values fail in one line before any work, SIGTERM is honoured at the
next step, and every training script logs to wandb the same way."""

import numpy as np
import pytest
import torch
from conftest import main_error_line as error_line
from conftest import sigterm_when

CKPT = ("checkpoints", "last.pt")


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture
def finished_run(tmp_path, pannuke_folds, train_in_process):
    """A one-epoch run in tmp_path / 'run' (one step: fold 3's two Colon patches)."""
    out = tmp_path / "run"
    train_in_process(train_in_process.argv(pannuke_folds, out, train_folds=(3,), test_folds=(3,)))
    return out


def test_rerun_without_resume_is_refused_and_keeps_the_run(finished_run, pannuke_folds, train_in_process, capsys):
    last = finished_run.joinpath(*CKPT)
    before = last.read_bytes()
    capsys.readouterr()
    argv = train_in_process.argv(pannuke_folds, finished_run, epochs=2, train_folds=(3,), test_folds=(3,))
    line = error_line(capsys, lambda: train_in_process(argv))
    assert f"--resume {last}" in line and "--overwrite" in line
    assert last.read_bytes() == before


def test_overwrite_deletes_the_old_runs_output_and_nothing_else(finished_run, pannuke_folds, train_in_process):
    folds = dict(train_folds=(3,), test_folds=(3,))
    train_in_process(train_in_process.argv(pannuke_folds, finished_run, "--resume", str(finished_run.joinpath(*CKPT)),
                                           epochs=2, **folds))
    stale = finished_run / "samples" / "epoch_0002.png"
    notes = finished_run / "samples" / "notes.txt"
    notes.write_text("the user's, not the run's")
    assert stale.is_file()
    train_in_process(train_in_process.argv(pannuke_folds, finished_run, "--overwrite", **folds))
    ckpt = load(finished_run.joinpath(*CKPT))
    assert (ckpt["epoch"], ckpt["step"]) == (1, 1)
    assert not stale.exists() and notes.read_text() == "the user's, not the run's"
    assert (finished_run / "samples" / "epoch_0001.png").is_file()


def test_segmenter_rerun_without_resume_is_refused(tmp_path, pannuke_folds, capsys):
    import train_segmenter
    out = tmp_path / "seg"
    argv = ["--data-dir", str(pannuke_folds), "--out-dir", str(out), "--train-folds", "3", "--test-folds", "3",
            "--allow-overlap", "--epochs", "1", "--batch-size", "2", "--width", "4", "--workers", "0", "--device", "cpu",
            "--precision", "fp32"]
    train_segmenter.main(argv)
    last = out.joinpath(*CKPT)
    before = last.read_bytes()
    capsys.readouterr()
    line = error_line(capsys, lambda: train_segmenter.main([*argv[:-6], "--epochs", "2", *argv[-6:]]))
    assert f"--resume {last}" in line and "--overwrite" in line
    assert last.read_bytes() == before


@pytest.mark.parametrize("flags, needle", [
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--batch-size", "-1"], "--batch-size must be at least 1"),
    (["--log-every", "0"], "--log-every must be at least 1"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--beta1", "1.5"], "--beta1 must be below 1"),
], ids=["batch-0", "batch-negative", "log-every-0", "lr-negative", "epochs-0", "beta1"])
def test_impossible_options_fail_before_work(tmp_path, pannuke_folds, train_in_process, capsys, flags, needle):
    out = tmp_path / "run"
    line = error_line(capsys, lambda: train_in_process(train_in_process.argv(pannuke_folds, out, *flags)))
    assert needle in line
    assert not out.exists(), "nothing may be written for a run that cannot start"


def test_resume_with_no_epochs_left_says_so(finished_run, pannuke_folds, train_in_process, capsys):
    last = finished_run.joinpath(*CKPT)
    capsys.readouterr()
    argv = train_in_process.argv(pannuke_folds, finished_run, "--resume", last, train_folds=(3,), test_folds=(3,))
    line = error_line(capsys, lambda: train_in_process(argv))
    assert "already trained 1 epoch" in line and "done:" not in capsys.readouterr().out


def test_out_dir_that_is_a_file_fails_at_start(tmp_path, pannuke_folds, train_in_process, capsys):
    out = tmp_path / "a_file"
    out.write_text("not a folder")
    line = error_line(capsys, lambda: train_in_process(train_in_process.argv(pannuke_folds, out)))
    assert str(out) in line and "is a file" in line


def test_empty_training_split_is_an_error(tmp_path, capsys):
    """A train.csv with its header and no rows used to "train" on 0 images."""
    utp_fixtures = pytest.importorskip("utp_fixtures")
    if not utp_fixtures.shared_data_available():
        pytest.skip("../shared/data (UniToPatho CSVs, H&E) absent")
    import train_utp
    data_dir, masks_dir = utp_fixtures.make_utp_fixture(tmp_path / "utp", {"train": 1, "test": 1}, size=256,
                                                        classes=("HP",))
    csv = data_dir / "train.csv"
    csv.write_text(csv.read_text().splitlines()[0] + "\n")
    argv = ["--data-dir", str(data_dir), "--masks-dir", str(masks_dir), "--out-dir", str(tmp_path / "run"),
            "--ngf", "8", "--ndf", "8", "--workers", "0", "--device", "cpu", "--precision", "fp32",
            "--wandb", "disabled", "--epochs", "1"]
    line = error_line(capsys, lambda: train_utp.main(argv))
    assert "no training images" in line or "train.csv" in line


def test_sigterm_is_honoured_at_the_next_step(tmp_path, pannuke_folds, run_script, train_in_process):
    """With --log-every far beyond the epoch (12 steps), the stop still comes within a
    step or two of the signal, not at the next log or epoch boundary."""
    argv = train_in_process.argv(pannuke_folds, tmp_path, "--tissue", "all", "--save-every-steps", 1,
                                 "--log-every", 1000, epochs=1000, batch_size=1, train_folds=(1, 2, 3))
    proc = run_script.start("train_pannuke.py", *argv)
    last = tmp_path.joinpath(*CKPT)
    seen, _, err = sigterm_when(proc, lambda: last.is_file() and load(last)["step"], "the first checkpoint")
    assert proc.returncode == 143, err
    stopped = load(last)
    assert stopped["step"] - seen <= 2, (seen, stopped["step"])
    assert stopped["batches_done"] > 0


def test_segmenter_and_classifier_log_to_wandb_like_the_gan_scripts():
    import classify_utp
    import train_segmenter
    from config import add_pannuke_training_data_args, training_parser

    def wandb_flags(parser):
        return {a.dest: (a.default, tuple(a.choices or ())) for a in parser._actions
                if a.dest in ("wandb", "wandb_project", "wandb_entity", "run_name")}

    gan = wandb_flags(training_parser("PanNuke", add_pannuke_training_data_args, "runs/pannuke"))
    for script in (train_segmenter, classify_utp):
        flags = wandb_flags(script.parser())
        assert set(flags) == set(gan) and flags["wandb"] == gan["wandb"] == ("auto", ("auto", "online", "offline",
                                                                                      "disabled"))


def test_segmenter_writes_an_offline_wandb_run(tmp_path, pannuke_folds, run_script):
    out = tmp_path / "seg"
    res = run_script("train_segmenter.py", "--data-dir", pannuke_folds, "--out-dir", out, "--train-folds", 3,
                     "--test-folds", 3, "--allow-overlap", "--epochs", 1, "--batch-size", 2, "--width", 4, "--workers", 0,
                     "--device", "cpu", "--precision", "fp32", "--wandb", "offline")
    assert res.returncode == 0, res.stderr[-2000:]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))
    assert load(out.joinpath(*CKPT))["wandb_run_id"] in runs[0].name


def _fold_with(pannuke_writer, root, image_change=None, mask_change=None):
    """Official fold 1 with two Colon patches, one value changed."""
    image, mask, _ = pannuke_writer.patch(7)
    images, masks = np.stack([image, image]).astype(np.float64), np.stack([mask, mask]).astype(np.float64)
    if image_change:
        image_change(images)
    if mask_change:
        mask_change(masks)
    pannuke_writer.fold(root, 1, images, masks, np.array(["Colon", "Colon"]))
    return pannuke_writer.files(root, 1)


@pytest.mark.parametrize("case, image_change, mask_change, needle", [
    ("nan-pixel", lambda a: a.__setitem__((1, 3, 4, 0), np.nan), None, "patch 1 has pixel values outside 0..255"),
    ("above-255", lambda a: a.__setitem__((0, 0, 0, 1), 300.0), None, "patch 0 has pixel values outside 0..255"),
    ("scaled-0-1", lambda a: a.__itruediv__(255.0), None, "within 0..1"),
    ("nan-mask", None, lambda m: m.__setitem__((1, Ellipsis), np.nan), "patch 1 has NaN"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_pannuke_values_are_named(tmp_path, pannuke_writer, case, image_change, mask_change, needle):
    from dataset.pannuke import PanNukeFolds
    from utils import UserError
    files = _fold_with(pannuke_writer, tmp_path / "data", image_change, mask_change)
    with pytest.raises(UserError) as err:
        PanNukeFolds(tmp_path / "data", [1], "Colon")
    assert needle in str(err.value)
    assert str(files.masks if mask_change else files.images) in str(err.value)


def test_check_data_scans_every_patch(tmp_path, pannuke_writer):
    """A bad patch the start-up sample skips is found with check_data."""
    from dataset.pannuke import SAMPLE_ITEMS, PanNukeFolds
    from utils import UserError
    image, mask, _ = pannuke_writer.patch(3)
    n = 4 * SAMPLE_ITEMS + 3
    images = np.repeat(image[None].astype(np.float64), n, 0)
    images[1, 0, 0, 0] = np.nan  # index 1 is not among the evenly spaced sample
    pannuke_writer.fold(tmp_path, 1, images, np.repeat(mask[None].astype(np.float64), n, 0), np.array(["Colon"] * n))
    PanNukeFolds(tmp_path, [1], "Colon")
    with pytest.raises(UserError, match="patch 1 has pixel values"):
        PanNukeFolds(tmp_path, [1], "Colon", check_data=True)


def test_folds_of_different_patch_sizes_are_refused(tmp_path, pannuke_writer):
    from dataset.pannuke import PanNukeFolds
    from utils import UserError
    image, mask, _ = pannuke_writer.patch(5)
    pannuke_writer.fold(tmp_path, 1, image[None].astype(np.float64), mask[None].astype(np.float64), np.array(["Colon"]))
    small = (image[: image.shape[0] // 2, : image.shape[1] // 2], mask[: mask.shape[0] // 2, : mask.shape[1] // 2])
    pannuke_writer.fold(tmp_path, 2, small[0][None].astype(np.float64), small[1][None].astype(np.float64),
                        np.array(["Colon"]))
    with pytest.raises(UserError, match="one patch size"):
        PanNukeFolds(tmp_path, [1, 2], "Colon")


def test_patches_the_unet_cannot_take_are_one_line(tmp_path, pannuke_writer, train_in_process, capsys):
    """100 x 100 px PanNuke patches used to end in a deep traceback inside the U-Net."""
    image, mask, _ = pannuke_writer.patch(9)
    crop = (slice(0, 100), slice(0, 100))
    for k in (1, 2):
        pannuke_writer.fold(tmp_path / "data", k, np.stack([image[crop]] * 2).astype(np.float64),
                            np.stack([mask[crop]] * 2).astype(np.float64), np.array(["Colon", "Colon"]))
    argv = train_in_process.argv(tmp_path / "data", tmp_path / "run", train_folds=(1,), test_folds=(2,))
    line = error_line(capsys, lambda: train_in_process(argv))
    assert "100 px" in line and str(tmp_path / "data") in line
