"""--ema-half-life in the training loop: the checkpoint carries G's moving average with
BatchNorm statistics of its own, a resumed run's average equals an uninterrupted one's,
and test.py paints with the average unless --no-ema (ema.py's own tests cover the
average and the statistics)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_training import assert_same, assert_same_training_state

from gan import load_generator

CKPT = "checkpoints/last.pt"
RUN = dict(epochs=2, batch_size=3, train_folds=(1, 2), test_folds=(3,))   # 6 Colon patches: 2 steps/epoch
EMA = ("--ema-half-life", 12, "--ema-rampup", 0.5)


def load(path):
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory, pannuke_folds, train_in_process):
    out = tmp_path_factory.mktemp("ema_run")
    train_in_process(train_in_process.argv(pannuke_folds, out, *EMA, **RUN))
    return out


def test_the_checkpoint_carries_an_average_that_trails_the_generator(ema_run):
    ckpt = load(ema_run / CKPT)
    average, raw = ckpt["generator_ema"]["model"], ckpt["generator"]
    assert ckpt["generator_ema"]["images_seen"] == 12  # 2 epochs x 6 patches
    weights = [k for k in raw if not ("running_" in k or "num_batches" in k)]
    assert all(torch.isfinite(average[k]).all() for k in average)
    assert any(not torch.equal(average[k], raw[k]) for k in weights)
    # Its BatchNorm statistics are its own, not copies of the raw G's.
    stats = [k for k in raw if k.endswith("running_mean")]
    assert stats and any(not torch.equal(average[k], raw[k]) for k in stats)


def test_without_the_flag_there_is_no_average(tmp_path, pannuke_folds, train_in_process):
    train_in_process(train_in_process.argv(pannuke_folds, tmp_path, **dict(RUN, epochs=1)))
    assert "generator_ema" not in load(tmp_path / CKPT)


def test_resumed_average_equals_uninterrupted(tmp_path, pannuke_folds, train_in_process, ema_run):
    train_in_process(train_in_process.argv(pannuke_folds, tmp_path, *EMA, **dict(RUN, epochs=1)))
    train_in_process(train_in_process.argv(pannuke_folds, tmp_path, "--resume", tmp_path / CKPT, **RUN))
    final, reference = load(tmp_path / CKPT), load(ema_run / CKPT)
    assert final["config"]["ema_half_life"] == 12  # taken from the checkpoint
    assert_same_training_state(final, reference)
    assert_same(final["generator_ema"], reference["generator_ema"], "generator_ema")


def test_test_py_paints_with_the_average_unless_told_not_to(ema_run, pannuke_folds, test_script, tmp_path, one_thread):
    generator, _ = load_generator(ema_run / CKPT, "cpu")
    raw, _ = load_generator(ema_run / CKPT, "cpu", ema=False)
    assert any(not torch.equal(a, b) for a, b in zip(generator.state_dict().values(), raw.state_dict().values()))

    def paint(out, *flags):
        test_script.main(["--checkpoint", str(ema_run / CKPT), "--data-dir", str(pannuke_folds), "--out-dir",
                          str(out), "--device", "cpu", "--precision", "fp32", "--grids", "0", *flags])
        return {p.name: np.asarray(Image.open(p)) for p in sorted(out.glob("*.png"))}

    averaged, plain = paint(tmp_path / "ema"), paint(tmp_path / "raw", "--no-ema")
    assert averaged.keys() == plain.keys() and averaged
    assert any(not np.array_equal(averaged[k], plain[k]) for k in averaged)
    assert all(img.std() > 0 for img in averaged.values())  # painted, not one flat colour
    record = json.loads((tmp_path / "ema.synthetic.json").read_text())
    assert record["weights"] == "ema"
    # Raw-G images are not mixed into a folder of the average's.
    with pytest.raises(SystemExit):
        paint(tmp_path / "ema", "--no-ema")
