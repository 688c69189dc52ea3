"""Multi-process training under torchrun (gloo on CPU, 2 processes).

Real runs of train_pannuke_ddp.py / test.py on a tiny PanNuke-format dataset:
one checkpoint set written by rank 0 with plain (no `module.`) keys that loads in
test.py, in a single-device resume and in a DDP resume with another world size;
one DDP step over 2 x B images equals one single-process step over 2B images;
a dead or hung worker brings the whole job down in bounded time.

Every subprocess runs with a timeout and in its own process group, which is
killed on the way out, so no test can hang or leave workers behind.
"""
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gan import load_generator, read_checkpoint  # noqa: E402
from runtime import SeededSampler  # noqa: E402

PYTHON = str(Path(sys.executable))
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
TINY = ["--ngf", "8", "--ndf", "8", "--wandb", "disabled", "--device", "cpu", "--workers", "0"]
LR = 2e-4  # config.LEARNING_RATE


def pannuke_fold(root, k, n, seed, size=256):
    """Fold k of the official layout: float64 images 0..255, 6-channel masks
    (instance ids in channels 0-4, binary background in channel 5), 'Colon' types."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, (n, size, size, 3))
    masks = np.zeros((n, size, size, 6))
    for i in range(n):
        for inst in range(1, 7):
            cls, (y, x) = rng.integers(0, 5), rng.integers(0, size - 24, 2)
            masks[i, y:y + 20, x:x + 20, cls] = inst
    masks[..., 5] = masks[..., :5].sum(-1) == 0
    images_dir = Path(root) / f"Fold {k}" / "images" / f"fold{k}"
    masks_dir = Path(root) / f"Fold {k}" / "masks" / f"fold{k}"
    images_dir.mkdir(parents=True, exist_ok=True)
    masks_dir.mkdir(parents=True, exist_ok=True)
    np.save(images_dir / "images.npy", images)
    np.save(images_dir / "types.npy", np.array(["Colon"] * n))
    np.save(masks_dir / "masks.npy", masks)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Fold 1: 6 training images; fold 2: 3 test images; fold 3: exactly 4 = 2 x 2."""
    root = tmp_path_factory.mktemp("pannuke")
    for k, n in ((1, 6), (2, 3), (3, 4)):
        pannuke_fold(root, k, n, seed=k)
    return root


def clean_env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "GROUP_RANK", "TORCHELASTIC_RUN_ID")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled", NO_ALBUMENTATIONS_UPDATE="1")
    return env


def kill_group(proc):
    """Kill the process group this test started (torchrun and its workers)."""
    try:
        os.killpg(proc.pid, signal.SIGCONT)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run(cmd, timeout=240):
    proc = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(map(str, cmd))} did not finish in {timeout} s\n{out[-3000:]}\n{err[-3000:]}")
    finally:
        kill_group(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def torchrun(script, *args, nproc=2, timeout=240):
    return run([TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", script, *map(str, args)], timeout)


def python(script, *args, timeout=240):
    return run([PYTHON, script, *map(str, args)], timeout)


def ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


def children(pid):
    """PIDs whose parent is `pid` (from /proc; no psutil needed)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def worker_pid(torchrun_pid, rank):
    for pid in children(torchrun_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no rank-{rank} worker among the children of torchrun ({children(torchrun_pid)})")


def params_and_grads(ckpt, net, opt):
    """Parameters (state-dict order minus buffers) and, from Adam's first moment after
    one step (exp_avg = (1 - beta1) * grad), the gradients that produced them."""
    names = [k for k in ckpt[net] if not k.startswith("running_") and ".running_" not in k
             and "num_batches_tracked" not in k]
    beta1 = ckpt[opt]["param_groups"][0]["betas"][0]
    state = ckpt[opt]["state"]
    assert len(state) == len(names)
    return {n: (ckpt[net][n], state[i]["exp_avg"] / (1 - beta1)) for i, n in enumerate(names)}


# --------------------------------------------------------------------------- a DDP run and its checkpoint

@pytest.fixture(scope="module")
def ddp_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    result = torchrun("train_pannuke_ddp.py", "--data-dir", data, "--train-folds", 1, "--test-folds", 2,
                      "--out-dir", out, "--epochs", 1, "--num-samples", 2, *TINY)
    return out, ok(result)


def test_ddp_run_writes_one_checkpoint_set_from_rank0(ddp_run):
    out, log = ddp_run
    assert "2 process(es) on cpu" in log
    assert "batch 2 x 2 = 4 effective" in log  # --batch-size is per process
    assert log.count("done: ") == 1, "only rank 0 reports"
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    owner = [".run.json", ".run.lock", ".run.written"]  # run_folder.py's, from rank 0 alone
    assert files == owner + ["checkpoints/last.pt", "loss_curves.png", "samples/epoch_0001.png"], files

    ckpt = read_checkpoint(out / "checkpoints" / "last.pt")
    for net in ("generator", "discriminator"):
        assert not any(k.startswith("module.") for k in ckpt[net]), f"{net} keys carry the DDP prefix"
    assert ckpt["world_size"] == 2 and ckpt["epoch"] == 1 and ckpt["batches_done"] == 0
    # 6 images over 2 ranks of batch 2: 3 per rank, 2 steps each.
    assert ckpt["step"] == 2
    assert isinstance(ckpt["rng"], list) and len(ckpt["rng"]) == 2  # one RNG state per rank


def test_ddp_budget_and_eval_stop_every_rank_at_one_step(data, tmp_path):
    """--budget-minutes under torchrun: the ranks agree on the training time at each --log-every reduction, so
    they change the lr and stop at the same step (a rank stopping alone would leave the others' last save
    hanging); --eval-every scores on rank 0 and every rank takes part in writing best.pt."""
    budget = 0.02  # 1.2 s: a few steps of ngf 8 on a CPU
    log = ok(torchrun("train_pannuke_ddp.py", "--data-dir", data, "--train-folds", 1, "--test-folds", 2,
                      "--out-dir", tmp_path, "--epochs", 1000, "--budget-minutes", budget, "--eval-every", 2,
                      "--log-every", 2, "--num-samples", 1, *TINY))
    assert log.count("budget reached") == 1, log[-3000:]
    ckpt = read_checkpoint(tmp_path / "checkpoints" / "last.pt")
    # 3 images per rank, batch 2: 2 steps per epoch, so every reduction is at an even step.
    assert ckpt["step"] % 2 == 0 and ckpt["train_seconds"] >= budget * 60
    assert ckpt["opt_g"]["param_groups"][0]["lr"] == ckpt["opt_d"]["param_groups"][0]["lr"] == 0
    best = read_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert best["step"] == ckpt["best_step"] and np.isfinite(ckpt["best_realism_fd"])
    assert log.count("eval/realism_fd") == ckpt["step"] // 2


def test_ddp_checkpoint_loads_in_test_py_under_torchrun(ddp_run, data, tmp_path):
    out, _ = ddp_run
    generator, _ = load_generator(out / "checkpoints" / "last.pt", torch.device("cpu"))
    assert not isinstance(generator, torch.nn.parallel.DistributedDataParallel)

    synth = tmp_path / "synthetic"
    log = ok(torchrun("test.py", "--checkpoint", out / "checkpoints" / "last.pt", "--data-dir", data,
                      "--test-folds", 2, "--out-dir", synth, "--device", "cpu", "--grids", 1))
    written = sorted(p.name for p in synth.glob("*.png"))
    assert written == ["fold2_00000.png", "fold2_00001.png", "fold2_00002.png"], written
    # Rank 0 writes items 0 and 2, rank 1 item 1; rank 0 alone reports and writes grids.
    assert "synthetic images for 3 samples" in log and "2 processes, each wrote its share" in log
    assert len(list((tmp_path / "synthetic.grids").glob("*.png"))) == 1


def test_ddp_checkpoint_resumes_on_one_device_then_under_ddp(ddp_run, data, tmp_path):
    out, _ = ddp_run
    single = tmp_path / "single"
    log = ok(python("train_pannuke.py", "--data-dir", data, "--train-folds", 1, "--test-folds", 2,
                    "--out-dir", single, "--epochs", 2, "--resume", out / "checkpoints" / "last.pt",
                    "--num-samples", 0, *TINY))
    assert "resumed from" in log and "epoch 2" in log
    assert "1 process(es) on cpu" in log and "batch 2 x 1 = 2 effective" in log
    ckpt = read_checkpoint(single / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["world_size"] == 1
    assert ckpt["step"] == 2 + 3  # 6 images at batch 2 on one process
    assert [h["epoch"] for h in ckpt["history"]] == [1, 2]

    # Back under DDP from the one-process checkpoint (world size 1 -> 2), with --scale-lr.
    again = tmp_path / "again"
    log = ok(torchrun("train_pannuke_ddp.py", "--data-dir", data, "--train-folds", 1, "--test-folds", 2,
                      "--out-dir", again, "--epochs", 3, "--resume", single / "checkpoints" / "last.pt",
                      "--scale-lr", "--num-samples", 0, *TINY))
    assert "resumed from" in log and f"lr {2 * LR:g}" in log
    ckpt = read_checkpoint(again / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 3 and ckpt["world_size"] == 2 and ckpt["step"] == 5 + 2
    assert [h["epoch"] for h in ckpt["history"]] == [1, 2, 3]
    # The printed learning rate is the one used, not the one stored in the resumed optimiser.
    for opt in ("opt_g", "opt_d"):
        assert [g["lr"] for g in ckpt[opt]["param_groups"]] == [pytest.approx(2 * LR)]


def test_module_prefixed_checkpoint_still_loads(ddp_run, tmp_path):
    out, _ = ddp_run
    ckpt = read_checkpoint(out / "checkpoints" / "last.pt")
    ckpt["generator"] = {f"module.{k}": v for k, v in ckpt["generator"].items()}
    old = tmp_path / "old_ddp.pt"
    torch.save(ckpt, old)
    generator, _ = load_generator(old, torch.device("cpu"))
    reference, _ = load_generator(out / "checkpoints" / "last.pt", torch.device("cpu"))
    for (k, a), b in zip(generator.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), k


# --------------------------------------------------------------------------- DDP = one big batch

def test_sampler_shards_union_to_the_single_process_order():
    """DistributedSampler hands rank r perm[r::world] of the same permutation, and the
    augmentation seed depends on (seed, epoch, index) only: the two ranks' first
    batches together are the single process's first batch, item for item."""
    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 4

    for epoch in (0, 1, 5):
        single = SeededSampler(Items(), num_replicas=1, rank=0, seed=7)
        single.set_epoch(epoch)
        shards = []
        for rank in range(2):
            sampler = SeededSampler(Items(), num_replicas=2, rank=rank, seed=7)
            sampler.set_epoch(epoch)
            shards.append(list(sampler))
        full = list(single)
        assert shards[0] == full[0::2] and shards[1] == full[1::2]
        assert sorted(shards[0] + shards[1]) == sorted(full)


def test_sampler_skip_past_a_partial_last_batch_is_empty():
    """A stop on an epoch's last batch saves batches_done = all of them; when that batch
    was partial, batches x batch size passes the shard's end: nothing is left, no error."""
    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 5

    sampler = SeededSampler(Items(), num_replicas=2, rank=1, seed=0)  # 3 items: batches of 2 + 1
    sampler.set_epoch(0, skip=2 * 2)
    assert len(sampler) == 0 and list(sampler) == []
    loader = torch.utils.data.DataLoader(Items(), batch_size=2, sampler=sampler)
    assert len(loader) == 0


def test_one_ddp_step_equals_one_double_batch_step(data, tmp_path):
    """2 processes x batch 2 vs 1 process x batch 4, on exactly 4 images: one step each.

    The gradients (recovered from Adam's first moment) must agree to float tolerance.
    Adam's first step is lr * g / (|g| + eps), about lr * sign(g): where a gradient is
    at the rounding-noise floor (conv biases in front of affine-free InstanceNorm have
    a gradient of exactly zero in exact arithmetic), its sign is noise, so parameters
    are compared with allclose wherever the gradient is well above that noise, and
    bounded by Adam's step size elsewhere.
    """
    # The original pix2pix (one PatchGAN, BCE with hard labels): the flags below are its.
    common = ["--data-dir", data, "--train-folds", 3, "--test-folds", 2, "--epochs", 1, "--seed", 3,
              "--upsample", "transpose", "--discriminator", "patch",
              "--no-dropout", "--no-smooth-real", "--no-smooth-fake", "--norm", "instance",
              "--precision", "fp32", "--num-samples", 0, *TINY]
    ok(torchrun("train_pannuke_ddp.py", *common, "--out-dir", tmp_path / "ddp", "--batch-size", 2))
    ok(python("train_pannuke.py", *common, "--out-dir", tmp_path / "one", "--batch-size", 4))
    ddp = read_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")
    one = read_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")
    assert ddp["step"] == one["step"] == 1
    assert ddp["history"][0] == pytest.approx(one["history"][0], rel=1e-4)  # same global-mean losses

    for net, opt in (("generator", "opt_g"), ("discriminator", "opt_d")):
        a, b = params_and_grads(ddp, net, opt), params_and_grads(one, net, opt)
        assert a.keys() == b.keys()
        scale = max(g.abs().max().item() for _, g in b.values())
        compared = total = 0
        for name in a:
            (pa, ga), (pb, gb) = a[name], b[name]
            assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-5 * scale), \
                f"{net}.{name}: gradient differs by {(ga - gb).abs().max().item():.3g} (scale {scale:.3g})"
            noise = (ga - gb).abs().max().item()
            stable = gb.abs() > 100 * noise + 1e-7
            assert torch.allclose(pa[stable], pb[stable], rtol=1e-5, atol=1e-6), \
                f"{net}.{name}: parameters differ by {(pa - pb)[stable].abs().max().item():.3g}"
            assert (pa - pb).abs().max().item() <= 2 * LR * 1.001, f"{net}.{name}: beyond one Adam step"
            compared += int(stable.sum())
            total += pa.numel()
        assert compared >= 0.8 * total, f"{net}: only {compared}/{total} parameters had a clear gradient"


# --------------------------------------------------------------------------- failures

def start_long_run(data, out, *extra):
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", "train_pannuke_ddp.py", "--data-dir", str(data),
           "--train-folds", "1", "--test-folds", "2", "--out-dir", str(out), "--epochs", "1000",
           "--save-every-steps", "1", "--log-every", "1", "--num-samples", "0", *TINY, *extra]
    log = open(out.parent / f"{out.name}.log", "w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=log, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / "last.pt").exists():  # training is under way on both ranks
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_group(proc)
            log.seek(0)
            pytest.fail(f"the run did not start (exit {proc.poll()}):\n{log.read()[-4000:]}")
        time.sleep(0.2)
    return proc, log


def wait_for_exit(proc, log, limit):
    started = time.monotonic()
    try:
        proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        pass
    finally:
        elapsed = time.monotonic() - started
        hung = proc.poll() is None
        kill_group(proc)
        proc.wait()
        log.seek(0)
        text = log.read()
        log.close()
    assert not hung, f"torchrun still running {limit} s after the failure:\n{text[-4000:]}"
    return proc.returncode, elapsed, text


def test_killed_worker_ends_the_whole_job(data, tmp_path):
    proc, log = start_long_run(data, tmp_path / "run")
    os.kill(worker_pid(proc.pid, rank=1), signal.SIGKILL)
    rc, elapsed, text = wait_for_exit(proc, log, limit=60)
    assert rc != 0
    # torchrun names the dead worker; the survivor names the lost connection.
    assert "Signal 9 (SIGKILL) received by PID" in text, text[-3000:]
    assert "rank      : 1" in text
    assert "FAILED" in text


def test_stalled_worker_trips_dist_timeout(data, tmp_path):
    """A worker that stops answering (SIGSTOP: alive, sockets open, as after a network
    stall) is caught by the process-group timeout (--dist-timeout, minutes), not by a
    closed connection. A worker frozen for good is SIGKILLed by torchrun 30 s after
    the others fail; to keep the test short, the stalled one is resumed once the
    timeout has fired, and finds its peers gone."""
    proc, log = start_long_run(data, tmp_path / "run", "--dist-timeout", "0.1")  # 6 s
    stalled = worker_pid(proc.pid, rank=1)
    os.kill(stalled, signal.SIGSTOP)
    # The wording depends on the collective rank 0 was blocked in (recv, send, barrier).
    timed_out = re.compile(r"timed out|timeout", re.IGNORECASE)
    deadline = time.monotonic() + 60
    try:
        while proc.poll() is None and not timed_out.search(Path(log.name).read_text()):
            assert time.monotonic() < deadline, "the job neither timed out nor ended within 60 s of a worker stalling"
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):  # torchrun may have killed it already
            os.kill(stalled, signal.SIGCONT)
    rc, elapsed, text = wait_for_exit(proc, log, limit=60)
    # The job ends (no hang) with torchrun's failure report.
    assert rc != 0 and "FAILED" in text, text[-3000:]


def test_sigterm_saves_mid_epoch_and_resumes_with_another_world_size(data, tmp_path):
    """Preemption (SIGTERM to torchrun, forwarded to the workers): every rank agrees
    (all-reduced flag) to stop at the same step, rank 0 saves a mid-epoch checkpoint;
    resuming it on one process restarts that epoch."""
    out = tmp_path / "run"
    proc, log = start_long_run(data, out)
    os.kill(proc.pid, signal.SIGTERM)
    rc, elapsed, text = wait_for_exit(proc, log, limit=60)
    assert rc != 0 and "stopped by signal; saved" in text, text[-3000:]
    ckpt = read_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["world_size"] == 2
    if ckpt["batches_done"] == 0:
        pytest.skip("the signal landed on an epoch boundary")
    epoch, step = ckpt["epoch"], ckpt["step"]
    # The partial epoch's loss sums are the whole job's: both ranks' batches are counted.
    assert ckpt["partial_sums"][3] == 2 * ckpt["batches_done"]
    log = ok(python("train_pannuke.py", "--data-dir", data, "--train-folds", 1, "--test-folds", 2,
                    "--out-dir", tmp_path / "one", "--epochs", epoch + 1, "--resume", out / "checkpoints" / "last.pt",
                    "--num-samples", 0, *TINY))
    assert f"resuming mid-epoch with a different world size; epoch {epoch + 1} restarts" in log
    resumed = read_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")
    assert resumed["epoch"] == epoch + 1 and resumed["step"] == step + 3  # the whole epoch: 6 images, batch 2
    assert len(resumed["history"]) == epoch + 1


def test_ddp_script_without_torchrun_is_a_clear_error(data, tmp_path):
    result = python("train_pannuke_ddp.py", "--data-dir", data, "--out-dir", tmp_path, *TINY, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "torchrun" in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
