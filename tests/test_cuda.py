"""GPU checks: a CUDA run of the scripts with resume and generation, nccl DDP on one
GPU, and bench.py on CUDA. (bf16 and fp16 steps against fp32 are test_bench.py's
loss comparison, parametrised over devices.)

Skipped where PyTorch sees no CUDA GPU (as on the CPU-only CI); run them on a GPU
node with `python -m pytest tests/test_cuda.py`.
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import script_env, tiny_train_argv

from gan import load_generator

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def cuda_argv(argv):
    """tiny_train_argv's CPU run moved to the GPU (argparse keeps the last value)."""
    return [*argv, "--device", "cuda", "--precision", "auto"]


def test_cuda_training_resumes_and_generates(run_script, pannuke_folds, tmp_path):
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
