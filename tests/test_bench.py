"""bench.py: the smoke run prints every figure, and the default training path
computes the same losses as the plain fp32 baseline it is compared with (on CPU,
and in bf16 and fp16 on a CUDA GPU when there is one)."""
import json
import re

import pytest
import torch

import bench
from dataset.pannuke import PanNukeFolds
import gan
from dataset.masks import PANNUKE
from gan import build_discriminator, build_generator
from runtime import autocast_context, resolve_channels_last, resolve_precision
from train_utils import StepConfig

FIELDS = ("train_baseline_img_s", "train_default_img_s", "train_speedup_vs_fp32_baseline", "train_default_gflops",
          "train_baseline_gflops", "train_gflop_per_img", "train_default_peak_fraction", "matmul_peak_fp32_gflops",
          "matmul_peak_bf16_gflops", "gen_whole_mpx_s", "gen_tiled_mpx_s", "loader_pannuke_img_s",
          "loader_utp_img_s", "loader_utp_cached_crops_s", "loader_pannuke_vs_train", "loader_utp_vs_train",
          "loader_utp_cached_vs_train", "segmenter_fp32_steps_s", "segmenter_fp32_gflops", "train128_default_img_s",
          "train128_baseline_img_s", "train128_default_peak_fraction", "train128_gflop_per_img",
          "train_batch2_img_s", "train_batch4_peak_fraction", "train128_batch4_img_s")


def test_smoke_run_prints_every_figure(run_script, tmp_path):
    out = tmp_path / "bench.json"
    proc = run_script("bench.py", "--smoke", "--batch-sizes", "2", "4", "--profile", "--json", out, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = dict(re.findall(r"^(\w+)=(.*)$", proc.stdout, flags=re.M))
    for key in FIELDS:
        assert key in printed, f"{key}= missing from the output:\n{proc.stdout}"
        assert float(printed[key]) > 0, f"{key}={printed[key]}"
    assert re.search(r"^train_speedup_vs_fp32_baseline=\d+\.\d\d$", proc.stdout, flags=re.M)
    figures = json.loads(out.read_text())
    assert all(figures[key] > 0 for key in FIELDS)
    assert figures["ngf"] == 8
    assert figures["networks"] == "unet (resize) + multiscale"  # today's default networks, named
    assert f"segmenter_{figures['precision']}_steps_s" in figures
    assert "training at 128 px (unet (resize) + multiscale, conic classes" in proc.stdout
    # The profile: ten ops with their shares of the step's time, largest first.
    shares = [share for _, share in figures["train128_profile"]]
    assert len(shares) == 10 and shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1
    # The ratios are the printed rates over the default training rate of the same run.
    assert figures["loader_utp_cached_vs_train"] == figures["loader_utp_cached_crops_s"] / figures["train_default_img_s"]


def test_smoke_run_at_128_px_alone_generates_with_its_classes(run_script):
    """--tile 128 alone: the generator that generation reuses is the 128-px one, conditioned on CoNIC's 7 classes."""
    proc = run_script("bench.py", "--smoke", "--tile", "128", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = dict(re.findall(r"^(\w+)=(.*)$", proc.stdout, flags=re.M))
    assert float(printed["train128_default_img_s"]) > 0 and float(printed["gen_whole_mpx_s"]) > 0
    assert "train_default_img_s" not in printed


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("device_type,precision", [("cpu", "auto"), ("cpu", "bf16"),
                                                   pytest.param("cuda", "bf16", marks=CUDA),
                                                   pytest.param("cuda", "fp16", marks=CUDA)])
def test_default_path_matches_baseline_losses(pannuke_folds, device_type, precision):
    """Same initial weights and batch, deterministic targets (no label smoothing) and
    no dropout: the default layout, fused Adam, the frozen D in G's step and autocast
    change speed, not the losses (within half-precision tolerance), step after step.
    fp16 compares its first step only: its GradScaler may skip early updates
    (infinite gradients at the initial scale), where the fp32 baseline steps."""
    device = torch.device(device_type)
    precision = resolve_precision(precision, device)
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    torch.manual_seed(0)
    # Today's default networks (resize U-Net, two-scale PatchGAN), narrow and without dropout.
    cfg = gan.model_config(bench.parse_args(["--ngf", "8", "--ndf", "8", "--no-dropout"]), PANNUKE, 256)
    gen, disc = build_generator(cfg), build_discriminator(cfg)
    step_cfg = StepConfig(l1_lambda=75.0, real_label_range=(0.7, 1.2), fake_label_range=(0.0, 0.3),
                          smooth_real=False, smooth_fake=False, autocast=autocast_context(device, precision))
    optim = dict(lr=2e-4, betas=(0.5, 0.999))
    baseline = bench.TrainPath("baseline", gen, disc, device, step_cfg, plain=True, **optim)
    default = bench.TrainPath("default", gen, disc, device, step_cfg, precision,
                              channels_last=resolve_channels_last(None, device), **optim)
    dataset = PanNukeFolds(pannuke_folds, [1, 2])
    labels, image = map(torch.stack, zip(*(dataset[i] for i in range(2))))

    rtol = 1e-3 if precision == "fp32" else 5e-2
    compared = 1 if precision == "fp16" else 3
    for step in range(6):
        expected = baseline.step(labels, image)
        got = default.step(labels, image).cpu()
        assert torch.isfinite(got).all(), f"step {step}: {got.tolist()}"
        if step < compared:
            assert torch.allclose(got, expected, rtol=rtol, atol=rtol * 1e-2), \
                f"step {step}: default {got.tolist()} vs baseline {expected.tolist()}"
    # Both paths trained. (Their weights are not compared: Adam's first steps are about
    # lr * sign(gradient), so fp32 rounding in near-zero gradients flips whole steps.)
    for path in (baseline, default):
        assert not all(torch.equal(a.cpu(), b) for a, b in zip(path.gen.parameters(), gen.parameters()))
    assert default.scaler_g.is_enabled() == (precision == "fp16")  # fp16 steps go through the GradScaler
