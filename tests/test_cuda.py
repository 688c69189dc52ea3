"""GPU checks: CUDA training in bf16 and fp16 (GradScaler), a CUDA run of the scripts
with resume and generation, nccl DDP on one GPU, and bench.py on CUDA.

Skipped where PyTorch sees no CUDA GPU (as on the CPU-only CI); run them on a GPU
node with `python -m pytest tests/test_cuda.py`.
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench
from dataset.pannuke import PanNukeFolds
from train_utils import StepConfig, autocast_context, build_discriminator, build_generator, load_generator

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def cuda_argv(argv):
    """tiny_train_argv's CPU run moved to the GPU (argparse keeps the last value)."""
    return [*argv, "--device", "cuda", "--precision", "auto"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_step_matches_fp32_and_trains(pannuke_folds, precision):
    """The same first-step losses as the fp32 baseline within half-precision tolerance,
    then finite losses and moving weights (for fp16, through the GradScaler)."""
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    device = torch.device("cuda")
    torch.manual_seed(0)
    cfg = dict(ngf=8, ndf=8, norm="batch", dropout=False)
    gen, disc = build_generator(cfg), build_discriminator(cfg)

    def step_cfg(p):
        return StepConfig(l1_lambda=100.0, real_label_range=(0.7, 1.2), fake_label_range=(0.0, 0.3),
                          smooth_real=False, smooth_fake=False, autocast=autocast_context(device, p))
    baseline = bench.TrainPath("baseline", gen, disc, device, step_cfg("fp32"), plain=True)
    mixed = bench.TrainPath(precision, gen, disc, device, step_cfg(precision), precision, channels_last=True)
    dataset = PanNukeFolds(pannuke_folds, [1, 2])
    labels, image = map(torch.stack, zip(*(dataset[i] for i in range(2))))

    expected = baseline.step(labels, image)
    got = mixed.step(labels, image).cpu()
    assert torch.allclose(got, expected, rtol=5e-2, atol=5e-3), f"{precision} {got.tolist()} vs fp32 {expected.tolist()}"
    for _ in range(5):
        assert torch.isfinite(mixed.step(labels, image)).all()
    assert not all(torch.equal(a.cpu(), b) for a, b in zip(mixed.gen.parameters(), gen.parameters()))
    assert mixed.scaler_g.is_enabled() == (precision == "fp16")  # fp16 ran through the GradScaler


def test_cuda_training_resumes_and_generates(run_script, pannuke_folds, tmp_path):
    from conftest import tiny_train_argv
    out = tmp_path / "run"
    first = run_script("train_pannuke.py", *cuda_argv(tiny_train_argv(pannuke_folds, out, epochs=1)))
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_script("train_pannuke.py", *cuda_argv(tiny_train_argv(pannuke_folds, out, epochs=2)),
                         "--resume", out / "checkpoints" / "last.pt")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 2
    # A GPU checkpoint loads on a CPU-only machine.
    load_generator(out / "checkpoints" / "last.pt", torch.device("cpu"))

    synthetic = tmp_path / "synthetic"
    gen = run_script("test.py", "--checkpoint", out / "checkpoints" / "last.pt", "--data-dir", pannuke_folds,
                     "--test-folds", 3, "--out-dir", synthetic, "--device", "cuda")
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert list(synthetic.rglob("*.png"))


def test_nccl_ddp_on_one_gpu(pannuke_folds, tmp_path):
    from conftest import script_env, tiny_train_argv
    out = tmp_path / "ddp"
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=1", "train_pannuke_ddp.py",
                           *cuda_argv(tiny_train_argv(pannuke_folds, out, epochs=1))],
                          cwd=Path(__file__).resolve().parents[1], env=script_env(tmp_path),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoints" / "last.pt").is_file()


def test_bench_smoke_on_cuda(run_script):
    proc = run_script("bench.py", "--smoke", "--device", "cuda", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    speedup = re.search(r"^train_speedup_vs_fp32_baseline=(\d+\.\d\d)$", proc.stdout, flags=re.M)
    assert speedup and float(speedup.group(1)) > 0
