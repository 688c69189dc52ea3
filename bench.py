"""Throughput of training, generation and data loading, measured in one run.

    python bench.py                                   # CPU: batch 2, ngf 64 (about 3 minutes on 2 cores)
    python bench.py --device cuda --batch-size 64     # one GPU (bf16 where supported)
    python bench.py --smoke                           # seconds: tiny widths and images
    python bench.py --json bench.json                 # also write every figure as JSON
    python bench.py --batch-sizes 2 4 8 16 --profile  # batch scaling, and where the step's time goes

Training is timed at 256 px (PanNuke's classes, as train_pannuke.py builds the networks;
figures `train_*`) and at 128 px (CoNIC's classes, as train_conic.py and the study build
them; figures `train128_*`), --tile picks one, for two paths on the same batches from the
project's PanNuke loader (PanNukeFolds with augmentation over folds written by
write_demo_folds; cut to 128 px for the smaller tile):
  baseline  the plain pix2pix loop (Persson's train_fn) in fp32: NCHW, plain Adam,
            D's weights also get gradients in the G step, `.item()` every step;
  default   what train_pannuke.py runs: train_utils.gan_train_step with precision
            'auto', the default layout (channels_last on CUDA, NCHW on CPU), fused
            Adam, D frozen in the G step, losses summed on the device (no sync).
On a CPU the two paths' steps alternate, so load from other processes hits both
alike; on a GPU each path runs alone and steps are timed with CUDA events, which
add no host sync. FLOPs per step are counted once per path (FlopCounterMode, first
warm-up step): at ngf 64, 94.2 G per image for the baseline, 87.7 G for the default
path, whose frozen D skips D's weight gradients in the G step. Generation uses
tiling.py at UniToPatho's 1812 x 1812 px; the UniToPatho loader figures come from
loader_throughput on PNG pairs written to a temp dir, both
decoding every visit and from a filled --cache-dir, and each loader rate is also
printed as a multiple of the default training rate (`loader_*_vs_train`, crops per
training image: at least 1.0 means the loader keeps up with the default workers).
Figures are medians over timed steps (training) or repeats (the rest), warm-up
excluded. Output: one `key=value` line per figure, then a short table.
"""
import argparse
import contextlib
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import gan
import runtime as rt
import train_utils as tu
from augment import DiscriminatorAugment
from config import (CROPS_PER_IMAGE, STUDY_SEGMENTER_BATCH_SIZE, STUDY_SEGMENTER_WIDTH, add_gan_args,
                    check_gan_options)
from dataset.masks import CONIC, PALETTE, PANNUKE
from dataset.pannuke import PanNukeFolds
from dataset.unitopatho import UniToPatho
from dataset.unitopatho_mask import UniToPathoPairs
from demo import write_demo_folds
from losses import LOSSES
from segmenter import build_segmenter, train_step
from tiling import generate_tiled, generate_whole
from utils import run_main

UTP_SIZE = 1812  # UniToPatho images are 1812 x 1812 px
# Training tiles timed, with the label set of the data that comes in that size: PanNuke's
# 256-px patches (figures `train_*`) and CoNIC's 128-px tiles (figures `train128_*`).
TILES = (256, 128)
LABEL_SETS = {256: PANNUKE, 128: CONIC}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=10, help="timed training steps per path")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps per path (the first counts FLOPs)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of the matmul, generation and loader figures")
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op CPU threads (0: PyTorch's choice; on a shared, oversubscribed CPU also try "
                        "OMP_WAIT_POLICY=PASSIVE in the environment)")
    p.add_argument("--compile", action="store_true", help="also time the default path under torch.compile")
    p.add_argument("--ablations", action="store_true",
                   help="also time the default path in the other memory layout, and with plain Adam")
    p.add_argument("--smoke", action="store_true",
                   help="ngf/ndf 8, 2 steps, 1 repeat, small images, 1 thread unless --threads: "
                        "checks in seconds that everything runs")
    p.add_argument("--tile", type=int, nargs="+", default=list(TILES), choices=TILES,
                   help="training tiles to time: 256 (PanNuke patches, UniToPatho crops) and 128 (CoNIC tiles, "
                        "what the study trains on), each with its data's label set")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, metavar="B",
                   help="also time the default path at each batch size (img/s and fraction of the matmul peak)")
    p.add_argument("--profile", action="store_true",
                   help="profile the default step (torch.profiler) and print the 10 ops that take the most time")
    p.add_argument("--json", default=None, metavar="PATH", help="write all figures here as JSON")
    # The networks, losses and optimiser exactly as the training scripts take them (config.GAN_OPTIONS).
    add_gan_args(p)
    args = p.parse_args(argv)
    check_gan_options(args)
    if args.smoke:
        args.ngf = args.ndf = 8
        args.steps, args.warmup, args.repeats = 2, 1, 1
        # Tiny ops on a busy 2-core box stall on OpenMP hand-offs; one thread keeps it quick.
        args.threads = args.threads or 1
    if min([args.batch_size, *(args.batch_sizes or [])]) < 2:
        p.error("--batch-size and --batch-sizes must be at least 2 (BatchNorm at the 1 x 1 bottleneck needs two values)")
    args.gen_size = 300 if args.smoke else UTP_SIZE
    args.matmul_budget_s = 0.2 if args.smoke else 0.5
    return args


# --------------------------------------------------------------------------- timing

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device, repeats, warmup=1, inner=1):
    """Median wall time of one call of fn over `repeats` timed blocks of `inner` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(device)
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


class StepTimer:
    """Wall time of each step. On CUDA, events are recorded in the stream and read
    after one sync at the end, so timing adds no per-step host sync."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.events, self.seconds = [], []

    @contextlib.contextmanager
    def __call__(self):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((start, end))
        else:
            start = time.perf_counter()
            yield
            self.seconds.append(time.perf_counter() - start)

    def median(self):
        if self.events:
            torch.cuda.synchronize()
            self.seconds += [s.elapsed_time(e) / 1e3 for s, e in self.events]
            self.events = []
        return statistics.median(self.seconds)


def matmul_gflops(dtype, device, budget_s, repeats):
    """GFLOP/s of a square matmul, doubled in size (to 4096 on CPU, 8192 on GPU) while
    one product stays under budget_s: emulated dtypes (bf16 without AVX512-BF16 runs
    at well under 1 GFLOP/s) stay small, native ones get large enough to reach peak."""
    n, n_max = 128, 8192 if device.type == "cuda" else 4096
    inner = 10 if device.type == "cuda" else 1
    while True:
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        if n >= n_max or median_seconds(lambda: a @ b, device, 1, inner=inner) * 8 > budget_s:
            # At least 5 repeats: cheap, and one descheduled run must not set the peak.
            seconds = median_seconds(lambda: a @ b, device, max(5, repeats), inner=inner)
            return 2 * n ** 3 / seconds / 1e9
        n *= 2


# --------------------------------------------------------------------------- training paths

def baseline_step(gen, disc, opt_g, opt_d, mask, real, cfg):
    """The same losses (losses.LOSSES) the plain way: fp32, D's weights stay trainable
    in the G step (their gradients are computed, then zeroed in the next D step), and
    the losses are read on the host every step for the progress bar."""
    d_loss, g_adv_loss = LOSSES[disc.kind]
    fake = gen(mask)
    loss_d = d_loss(disc, mask, real, fake.detach(), cfg)
    opt_d.zero_grad()
    loss_d.backward()
    opt_d.step()

    loss_adv = g_adv_loss(disc, mask, real, fake, cfg)
    loss_l1 = nn.functional.l1_loss(fake, real) * cfg.l1_lambda
    opt_g.zero_grad()
    (loss_adv + loss_l1).backward()
    opt_g.step()
    return torch.tensor([loss_d.item(), loss_adv.item(), loss_l1.item()])


class TrainPath:
    """One way of training: its own copies of G and D (same initial weights as every
    other path), its optimisers, and its step."""

    def __init__(self, name, gen, disc, device, step_cfg, precision="fp32", plain=False, channels_last=False,
                 fused=True, compile=False, num_classes=PANNUKE.num_classes, edges=False, *, lr, betas):
        self.name, self.device, self.step_cfg, self.plain = name, device, step_cfg, plain
        self.num_classes, self.edges = num_classes, edges
        self.channels_last = channels_last and not plain  # of weights and inputs, hence of the activations
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        self.gen = copy.deepcopy(gen).to(device, memory_format=layout)
        self.disc = copy.deepcopy(disc).to(device, memory_format=layout)
        if plain or not fused:
            self.opt_g, self.opt_d = (torch.optim.Adam(m.parameters(), lr=lr, betas=betas, foreach=False)
                                      for m in (self.gen, self.disc))
        else:
            self.opt_g, self.opt_d = (rt.make_optimizer(m.parameters(), lr, betas, device)
                                      for m in (self.gen, self.disc))
        self.scaler_g, self.scaler_d = (torch.amp.GradScaler(device.type, enabled=precision == "fp16")
                                        for _ in range(2))
        if compile:
            self.gen, self.disc = rt.maybe_compile(self.gen, True), rt.maybe_compile(self.disc, True)
        self.compiled = compile
        self.nets = tu.Networks(self.gen, self.disc, self.opt_g, self.opt_d, self.scaler_g, self.scaler_d,
                                augment=DiscriminatorAugment(step_cfg.d_augment, 0, device))
        self.loss_sums = torch.zeros(3, device=device)  # as run_training keeps them: on the device
        self.timer = StepTimer(device)
        self.flops_per_step = self.warmup_s = None

    def step(self, labels, image):
        mask, real = gan.prepare_batch(labels, image, self.device, self.channels_last, self.num_classes, self.edges)
        if self.plain:
            return baseline_step(self.gen, self.disc, self.opt_g, self.opt_d, mask, real, self.step_cfg)
        losses = tu.gan_train_step(self.nets, mask, real, self.step_cfg)
        self.loss_sums += losses
        return losses

    def count_flops(self, labels, image):
        with FlopCounterMode(display=False) as counter:
            self.step(labels, image)
        self.flops_per_step = counter.get_total_flops()


def time_training(paths, batches, warmup, steps, interleave):
    """Warm every path up on the same batches, then time `steps` steps of each on the
    next batches: alternating between paths, or one path after the other."""
    for path in paths:
        start = time.perf_counter()
        for i in range(warmup):
            if i == 0 and not path.compiled:
                path.count_flops(*batches[i])
            else:
                path.step(*batches[i])
        sync(path.device)
        path.warmup_s = time.perf_counter() - start
    order = [(i, p) for i in range(steps) for p in paths] if interleave else [(i, p) for p in paths for i in range(steps)]
    for i, path in order:
        with path.timer():
            path.step(*batches[warmup + i])


# --------------------------------------------------------------------------- data

def training_batches(dataset, batch_size, count, workers, device):
    """`count` batches from the project's loader (SeededSampler + make_loader), cycling epochs."""
    sampler = rt.SeededSampler(dataset, shuffle=True, seed=0)
    loader = rt.make_loader(dataset, batch_size, workers, device, sampler=sampler)
    batches, epoch = [], 0
    while len(batches) < count:
        sampler.set_epoch(epoch)
        batches += [batch for batch in loader if batch[0].shape[0] == batch_size]
        epoch += 1
    return batches[:count]


def loader_throughput(data_dir, masks_dir, workers, cache_dir=None, images=32, batch_size=4, crop_size=256,
                      crops_per_image=4, crop_scheme="random", seed=0):
    """Measure the training loader on the first `images` train images with `workers`
    worker processes, as train_utp.py builds it (same dataset, augmentation, loader).

    With cache_dir, an untimed pass fills the cache first, so the figure is the
    memory-mapped steady state of later epochs; without, every item decodes PNGs.
    Returns {"images_per_s", "crops_per_s", "images", "crops", "seconds"}.
    """
    split = UniToPatho(data_dir, "train")
    pairs = UniToPathoPairs(split.take(range(min(images, len(split)))), masks_dir, crop_size, crops_per_image,
                            crop_scheme, augment=True, cache_dir=cache_dir)
    if cache_dir:
        for i in range(len(pairs)):
            pairs.decode(i)
    order = [(i, seed + i) for i in range(len(pairs))]
    loader = rt.make_loader(pairs, batch_size, workers, torch.device("cpu"), sampler=order)
    start = time.perf_counter()
    done = crops = 0
    for labels, _ in loader:
        done += labels.shape[0]
        crops += labels.shape[0] * labels.shape[1]
    seconds = time.perf_counter() - start
    return {"images_per_s": done / seconds, "crops_per_s": crops / seconds, "images": done, "crops": crops,
            "seconds": seconds}


def pannuke_loader_rate(dataset, batch_size, workers, device, repeats):
    """Images/s of whole epochs through make_loader, after one untimed epoch."""
    sampler = rt.SeededSampler(dataset, shuffle=True, seed=0)
    loader = rt.make_loader(dataset, batch_size, workers, device, sampler=sampler)
    rates = []
    for epoch in range(repeats + 1):
        sampler.set_epoch(epoch)
        start = time.perf_counter()
        count = sum(labels.shape[0] for labels, _ in loader)
        if epoch:
            rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


def write_utp_fixture(root, labels, count, size):
    """A UniToPatho-format train split: train.csv, NORM/<id>.png RGB images of size x
    size (scikit-image tissue, mirrored out) and palette-PNG masks (from `labels`)."""
    from PIL import Image
    from skimage import data

    root = Path(root)
    tissue = data.immunohistochemistry()
    image = np.pad(tissue, ((0, size - tissue.shape[0]), (0, size - tissue.shape[1]), (0, 0)), mode="symmetric")
    mask = PALETTE[tile_to(labels, size)]
    (root / "800" / "NORM").mkdir(parents=True)
    (root / "masks" / "training" / "masks").mkdir(parents=True)
    names = [f"bench_{i:03d}.png" for i in range(count)]
    for i, name in enumerate(names):
        Image.fromarray(np.rot90(image, i).copy()).save(root / "800" / "NORM" / name)
        Image.fromarray(np.rot90(mask, i).copy()).save(root / "masks" / "training" / "masks" / name)
    rows = ["image_id,top_label_name,top_label,type_name,type,grade,grade_name"]
    rows += [f"{name},NORM,1,NORM,1,-1,NA" for name in names]
    (root / "800" / "train.csv").write_text("\n".join(rows) + "\n")
    return root / "800", root / "masks"


def tile_to(labels, size):
    """Repeat a class map (mirrored, so tiles join) out to size x size."""
    return np.pad(labels, ((0, max(0, size - labels.shape[0])), (0, max(0, size - labels.shape[1]))),
                  mode="symmetric")[:size, :size]


# --------------------------------------------------------------------------- the run

def describe_device(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {torch.backends.cpu.get_cpu_capability()}"


def load_average():
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def measure_peaks(device, precision, budget_s, repeats):
    """Matmul GFLOP/s in fp32 and bf16 (and fp16 when the default path uses it)."""
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if precision == "fp16":
        dtypes["fp16"] = torch.float16
    return {f"matmul_peak_{key}_gflops": matmul_gflops(dtype, device, budget_s, repeats) for key, dtype in dtypes.items()}


def training_model_config(args, tile):
    """The model config the training script for `tile`-px data (train_pannuke.py at 256,
    train_conic.py at 128) records for these options."""
    return gan.model_config(args, LABEL_SETS[tile], tile)


def figure_prefix(tile):
    return "train" if tile == 256 else f"train{tile}"


def crop_batches(batches, tile):
    """The loader's batches cut to `tile` px (the top-left corner): timing needs real-format
    class maps at that size, and PanNuke's classes are valid in CoNIC's label set."""
    return [(labels[:, :tile, :tile], image[:, :, :tile, :tile]) for labels, image in batches]


def measure_training(args, device, precision, batches, warmup, tile):
    """Time the baseline, the default path and any optional paths on `batches` at `tile` px.
    Returns the figures (prefixed per tile) and the default path (whose generator generation reuses)."""
    torch.manual_seed(0)
    model_cfg = training_model_config(args, tile)
    gen, disc = gan.build_generator(model_cfg), gan.build_discriminator(model_cfg)
    step_cfg = tu.StepConfig(rt.autocast_context(device, precision), args)
    channels_last = rt.resolve_channels_last(None, device)  # the training scripts' default layout
    optim = dict(lr=args.lr, betas=(args.beta1, args.beta2), num_classes=LABEL_SETS[tile].num_classes,
                 edges=model_cfg["instance_edges"])
    paths = [TrainPath("baseline", gen, disc, device, step_cfg, plain=True, **optim),
             TrainPath("default", gen, disc, device, step_cfg, precision, channels_last=channels_last, **optim)]
    if args.ablations:
        flipped = "nchw" if channels_last else "channels_last"
        paths += [TrainPath(f"default_{flipped}", gen, disc, device, step_cfg, precision, channels_last=not channels_last,
                            **optim),
                  TrainPath("default_plain_adam", gen, disc, device, step_cfg, precision, channels_last=channels_last,
                            fused=False, **optim)]
    if args.compile:
        paths.append(TrainPath("compiled", gen, disc, device, step_cfg, precision, channels_last=channels_last,
                               compile=True, **optim))
    time_training(paths, batches, warmup, args.steps, interleave=device.type == "cpu")

    prefix = figure_prefix(tile)
    baseline, default = paths[0], paths[1]
    figures = {f"{prefix}_gflop_per_img": default.flops_per_step / args.batch_size / 1e9,
               f"{prefix}_baseline_gflop_per_img": baseline.flops_per_step / args.batch_size / 1e9}
    base_rate = args.batch_size / baseline.timer.median()
    for path in paths:
        rate = args.batch_size / path.timer.median()
        figures[f"{prefix}_{path.name}_img_s"] = rate
        if path is default:
            figures[f"{prefix}_speedup_vs_fp32_baseline"] = rate / base_rate
        elif path is not baseline:
            figures[f"{prefix}_{path.name}_speedup"] = rate / base_rate
        # Each path's own FLOPs: the baseline's extra D weight gradients count as work done.
        flops = path.flops_per_step or default.flops_per_step
        figures[f"{prefix}_{path.name}_gflops"] = flops / args.batch_size * rate / 1e9
        if path.compiled:
            figures[f"{prefix}_{path.name}_warmup_s"] = path.warmup_s
    return figures, default


def measure_batch_sizes(args, device, precision, dataset, workers, warmup, tile, peak):
    """The default path's img/s and fraction of the matmul peak at each of --batch-sizes."""
    torch.manual_seed(0)
    model_cfg = training_model_config(args, tile)
    gen, disc = gan.build_generator(model_cfg), gan.build_discriminator(model_cfg)
    step_cfg = tu.StepConfig(rt.autocast_context(device, precision), args)
    figures = {}
    for batch_size in args.batch_sizes:
        batches = crop_batches(training_batches(dataset, batch_size, warmup + args.steps, workers, device), tile)
        path = TrainPath("default", gen, disc, device, step_cfg, precision,
                         channels_last=rt.resolve_channels_last(None, device), num_classes=LABEL_SETS[tile].num_classes,
                         edges=model_cfg["instance_edges"], lr=args.lr, betas=(args.beta1, args.beta2))
        time_training([path], batches, warmup, args.steps, interleave=False)
        rate = batch_size / path.timer.median()
        name = f"{figure_prefix(tile)}_batch{batch_size}"
        figures[f"{name}_img_s"] = rate
        figures[f"{name}_peak_fraction"] = path.flops_per_step / batch_size * rate / 1e9 / peak
    return figures


def profile_step(path, batches, top=10):
    """The `top` ops by self time over a few default steps, with their share of the total."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if path.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for labels, image in batches:
            path.step(labels, image)
        sync(path.device)
    attr = "self_device_time_total" if path.device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in events) or 1
    return [(e.key, getattr(e, attr) / total) for e in events[:top]]


def measure_segmenter(args, device, precision, layout):
    """Steps/s and GFLOP/s of the quality study's segmenter step (segmenter.train_step at the study's width and
    batch on 128-px CoNIC-sized tiles) in fp32 and in the default precision: a study's time is mostly these."""
    width, batch = (8, 2) if args.smoke else (STUDY_SEGMENTER_WIDTH, STUDY_SEGMENTER_BATCH_SIZE)
    labels = torch.randint(0, CONIC.num_classes, (batch, 128, 128), dtype=torch.uint8)
    image = torch.randint(0, 256, (batch, 3, 128, 128), dtype=torch.uint8)
    figures = {"segmenter_width": width, "segmenter_batch": batch}
    for name in dict.fromkeys(("fp32", precision)):
        torch.manual_seed(0)
        model = build_segmenter({"encoder": "unet", "width": width, "label_set": CONIC.name})
        model = model.to(device, memory_format=torch.channels_last if layout else torch.contiguous_format)
        opt = rt.make_optimizer(model.parameters(), 1e-3, (0.9, 0.999), device)
        scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16")
        autocast = rt.autocast_context(device, name)

        def step():
            train_step(model, opt, scaler, labels, image, device, layout, autocast)

        with FlopCounterMode(display=False) as counter:
            step()
        seconds = median_seconds(step, device, args.repeats, inner=max(1, args.steps // args.repeats))
        figures[f"segmenter_{name}_steps_s"] = 1 / seconds
        figures[f"segmenter_{name}_gflops"] = counter.get_total_flops() / seconds / 1e9
    return figures


def measure_generation(generator, labels, device, autocast, repeats, num_classes, edges):
    """Megapixels/s generating one class map with tiling.py: whole (reflect-padded to
    a multiple of 256, one forward) and in overlapping 256-px tiles, batched by 8."""
    def forward(mask, seeds):
        return gan.generate(generator, mask, autocast, "eval")

    megapixels = labels.size / 1e6
    whole = median_seconds(lambda: generate_whole(forward, labels, device, num_classes=num_classes, edges=edges),
                           device, repeats)
    tiled = median_seconds(lambda: generate_tiled(forward, labels, device, overlap=64, batch_size=8,
                                                  num_classes=num_classes, edges=edges), device, repeats)
    return {"gen_image_px": labels.shape[0], "gen_whole_mpx_s": megapixels / whole, "gen_tiled_mpx_s": megapixels / tiled}


def measure_loaders(args, dataset, labels, workers, device, tmp):
    """Images/s of the PanNuke training loader and of UniToPatho's (1812-px PNG pairs,
    CROPS_PER_IMAGE crops each) via loader_throughput: decoding
    the PNGs on every visit, and from a filled --cache-dir (memory-mapped arrays)."""
    count = 2 if args.smoke else max(4, 2 * workers)
    size = 512 if args.smoke else UTP_SIZE
    data_dir, masks_dir = write_utp_fixture(Path(tmp) / "utp", labels, count, size)
    figures = {"loader_workers": workers,
               "loader_pannuke_img_s": pannuke_loader_rate(dataset, args.batch_size, workers, device, args.repeats),
               "loader_utp_image_px": size}
    for name, cache_dir in (("utp", None), ("utp_cached", Path(tmp) / "utp-cache")):
        runs = [loader_throughput(data_dir, masks_dir, workers, cache_dir=cache_dir, images=count, batch_size=2,
                                  crops_per_image=CROPS_PER_IMAGE) for _ in range(args.repeats)]
        figures[f"loader_{name}_img_s"] = statistics.median(r["images_per_s"] for r in runs)
        figures[f"loader_{name}_crops_s"] = statistics.median(r["crops_per_s"] for r in runs)
    return figures


def bench(args):
    device = rt.resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = rt.resolve_precision("auto", device)
    results = {"device": describe_device(device), "torch": torch.__version__, "precision": precision,
               "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
               "networks": gan.describe(vars(args)), "batch_size": args.batch_size, "ngf": args.ngf, "ndf": args.ndf,
               "steps": args.steps,
               "warmup": args.warmup, "repeats": args.repeats, "load_avg_start": load_average()}
    # Peaks first, under PyTorch's defaults: the fp32 figure must not be TF32.
    results.update(measure_peaks(device, precision, args.matmul_budget_s, args.repeats))
    # As the training scripts set them; cuDNN convolutions already default to TF32, so
    # the fp32 baseline gets TF32 too.
    rt.configure_cuda_backends(device)

    workers = rt.loader_workers(-1, device)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        per_fold = max(16, args.batch_size)
        write_demo_folds(Path(tmp) / "pannuke", patches_per_fold=(per_fold, per_fold, 1))
        dataset = PanNukeFolds(Path(tmp) / "pannuke", [1, 2], tissue="Colon", augment=True)
        warmup = max(1, args.warmup)
        batches = training_batches(dataset, args.batch_size, warmup + args.steps, workers, device)
        default = None
        for tile in args.tile:
            figures, path = measure_training(args, device, precision, crop_batches(batches, tile), warmup, tile)
            results.update(figures)
            prefix, peak = figure_prefix(tile), results[f"matmul_peak_{precision}_gflops"]
            results[f"{prefix}_default_peak_fraction"] = results[f"{prefix}_default_gflops"] / peak
            if args.batch_sizes:
                results.update(measure_batch_sizes(args, device, precision, dataset, workers, warmup, tile, peak))
            if args.profile:
                results[f"{prefix}_profile"] = profile_step(path, crop_batches(batches, tile)[:3])
            default = path if tile == 256 or default is None else default
        labels = batches[0][0][0].numpy()  # a real-format class map, mirrored out to size
        results.update(measure_generation(rt.unwrap(default.gen), tile_to(labels, args.gen_size), device,
                                          default.step_cfg.autocast, args.repeats, default.num_classes,
                                          default.edges))
        results.update(measure_loaders(args, dataset, labels, workers, device, tmp))
    results.update(measure_segmenter(args, device, precision, rt.resolve_channels_last(None, device)))
    # Each training image is one crop of the first tile timed: above 1.0 the loader keeps up with training.
    train_rate = results[f"{figure_prefix(args.tile[0])}_default_img_s"]
    for name, rate in (("pannuke", "loader_pannuke_img_s"), ("utp", "loader_utp_crops_s"),
                       ("utp_cached", "loader_utp_cached_crops_s")):
        results[f"loader_{name}_vs_train"] = results[rate] / train_rate
    results["load_avg_end"] = load_average()
    return results


def format_value(key, value):
    if isinstance(value, float):
        ratio = "speedup" in key or "fraction" in key or key.endswith("_vs_train")
        return f"{value:.2f}" if ratio else f"{value:.4g}"
    return str(value)


def print_training(r, tile):
    prefix = figure_prefix(tile)
    print(f"\ntraining at {tile} px ({r['networks']}, {LABEL_SETS[tile].name} classes, batch {r['batch_size']})")
    rows = [("", "img/s", "GFLOP/s", "speedup")]
    for name in ("baseline", "default", "default_nchw", "default_channels_last", "default_plain_adam", "compiled"):
        if f"{prefix}_{name}_img_s" in r:
            speedup = r.get(f"{prefix}_speedup_vs_fp32_baseline" if name == "default" else f"{prefix}_{name}_speedup",
                            1.0)
            rows.append((f"  {name}", f"{r[f'{prefix}_{name}_img_s']:.3g}", f"{r[f'{prefix}_{name}_gflops']:.4g}",
                         f"{speedup:.2f}x"))
    for row in rows:
        print(f"{row[0]:<24}{row[1]:>10}{row[2]:>10}{row[3]:>10}")
    print(f"FLOPs per image and step: {r[f'{prefix}_gflop_per_img']:.1f} G on the default path "
          f"({r[f'{prefix}_baseline_gflop_per_img']:.1f} G on the baseline, whose G step also computes D's weight "
          f"gradients); default path at {100 * r[f'{prefix}_default_peak_fraction']:.1f}% of the "
          f"{r['precision']} matmul peak (fp32 {r['matmul_peak_fp32_gflops']:.4g}, "
          f"bf16 {r['matmul_peak_bf16_gflops']:.4g} GFLOP/s)")
    sizes = sorted(int(k[len(prefix) + 6:-6]) for k in r if k.startswith(f"{prefix}_batch") and k.endswith("_img_s"))
    if sizes:
        print("  default path by batch: " + ", ".join(
            f"{b}: {r[f'{prefix}_batch{b}_img_s']:.3g} img/s ({100 * r[f'{prefix}_batch{b}_peak_fraction']:.1f}% "
            f"of peak)" for b in sizes))
    for op, share in r.get(f"{prefix}_profile", []):
        print(f"  {100 * share:5.1f}%  {op}")


def print_table(r):
    for tile in TILES:
        if f"{figure_prefix(tile)}_default_img_s" in r:
            print_training(r, tile)
    print(f"generation of {r['gen_image_px']} x {r['gen_image_px']} px: whole image {r['gen_whole_mpx_s']:.3g} MP/s, "
          f"256-px tiles (overlap 64) {r['gen_tiled_mpx_s']:.3g} MP/s")
    print(f"study segmenter step (width {r['segmenter_width']}, batch {r['segmenter_batch']}, 128 px): "
          + ", ".join(f"{p} {r[f'segmenter_{p}_steps_s']:.3g} steps/s ({r[f'segmenter_{p}_gflops']:.4g} GFLOP/s)"
                      for p in dict.fromkeys(("fp32", r["precision"]))))
    print(f"loaders ({r['loader_workers']} workers), in training images (crops) per second and as a multiple of "
          f"the default training rate (>= 1 keeps up):")
    print(f"  {'PanNuke':<38}{r['loader_pannuke_img_s']:>8.4g} img/s    ({r['loader_pannuke_vs_train']:.1f}x)")
    for name, what in (("utp", "decoding PNGs"), ("utp_cached", "--cache-dir")):
        label = f"UniToPatho {r['loader_utp_image_px']} px, {what}"
        print(f"  {label:<38}{r[f'loader_{name}_crops_s']:>8.4g} crops/s  ({r[f'loader_{name}_vs_train']:.1f}x; "
              f"{r[f'loader_{name}_img_s']:.3g} images/s)")
    print(f"{r['device']}, {r['threads']} threads, OMP_WAIT_POLICY {r['omp_wait_policy']}, torch {r['torch']}, "
          f"load average {r['load_avg_start']:.2f} -> {r['load_avg_end']:.2f}")


@run_main
def main(argv=None):
    args = parse_args(argv)
    results = bench(args)
    for key, value in results.items():
        if not isinstance(value, list):  # the profiles are printed in the table
            print(f"{key}={format_value(key, value)}")
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
