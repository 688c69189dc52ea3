"""The training loop: one GAN step learns, checkpoints are atomic, resuming (after an
epoch, after SIGKILL mid-epoch, after SIGTERM) equals not stopping, wandb offline,
the --demo, and --help."""
import contextlib
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import sigterm_when, wait_for

import utils
from dataset.pannuke import PanNukeFolds
from gan import build_discriminator, build_generator, prepare_batch
from runtime import SeededSampler, make_optimizer
from train_utils import Networks, StepConfig, gan_train_step

CKPT = Path("checkpoints") / "last.pt"


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same(a, b, where="checkpoint"):
    """Exact equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype, where
        assert torch.equal(a, b), f"{where} differs (max abs diff {(a.double() - b.double()).abs().max()})"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_training_state(ckpt, ref):
    for key in ("generator", "discriminator", "opt_g", "opt_d", "scaler_g", "scaler_d"):
        assert_same(ckpt[key], ref[key], key)
    for key in ("epoch", "batches_done", "step", "history"):
        assert_same(ckpt[key], ref[key], key)


# --------------------------------------------------------------------------- one step

def test_gan_train_step_lowers_l1_on_a_fixed_batch(pannuke_folds):
    torch.manual_seed(0)
    cfg = dict(ngf=8, ndf=8, norm="batch", dropout=True)
    g, d = build_generator(cfg), build_discriminator(cfg)
    device = torch.device("cpu")
    opt_g = make_optimizer(g.parameters(), 2e-3, (0.5, 0.999), device)
    opt_d = make_optimizer(d.parameters(), 2e-3, (0.5, 0.999), device)
    scaler_g, scaler_d = (torch.amp.GradScaler("cpu", enabled=False) for _ in range(2))
    step_cfg = StepConfig(l1_lambda=75.0, real_label_range=(0.7, 1.2), fake_label_range=(0.0, 0.3),
                          smooth_real=True, smooth_fake=True, autocast=contextlib.nullcontext())
    ds = PanNukeFolds(pannuke_folds, [1])
    labels, images = map(torch.stack, zip(*(ds[i] for i in range(2))))
    mask, real = prepare_batch(labels, images, device, channels_last=False)
    d_before = [p.detach().clone() for p in d.parameters()]

    nets = Networks(g, d, opt_g, opt_d, scaler_g, scaler_d)
    losses = [gan_train_step(nets, mask, real, step_cfg) for _ in range(8)]

    assert all(x.shape == (3,) and torch.isfinite(x).all() for x in losses)
    l1 = [x[2].item() for x in losses]
    print("loss_l1 per step:", [round(v, 2) for v in l1])
    assert l1[-1] < 0.75 * l1[0], f"L1 did not fall: {l1}"
    # D was updated, and its parameters take gradients again after G's step.
    assert any(not torch.equal(a, b) for a, b in zip(d_before, d.parameters()))
    assert all(p.requires_grad for p in d.parameters())


def test_prepare_batch_onehot_and_range():
    labels = torch.tensor([[[0, 5], [3, 1]]], dtype=torch.uint8)
    image = torch.tensor([[[[0, 255], [128, 64]]] * 3], dtype=torch.uint8)
    mask, real = prepare_batch(labels, image, torch.device("cpu"), channels_last=False)
    assert mask.shape == (1, 6, 2, 2) and real.shape == (1, 3, 2, 2)
    assert torch.equal(mask.sum(1), torch.ones(1, 2, 2)) and torch.equal(mask.argmax(1), labels.long())
    assert real.min() == -1 and real.max() == 1
    # Several crops per item: (B, K, H, W) -> a batch of B*K.
    mask, real = prepare_batch(labels.expand(2, 3, 2, 2), image[:, None].expand(2, 3, 3, 2, 2), torch.device("cpu"))
    assert mask.shape == (6, 6, 2, 2) and real.shape == (6, 3, 2, 2)


# --------------------------------------------------------------------------- sampler

def test_seeded_sampler_is_reproducible_and_skips():
    ds = list(range(10))
    s = SeededSampler(ds, seed=3)
    s.set_epoch(0)
    first = list(s)
    assert sorted(i for i, _ in first) == ds
    s.set_epoch(0)
    assert list(s) == first
    s.set_epoch(1)
    assert list(s) != first
    s.set_epoch(0, skip=4)
    assert list(s) == first[4:] and len(s) == 6


def test_seeded_sampler_skip_past_a_partial_last_batch():
    """Resuming from a checkpoint saved at the last (partial) batch of an epoch asks the
    sampler to skip batches_done * batch_size items, which exceeds the dataset: 5 items,
    batch 2 -> 3 batches -> skip 6. The epoch should just be empty."""
    s = SeededSampler(list(range(5)), seed=0)
    s.set_epoch(0, skip=6)
    assert len(s) == 0
    assert list(s) == []


# --------------------------------------------------------------------------- atomic checkpoints

def _leftovers(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.name != "last.pt")


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_atomic_save_keeps_previous_file_on_failure(tmp_path, monkeypatch, error):
    path = tmp_path / "ckpt" / "last.pt"
    utils.atomic_save_torch({"w": torch.arange(5)}, path)
    before = path.read_bytes()
    assert _leftovers(path.parent) == []

    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        real_save({"w": torch.zeros(1000)}, f)   # half a file is already on disk ...
        f.flush()
        raise error                               # ... when the write dies

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(type(error)):
        utils.atomic_save_torch({"w": torch.arange(7)}, path)
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert torch.equal(load(path)["w"], torch.arange(5))
    assert _leftovers(path.parent) == [], "temporary file left behind"

    utils.atomic_save_torch({"w": torch.arange(9)}, path)
    assert torch.equal(load(path)["w"], torch.arange(9))
    assert _leftovers(path.parent) == []


# --------------------------------------------------------------------------- resume == not stopping

RESUME_RUN = dict(epochs=2, batch_size=3, train_folds=(1, 2), test_folds=(3,))   # 6 Colon patches: 2 steps/epoch


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory, pannuke_folds, train_in_process):
    """Two epochs straight; the reference for the resume tests."""
    out = tmp_path_factory.mktemp("uninterrupted")
    train_in_process(train_in_process.argv(pannuke_folds, out, **RESUME_RUN))
    return load(out / CKPT)


def test_resume_after_an_epoch_equals_uninterrupted(tmp_path, pannuke_folds, train_in_process, uninterrupted_run):
    argv = train_in_process.argv(pannuke_folds, tmp_path, **dict(RESUME_RUN, epochs=1))
    train_in_process(argv)
    half = load(tmp_path / CKPT)
    assert (half["epoch"], half["batches_done"], half["step"]) == (1, 0, 2)
    train_in_process(train_in_process.argv(pannuke_folds, tmp_path, "--resume", tmp_path / CKPT, **RESUME_RUN))
    final = load(tmp_path / CKPT)
    assert (final["epoch"], final["step"]) == (2, 4)
    assert_same_training_state(final, uninterrupted_run)
    assert (tmp_path / "samples" / "epoch_0002.png").is_file()


def test_resume_takes_the_run_options_the_command_line_leaves_out(tmp_path, pannuke_folds, train_in_process,
                                                                   uninterrupted_run, capsys):
    """`--resume CKPT` alone (plus where and on what to run) continues the run as it was
    configured: width, batch size, folds, seed... come from the checkpoint, and the
    result equals the uninterrupted run. A flag given on the command line still wins."""
    train_in_process(train_in_process.argv(pannuke_folds, tmp_path, **dict(RESUME_RUN, epochs=1)))
    capsys.readouterr()
    runtime_only = ["--data-dir", pannuke_folds, "--out-dir", tmp_path, "--epochs", 2, "--device", "cpu",
                    "--precision", "fp32", "--workers", 0, "--wandb", "disabled", "--num-samples", 1,
                    "--save-every", 0]
    train_in_process([*runtime_only, "--resume", tmp_path / CKPT])
    out = capsys.readouterr().out
    assert "--ngf 8" in out and "--batch-size 3" in out
    final = load(tmp_path / CKPT)
    assert final["config"]["ngf"] == 8 and final["config"]["batch_size"] == 3
    assert_same_training_state(final, uninterrupted_run)

    train_in_process([*runtime_only, "--epochs", 3, "--resume", tmp_path / CKPT, "--lr", 1e-4])
    again = load(tmp_path / CKPT)
    assert again["config"]["lr"] == 1e-4 and again["opt_g"]["param_groups"][0]["lr"] == 1e-4
    assert again["config"]["ngf"] == 8


def _mid_epoch_checkpoint(path):
    if not path.is_file():
        return None
    ckpt = load(path)  # atomic rename: whatever is there is a whole checkpoint
    return ckpt if ckpt["batches_done"] > 0 else None


def test_resume_after_sigkill_mid_epoch_equals_uninterrupted(tmp_path, pannuke_folds, run_script,
                                                             train_in_process, uninterrupted_run):
    argv = train_in_process.argv(pannuke_folds, tmp_path, "--save-every-steps", 1, **RESUME_RUN)
    proc = run_script.start("train_pannuke.py", *argv)
    try:
        seen = wait_for(lambda: _mid_epoch_checkpoint(tmp_path / CKPT), proc, 240, "a mid-epoch checkpoint")
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert seen["batches_done"] > 0
    killed = load(tmp_path / CKPT)
    assert (killed["epoch"], killed["batches_done"]) < (2, 0), "nothing left to resume"
    train_in_process(train_in_process.argv(pannuke_folds, tmp_path, "--resume", tmp_path / CKPT, **RESUME_RUN))
    final = load(tmp_path / CKPT)
    # (A kill during a save may leave a stray temp file next to last.pt; it must not matter.)
    assert_same_training_state(final, uninterrupted_run)


@pytest.mark.parametrize("batch_size", [2, 3], ids=["full-last-batch", "partial-last-batch"])
def test_sigterm_saves_exits_143_and_resumes(tmp_path, pannuke_folds, run_script, train_in_process, batch_size):
    """Fold 3 has 2 Colon patches: one batch per epoch, so the stop always lands on an
    epoch's last batch (full with batch 2, partial with batch 3)."""
    argv = train_in_process.argv(pannuke_folds, tmp_path, "--save-every-steps", 1, epochs=1000,
                                 batch_size=batch_size, train_folds=(3,), test_folds=(3,))
    proc = run_script.start("train_pannuke.py", *argv)
    _, out, err = sigterm_when(proc, lambda: (tmp_path / CKPT).is_file(), "the first checkpoint")
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    assert "stopped by signal" in out + err and str(tmp_path / CKPT) in out + err
    ckpt = load(tmp_path / CKPT)
    assert ckpt["kind"] == "he-pix2pix"
    assert 0 < ckpt["step"] < 1000
    # Resuming finishes the interrupted epoch and one more.
    target = ckpt["epoch"] + 2
    train_in_process(train_in_process.argv(pannuke_folds, tmp_path, "--resume", tmp_path / CKPT, epochs=target,
                                           batch_size=batch_size, train_folds=(3,), test_folds=(3,)))
    final = load(tmp_path / CKPT)
    assert (final["epoch"], final["batches_done"]) == (target, 0)
    assert [h["epoch"] for h in final["history"]] == list(range(1, target + 1))


# --------------------------------------------------------------------------- wandb, demo, help

def test_wandb_auto_is_offline_without_credentials(tmp_path, monkeypatch):
    monkeypatch.setattr(utils, "wandb_reachable", lambda host, port, tls: True)  # no network in tests
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert utils.resolve_wandb_mode("auto") == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password x\n")
    assert utils.resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("NETRC", str(tmp_path / "missing"))
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert utils.resolve_wandb_mode("auto") == "online"
    assert utils.resolve_wandb_mode("disabled") == "disabled"


def test_wandb_offline_run_is_written(tmp_path, pannuke_folds, run_script, train_in_process):
    out = tmp_path / "run"
    argv = train_in_process.argv(pannuke_folds, out, train_folds=(3,), test_folds=(3,))
    argv[argv.index("--wandb") + 1] = "offline"
    res = run_script("train_pannuke.py", *argv, timeout=300)
    assert res.returncode == 0, res.stderr
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, sorted(p.name for p in (out / "wandb").iterdir()) if (out / "wandb").exists() else res.stdout
    run_id = load(out / CKPT)["wandb_run_id"]
    assert run_id and runs[0].name.endswith(run_id)
    assert list(runs[0].glob("*.wandb")), "no run log in the offline run folder"


def test_demo_writes_data_samples_curves_and_checkpoint(tmp_path, run_script):
    out = tmp_path / "demo"
    res = run_script("train_pannuke.py", "--demo", "--epochs", 1, "--ngf", 8, "--ndf", 8, "--out-dir", out,
                     "--wandb", "disabled", timeout=420)
    assert res.returncode == 0, res.stderr[-3000:]
    from PIL import Image
    data = out / "demo_data"
    for k in (1, 2, 3):
        fold = data / f"Fold {k}"
        images = np.load(fold / "images" / f"fold{k}" / "images.npy")
        types = np.load(fold / "images" / f"fold{k}" / "types.npy")
        masks = np.load(fold / "masks" / f"fold{k}" / "masks.npy")
        n = len(images)
        assert n > 0
        assert images.shape == (n, 256, 256, 3) and images.dtype == np.float64
        assert images.min() >= 0 and images.max() <= 255 and images.max() > 1
        assert masks.shape == (n, 256, 256, 6) and masks.dtype == np.float64
        assert types.shape == (n,) and types.dtype.kind == "U" and set(types.tolist()) == {"Colon"}
        assert set(np.unique(masks[..., 5]).tolist()) <= {0.0, 1.0}
        assert np.array_equal(masks[..., 5] == 1, masks[..., :5].sum(-1) == 0)
        assert (masks[..., :5] > 0).any(), "demo masks hold no nuclei"
    grid = np.asarray(Image.open(out / "samples" / "epoch_0001.png"))
    assert grid.shape[1] == 3 * 256 + 2 * 4 and (grid.shape[0] + 4) % (256 + 4) == 0
    curves = Image.open(out / "loss_curves.png")
    assert curves.format == "PNG" and min(curves.size) > 100
    ckpt = load(out / CKPT)
    assert ckpt["epoch"] == 1 and ckpt["model_config"]["ngf"] == 8 and ckpt["model_config"]["ndf"] == 8
    assert len(ckpt["history"]) == 1


def test_train_help_lists_key_flags(capsys):
    import train_pannuke
    with pytest.raises(SystemExit) as exit_info:
        train_pannuke.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--data-dir", "--train-folds", "--test-folds", "--tissue", "--out-dir", "--epochs", "--batch-size",
                 "--ngf", "--ndf", "--device", "--wandb", "--resume", "--demo", "--save-every-steps", "--precision"):
        assert flag in out, flag
