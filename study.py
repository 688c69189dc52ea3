r"""Does synthetic H&E help? One command asks three questions of any CoNIC-layout folder: do synthetic
images look real, do they follow their masks, and does adding them help a nucleus segmenter?

    python study.py --data-dir ../shared/data/lizard_128 --out-dir runs/study    # about 70 min on 2 CPU cores
    python study.py --data-dir data/conic --out-dir runs/study_full --full --device cuda   # about 3 hours
    python study.py --data-dir ../shared/data/lizard_128 --smoke                 # a tiny end-to-end check

The patches are split into train and test by source image. For each labelled fraction k (--fractions, percent
of the training split, whole source images where possible) a GAN (the training scripts' default) learns from the k%
labelled tiles alone and paints synthetic tiles from (a) those masks and (b) new layouts made from them
(dataset/layouts.py). A nucleus segmenter is then trained twice per seed, with the same seed, schedule and
number of steps: on the k% real tiles, and on those plus the synthetic ones; both are scored on the real test
tiles (Dice and panoptic quality). Realism and mask fidelity use the GAN of the largest k on the test masks:
C2ST and the domain Fréchet and kernel distances (in the pooled encoder features of a reference segmenter
trained on all real training tiles; not FID/KID), each beside its real-vs-real floor, and that segmenter's
Dice on the synthetic test tiles beside its Dice on the real ones. Nothing is downloaded.

Each stage writes its outputs and a done.json marker into its folder of S (--out-dir):
    split/                         S/split.csv (train/test), S/k<k>/split.csv (train = the k% labelled tiles)
    reference/                     segmenter.pt, trained on all real training tiles: the ceiling
    k<k>/gan/                      train_conic.py's run (checkpoints/last.pt, samples/), epochs fitted to the budget
    k<k>/synthetic_a/, _b/         CoNIC folders: the labelled masks repainted (a), new layouts painted (b)
    k<k>/augment/<pool>_s<seed>/   test scores of a segmenter trained on real or real + synthetic tiles
    realism/                       synthetic_test/ (the test masks painted), grid.png, realism and fidelity
then S/metrics.json, S/report.html, S/dice_vs_fraction.png and a table on stdout. A re-run skips finished
stages and resumes an interrupted GAN from its last.pt, so a killed study continues where it stopped.
S/study.json records the options; a re-run with other options is refused unless --overwrite.

To compare GANs (--generator, --upsample, --discriminator, --noise-dim, --l1-lambda) at equal budget, run one
study, then the others with --reference-from <that study>: they copy its reference stage, so one segmenter
judges them all and every study trains its segmenters for the same steps. compare_studies.py puts them in
one table and one grid.
"""
import argparse
import bisect
import html
import itertools
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import config
import metrics
import train_conic
from dataset.common import split_item
from dataset.conic import (CoNIC, most_nuclei_first, open_conic, patch_source, read_split_file, split_by_source,
                           write_conic_folder, write_split_file)
from dataset.layouts import new_layouts, relabel_instances
from dataset.masks import CONIC, get_label_set, labels_to_onehot, labels_to_rgb
from report import data_uri, fmt, grid, table, to_uint8_image
from gan import generate, load_generator, parameter_counts, read_checkpoint
from generator_model import depth_for_tile
from runtime import (SeededSampler, autocast_context, loader_workers, make_loader, make_optimizer,
                     resolve_channels_last, resolve_device, resolve_precision)
from segmenter import (CHECKPOINT_KIND, CHECKPOINT_VERSION, build_segmenter, load_segmenter, segmenter_features,
                       train_step)
from utils import (UserError, atomic_save_figure, atomic_write, atomic_save_npy, atomic_save_png, atomic_save_text,
                   atomic_save_torch, run_main, seed_everything, within)

# Design
OUT_DIR = "runs/study"
FRACTIONS = (10, 25, 100)     # labelled percent of the training split
SEEDS = 3                     # segmenter seeds per labelled fraction and pool
MIN_LABELLED_TILES = 4
LAYOUTS_PER_TILE = 1.0        # new layouts (source b) per labelled tile
NUCLEI_COPIED = 5             # nuclei pasted into each new layout (dataset.layouts.copy_nuclei)
RARE_CLASS_WEIGHT = 1.0       # how much more often copy_nuclei draws a rare class's nuclei (1: as often)
RARE_SHARE = 0.05             # a class with under this share of the labelled nuclei is rare
POOLS = ("real", "real+synthetic")
DIVERSITY_SAMPLES = 3         # paintings per test mask for the diversity score
DIVERSITY_MASKS = 32          # test masks (those with most nuclei) it is measured on
DIVERSITY_SEED_STEP = 1_000_003  # seed offset between a mask's paintings

# Budget: every GAN gets --budget-minutes; each segmenter run a share of it, as a fixed number of steps.
BUDGET_MINUTES = 12.0
SEGMENTER_SHARES = {"reference": 0.25, "augment": 0.125}
MIN_SEGMENTER_STEPS = 2
CALIBRATION_STEPS = 3         # timed segmenter steps that turn the shares into steps

# Networks and scoring
GAN_WIDTH = 32
GAN_SAMPLES = 4               # rows of train_conic.py's sample grids (held-out test tiles)
SEGMENTER_WIDTH = 16
SEGMENTER_BATCH_SIZE = 8
C2ST_EPOCHS = 15
C2ST_FOLDS = 5
BATCH = 16                    # tiles per generator forward pass
GRID_ROWS = 4

# Tiny networks run fastest on one thread, above all on a CPU other processes share.
SMOKE = dict(fractions=[50, 100], seeds=2, budget_minutes=0.05, ngf=8, ndf=8, segmenter_width=8, c2st_epochs=2,
             threads=1, out_dir="runs/study_smoke")
FULL = dict(budget_minutes=30.0, ngf=64, ndf=64, segmenter_width=32, segmenter_batch_size=16)
# What makes two studies the same study (S/study.json); device and speed options are not among them.
# Studies that differ in GAN_OPTIONS alone compare GANs at equal budget (compare_studies.py).
GAN_OPTIONS = ("ngf", "ndf", "generator", "upsample", "discriminator", "noise_dim", "l1_lambda")
STUDY_OPTIONS = ("fractions", "seeds", "seed", "test_fraction", "budget_minutes", *GAN_OPTIONS, "segmenter_width",
                 "segmenter_batch_size", "synthetic", "layouts_per_tile", "rare_class_weight", "c2st_epochs",
                 "reference_from")
# What a reference stage depends on: a study may copy another's when these agree (--reference-from).
REFERENCE_OPTIONS = ("data_dir", "seed", "test_fraction", "budget_minutes", "segmenter_width", "segmenter_batch_size")


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=config.HelpFormatter)
    g = p.add_argument_group("data and outputs")
    g.add_argument("--data-dir", default=config.CONIC_DIR,
                   help="CoNIC-layout folder: images.npy, labels.npy, patch_info.csv (square tiles)")
    g.add_argument("--out-dir", default=OUT_DIR, help="the study folder S (see above)")
    g.add_argument("--overwrite", action="store_true",
                   help="delete the study already in --out-dir and start afresh (needed when its options differ)")
    g.add_argument("--reference-from", default=None, metavar="S0",
                   help="copy the reference stage of study S0 (same data, split, budget and segmenter options) "
                        "instead of training one: the same judge of realism and fidelity, and the same segmenter "
                        "step counts, so that studies differing only in the GAN compare like with like "
                        "(compare_studies.py requires it)")
    g.add_argument("--test-fraction", type=float, default=config.CONIC_TEST_FRACTION,
                   help="share of patches held out for testing, whole source images at a time")
    g = p.add_argument_group("design")
    g.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS),
                   help="labelled fractions k, in percent of the training split")
    g.add_argument("--seeds", type=int, default=SEEDS,
                   help="segmenter seeds (--seed, --seed + 1, ...) per fraction and pool; mean and sd are over them")
    g.add_argument("--synthetic", default="ab", choices=["a", "b", "ab"],
                   help="synthetic tiles added to the real ones: (a) the labelled masks repainted, (b) new layouts")
    g.add_argument("--layouts-per-tile", type=float, default=LAYOUTS_PER_TILE,
                   help="new layouts (b) made per labelled tile")
    g.add_argument("--rare-class-weight", type=float, default=RARE_CLASS_WEIGHT,
                   help=f"new layouts draw the pasted nuclei of rare classes (under {RARE_SHARE * 100:g}%% of the "
                        f"labelled nuclei) this many times as often as the others")
    g = p.add_argument_group("budget and networks")
    g.add_argument("--budget-minutes", type=float, default=BUDGET_MINUTES,
                   help="training time per GAN; its epochs follow from the first epoch's time. Each segmenter "
                        "trains for a fixed number of steps taking about "
                        + ", ".join(f"{share:g} x this ({name})" for name, share in SEGMENTER_SHARES.items()))
    g.add_argument("--ngf", type=int, default=GAN_WIDTH, help="generator width")
    g.add_argument("--ndf", type=int, default=GAN_WIDTH, help="discriminator width")
    g.add_argument("--generator", default=config.GENERATOR, choices=config.GENERATORS,
                   help="the GAN's generator (train_conic.py --generator)")
    g.add_argument("--discriminator", default=config.DISCRIMINATOR, choices=config.DISCRIMINATORS,
                   help="the GAN's discriminator (train_conic.py --discriminator)")
    g.add_argument("--upsample", default=config.UPSAMPLE, choices=config.UPSAMPLES,
                   help="unet: the decoder's upsampling (train_conic.py --upsample)")
    g.add_argument("--noise-dim", type=int, default=0, help="spade: per-image noise (train_conic.py --noise-dim)")
    g.add_argument("--l1-lambda", type=float, default=config.L1_LAMBDA,
                   help="weight of the GAN's L1 loss (train_conic.py --l1-lambda; OASIS trains with 0)")
    g.add_argument("--segmenter-width", type=int, default=SEGMENTER_WIDTH, help="U-Net segmenter width")
    g.add_argument("--segmenter-batch-size", type=int, default=SEGMENTER_BATCH_SIZE, help="segmenter batch size")
    g.add_argument("--c2st-epochs", type=int, default=C2ST_EPOCHS, help="epochs of each C2ST classifier")
    g.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0: torch's default); 1 is far faster on a CPU other jobs share")
    presets = g.add_mutually_exclusive_group()
    presets.add_argument("--smoke", action="store_true",
                         help="a tiny study for tests (given flags still win): "
                              + ", ".join(f"{k}={v}" for k, v in SMOKE.items()))
    presets.add_argument("--full", action="store_true",
                         help="GPU schedules (given flags still win): " + ", ".join(f"{k}={v}" for k, v in FULL.items()))
    config.add_device_args(p)
    return p


def parse_args(argv):
    """Options in rising priority: the defaults above, the --smoke or --full preset, the command line."""
    p = parser()
    args = p.parse_args(argv)
    if args.smoke or args.full:
        p.set_defaults(**(SMOKE if args.smoke else FULL))
        args = p.parse_args(argv)
    bad = [k for k in args.fractions if not 0 < k <= 100]
    if bad:
        raise UserError(f"--fractions are percentages of the training split, in (0, 100]; got {bad[0]:g}")
    args.fractions = sorted({float(k) for k in args.fractions})
    config.check_option_ranges(args, {"seeds": 1, "ngf": 1, "ndf": 1, "segmenter_width": 1,
                                      "segmenter_batch_size": 1, "c2st_epochs": 1, "threads": 0},
                               positive=("budget_minutes", "layouts_per_tile", "rare_class_weight"))
    if not 0 < args.test_fraction < 1:
        raise UserError(f"--test-fraction must be between 0 and 1 (exclusive), got {args.test_fraction}")
    return args


def study_options(args):
    """What S/study.json records (paths resolved, so that a study can be found from anywhere)."""
    options = {name: getattr(args, name) for name in STUDY_OPTIONS} | {"data_dir": str(Path(args.data_dir).resolve())}
    if args.reference_from:
        options["reference_from"] = str(Path(args.reference_from).resolve())
    return options


def check_reference_source(args, options):
    """--reference-from S0: a study whose reference stage has finished, made with the same REFERENCE_OPTIONS."""
    if not args.reference_from:
        return
    source = Path(args.reference_from)
    record, marker = source / "study.json", source / "reference" / "done.json"
    if not record.is_file() or not marker.is_file():
        raise UserError(f"--reference-from {source}: no finished reference stage there ({marker} not found)")
    if source.resolve() == Path(args.out_dir).resolve():
        raise UserError(f"--reference-from {source} is this study's own --out-dir; give another study")
    saved = json.loads(record.read_text())["options"]
    differ = [f"{name} {saved.get(name)} there, {options[name]} here" for name in REFERENCE_OPTIONS
              if saved.get(name) != options[name]]
    if differ:
        raise UserError(f"--reference-from {source}: its reference was made with other options ({'; '.join(differ)})")


def open_data(data_dir):
    """The patch names of a CoNIC folder whose tiles both networks can take."""
    images, _, names = open_conic(data_dir)
    height, width = images.shape[1:3]
    if height != width:
        raise UserError(f"{data_dir}: the study needs square tiles (they are rotated), got {width} x {height}")
    try:
        depth_for_tile(height)  # the GAN's U-Net; its multiples also suit the segmenter's
    except ValueError as exc:
        raise UserError(f"{data_dir}: {exc}") from None
    return names


def claim_out_dir(args, options):
    """S, holding this study's record: a study made with other options, or a folder of other files, is refused
    (--overwrite deletes a study and starts afresh)."""
    out = Path(args.out_dir)
    record = out / "study.json"
    if within(out, args.data_dir):
        raise UserError(f"--out-dir {out} is inside --data-dir {args.data_dir}; choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out-dir {out} is a file; give a folder for the study")
    if record.is_file():
        saved = json.loads(record.read_text())["options"]
        changed = [f"{k} {saved.get(k)} there, {v} here" for k, v in options.items() if saved.get(k) != v]
        if args.overwrite:
            shutil.rmtree(out)
        elif changed:
            raise UserError(f"{out} holds a study made with other options ({'; '.join(changed)}); give the same "
                            f"options to continue it, --overwrite to delete it, or a new --out-dir")
    elif out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out-dir {out} holds files but no study.json; give an empty or new folder")
    if not record.is_file():
        atomic_save_text(record, json.dumps({"options": options}, indent=1))
    return out


# --------------------------------------------------------------------------- the study's data and stages

@dataclass
class Tiles:
    images: np.ndarray      # (N, H, W, 3) uint8
    classes: np.ndarray     # (N, H, W) uint8 CoNIC class ids
    instances: np.ndarray   # (N, H, W) int32, 0 = no nucleus
    names: list


def read_tiles(dataset):
    """A CoNIC dataset's patches as arrays (each item's labels checked as it is read)."""
    return Tiles(np.asarray(dataset.images[dataset.indices]), np.stack([dataset.classes(i) for i in range(len(dataset))]),
                 np.stack([dataset.instances(i) for i in range(len(dataset))]), list(dataset.names))


class Study:
    """The options, S, the device, and the split as the split stage wrote it."""

    def __init__(self, args, out, names):
        self.args, self.out, self.names = args, out, names
        if args.threads:
            torch.set_num_threads(args.threads)
        self.device = resolve_device(args.device)
        self.precision = resolve_precision(args.precision, self.device)
        self.autocast = autocast_context(self.device, self.precision)
        self.channels_last = resolve_channels_last(args.channels_last, self.device)
        self.workers = loader_workers(args.workers, self.device)
        self.seeds = [args.seed + i for i in range(args.seeds)]

    def kdir(self, k):
        return self.out / f"k{k:g}"

    def split(self, k=None):
        """(train, test) indices: the study's split, or with k the k% labelled tiles and the test side."""
        return read_split_file(self.kdir(k) / "split.csv" if k is not None else self.out / "split.csv", self.names)

    def gan_checkpoint(self, k):
        return self.kdir(k) / "gan" / "checkpoints" / "last.pt"

    @cached_property
    def test(self):
        """The held-out real test tiles (Tiles), read once."""
        return read_tiles(CoNIC(self.args.data_dir, self.split()[1]))


def run_stage(out, name, work):
    """work()'s dict, with the seconds it took, saved as S/<name>/done.json; a stage whose marker is there has
    finished and is skipped."""
    marker = out / name / "done.json"
    if marker.is_file():
        print(f"[{name}] done already, skipped", flush=True)
        return json.loads(marker.read_text())
    print(f"[{name}] running", flush=True)
    started = time.perf_counter()
    result = {**work(), "seconds": round(time.perf_counter() - started, 2)}
    atomic_save_text(marker, json.dumps(result, indent=1, allow_nan=False))
    return result


# --------------------------------------------------------------------------- 1. split

def labelled_subsets(names, train, fractions, seed):
    """{k: sorted indices of the k% labelled tiles}, drawn from `train` and nested (a smaller k's tiles are in
    every larger k's). Sources come in a seeded order; each k first takes every remaining whole source that
    still fits its count, then tops up with single tiles (in a seeded order) from the sources in that order."""
    rng = np.random.default_rng(seed)
    groups = {}
    for i in train:
        groups.setdefault(patch_source(names[i]), []).append(int(i))
    order = [sorted(groups)[j] for j in rng.permutation(len(groups))]
    left = {s: [groups[s][j] for j in rng.permutation(len(groups[s]))] for s in order}
    chosen, subsets = [], {}
    for k in sorted(fractions):
        target = min(len(train), max(MIN_LABELLED_TILES, round(k / 100 * len(train))))
        for s in order:
            if left[s] and len(chosen) + len(left[s]) <= target:
                chosen, left[s] = chosen + left[s], []
        for s in order:
            take = target - len(chosen)
            chosen, left[s] = chosen + left[s][:take], left[s][take:]
        subsets[k] = np.array(sorted(chosen), dtype=np.int64)
    return subsets


def split_stage(study):
    args, names = study.args, study.names
    train, test = split_by_source(names, args.test_fraction, args.seed)
    write_split_file(study.out / "split.csv", names, train, test)
    subsets = labelled_subsets(names, train, args.fractions, args.seed)
    for k, subset in subsets.items():
        write_split_file(study.kdir(k) / "split.csv", names, subset, test)

    def count(indices):
        return {"tiles": len(indices), "sources": len({patch_source(names[i]) for i in indices})}
    return {"train": count(train), "test": count(test), "labelled": {f"{k:g}": count(s) for k, s in subsets.items()}}


# --------------------------------------------------------------------------- 2. reference segmenter

def segmenter_config(args):
    return {"encoder": "unet", "width": args.segmenter_width, "label_set": CONIC.name}


def train_segmenter(study, dataset, steps, seed):
    """A fresh segmenter trained for exactly `steps` Adam steps on `dataset` (CoNIC items; seeded flips and
    rotations through SeededSampler), its lr on a cosine from config.SEGMENTER_LR to 0 over those steps, so the
    schedule is the same whatever the pool. Returned in eval mode."""
    seed_everything(seed)
    layout = torch.channels_last if study.channels_last else torch.contiguous_format
    model = build_segmenter(segmenter_config(study.args)).to(study.device, memory_format=layout)
    opt = make_optimizer(model.parameters(), config.SEGMENTER_LR, (0.9, 0.999), study.device)
    scaler = torch.amp.GradScaler(study.device.type, enabled=study.precision == "fp16")
    sampler = SeededSampler(dataset, seed=seed)
    loader = make_loader(dataset, study.args.segmenter_batch_size, study.workers, study.device, sampler=sampler)
    model.train()
    step = 0
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        for labels, image in loader:
            for group in opt.param_groups:
                group["lr"] = config.SEGMENTER_LR * 0.5 * (1 + math.cos(math.pi * step / steps))
            train_step(model, opt, scaler, labels, image, study.device, study.channels_last, study.autocast)
            step += 1
            if step == steps:
                return model.eval()


@torch.no_grad()
def predict(study, model, images):
    """(N, H, W) uint8 class maps of a segmenter for uint8 (N, H, W, 3) images."""
    batches = torch.from_numpy(images).permute(0, 3, 1, 2).split(study.args.segmenter_batch_size)
    maps = []
    for batch in batches:
        with study.autocast:
            maps.append(model(batch.to(study.device).float().div(255)).argmax(1).byte().cpu())
    return torch.cat(maps).numpy()


def segmentation_scores(pred, tiles):
    """Dice and IoU per class and for all nuclei (metrics.mask_scores), and panoptic quality: predicted
    instances are the 4-connected pieces of each predicted class; PQ over all nuclei and per class, and mPQ,
    the mean of the per-class PQs that are defined."""
    cm = metrics.confusion_matrix(torch.from_numpy(pred), torch.from_numpy(tiles.classes), CONIC.num_classes)
    pred_instances = np.stack([relabel_instances(p, (p != CONIC.background).astype(np.int32)) for p in pred])
    pq = {"Nuclei": metrics.panoptic_quality(pred_instances, tiles.instances)["pq"]}
    for c in CONIC.nucleus_classes:
        pq[CONIC.class_names[c]] = metrics.panoptic_quality(np.where(pred == c, pred_instances, 0),
                                                            np.where(tiles.classes == c, tiles.instances, 0))["pq"]
    per_class = [v for name, v in pq.items() if name != "Nuclei" and v is not None]
    return {**metrics.mask_scores(cm, CONIC), "pq": pq, "mpq": float(np.mean(per_class)) if per_class else None}


def reference_stage(study):
    """The segmenter trained on every real training tile: the ceiling, the feature space of the domain
    distances, and the judge of mask fidelity. Its step time, measured first, turns SEGMENTER_SHARES of the
    budget into the fixed step counts of every segmenter in the study."""
    args = study.args
    if args.reference_from:
        return copy_reference(study, Path(args.reference_from))
    train = CoNIC(args.data_dir, study.split()[0], augment=True)
    train_segmenter(study, train, 1, args.seed)  # warm-up: a process's first steps are slower
    started = time.perf_counter()
    train_segmenter(study, train, CALIBRATION_STEPS, args.seed)
    step_seconds = (time.perf_counter() - started) / CALIBRATION_STEPS
    steps = {name: max(MIN_SEGMENTER_STEPS, int(share * args.budget_minutes * 60 / step_seconds))
             for name, share in SEGMENTER_SHARES.items()}
    model = train_segmenter(study, train, steps["reference"], args.seed)
    # A train_segmenter.py-style checkpoint: segmenter.load_segmenter (and make_masks.py) read it.
    atomic_save_torch({"kind": CHECKPOINT_KIND, "version": CHECKPOINT_VERSION, "model": model.state_dict(),
                       "model_config": segmenter_config(args), "mpp": config.CONIC_MPP},
                      study.out / "reference" / "segmenter.pt")
    return {"tiles": len(train), "step_seconds": step_seconds, "steps": steps,
            "test": segmentation_scores(predict(study, model, study.test.images), study.test)}


def copy_reference(study, source):
    """Study S0's reference stage (checked by check_reference_source): its segmenter, copied into this
    study, and its marker (scores, step counts) with the folder it came from."""
    if (source / "split.csv").read_bytes() != (study.out / "split.csv").read_bytes():
        raise UserError(f"--reference-from {source}: its split.csv differs from this study's")
    target = study.out / "reference" / "segmenter.pt"
    atomic_write(target, lambda f: f.write((source / "reference" / "segmenter.pt").read_bytes()))
    marker = json.loads((source / "reference" / "done.json").read_text())
    marker.pop("seconds")
    return marker | {"copied_from": str(source.resolve())}


# --------------------------------------------------------------------------- 3. GAN per labelled fraction

def checkpoint_progress(path):
    """(epochs finished, optimiser steps) of a GAN checkpoint; (0, 0) when there is none yet."""
    if not path.is_file():
        return 0, 0
    ckpt = read_checkpoint(path)
    return ckpt["epoch"], ckpt["step"]


def gan_stage(study, k):
    """pix2pix on the k% labelled tiles alone, by train_conic.py in this process. The first epoch (or, after an
    interrupted run, the next one) is timed, start-up and saving included, and fixes the epochs that fill the
    budget (plan.json); a re-run resumes from the run's last.pt."""
    args, last = study.args, study.gan_checkpoint(k)
    plan_path = last.parents[1] / "plan.json"

    def train(epochs):
        argv = ["--data-dir", args.data_dir, "--split-file", study.kdir(k) / "split.csv", "--out-dir", last.parents[1],
                "--label-set", CONIC.name, "--ngf", args.ngf, "--ndf", args.ndf, "--generator", args.generator,
                "--upsample", args.upsample, "--discriminator", args.discriminator, "--noise-dim", args.noise_dim,
                "--l1-lambda", args.l1_lambda, "--epochs", epochs,
                "--seed", args.seed,
                "--wandb", "disabled", "--save-every", 0, "--num-samples", GAN_SAMPLES, "--device", args.device,
                "--precision", args.precision, "--workers", args.workers]
        if args.channels_last is not None:
            argv.append("--channels-last" if args.channels_last else "--no-channels-last")
        if args.compile:
            argv.append("--compile")
        if last.is_file():
            argv += ["--resume", last]
        started = time.perf_counter()
        train_conic.main([str(a) for a in argv])
        return time.perf_counter() - started

    if plan_path.is_file():
        plan = json.loads(plan_path.read_text())
    else:
        first = checkpoint_progress(last)[0] + 1
        seconds = train(first)
        plan = {"epoch_seconds": seconds, "epochs": max(first, int(args.budget_minutes * 60 / seconds))}
        atomic_save_text(plan_path, json.dumps(plan))
    seconds = plan["epoch_seconds"]
    if checkpoint_progress(last)[0] < plan["epochs"]:
        seconds += train(plan["epochs"])
    epochs, steps = checkpoint_progress(last)
    model_config = read_checkpoint(last)["model_config"]
    return {"tiles": len(study.split(k)[0]), "epochs": epochs, "steps": steps, "epoch_seconds": plan["epoch_seconds"],
            "train_seconds": seconds, "checkpoint": str(last.relative_to(study.out)), "model_config": model_config,
            "parameters": parameter_counts(model_config)}


# --------------------------------------------------------------------------- 4. synthetic tiles

@torch.no_grad()
def paint(study, checkpoint, classes, first_seed=0):
    """uint8 (N, H, W, 3) tiles painted from (N, H, W) class maps by a checkpoint's generator in eval mode
    (running BatchNorm statistics, no dropout: a tile does not depend on its batch); tile i's noise, for
    generators that take noise, is seeded from first_seed + i."""
    generator, ckpt = load_generator(checkpoint, study.device)
    num_classes = get_label_set(ckpt["model_config"]["label_set"]).num_classes
    tiles = []
    for start in range(0, len(classes), BATCH):
        mask = labels_to_onehot(torch.from_numpy(classes[start:start + BATCH]).to(study.device), num_classes)
        seeds = range(first_seed + start, first_seed + start + len(mask))
        tiles += [to_uint8_image(fake) for fake in generate(generator, mask, study.autocast, "eval", seeds)]
    return np.stack(tiles)


def write_tiles(folder, images, classes, instances, names):
    """A CoNIC folder (labels.npy as uint16 [instance id, class id])."""
    write_conic_folder(folder, images, np.stack([instances, classes], -1).astype(np.uint16), names)


def rare_class_weights(tiles, weight):
    """({class: weight} for the classes with under RARE_SHARE of the nuclei in `tiles`, for copy_nuclei), and
    the nucleus counts behind it."""
    counts = np.zeros(CONIC.num_classes, dtype=np.int64)
    for classes, instances in zip(tiles.classes, tiles.instances):
        ids, first = np.unique(instances, return_index=True)
        counts += np.bincount(classes.ravel()[first[ids > 0]], minlength=CONIC.num_classes)
    rare = [c for c in CONIC.nucleus_classes if 0 < counts[c] < RARE_SHARE * counts.sum()]
    return {c: weight for c in rare}, {"nuclei": {CONIC.class_names[c]: int(counts[c]) for c in CONIC.nucleus_classes},
                                       "rare_classes": [CONIC.class_names[c] for c in rare]}


def synthetic_stage(study, k, source):
    """Source a: the labelled masks repainted (the original work's scheme). Source b: new layouts from them
    (elastic deformation + nuclei copied between tiles, rare classes drawn --rare-class-weight times as often)."""
    args = study.args
    labelled = read_tiles(CoNIC(args.data_dir, study.split(k)[0]))
    classes, instances, names, info = labelled.classes, labelled.instances, labelled.names, {}
    if source == "b":
        weights, info = rare_class_weights(labelled, args.rare_class_weight)
        count = max(1, round(args.layouts_per_tile * len(names)))
        layouts = new_layouts(classes, instances, count, seed=args.seed, copies=NUCLEI_COPIED, class_weights=weights)
        classes, instances = map(np.stack, zip(*layouts))
        names = [f"layout-{j:05d}" for j in range(count)]
    write_tiles(study.kdir(k) / f"synthetic_{source}", paint(study, study.gan_checkpoint(k), classes), classes,
                instances, names)
    return {"tiles": len(names), **info}


# --------------------------------------------------------------------------- 5. augmentation experiment

class Pool(torch.utils.data.ConcatDataset):
    """ConcatDataset that hands the sampler's (index, seed) items on, so every tile keeps its seeded augmentation."""

    def __getitem__(self, item):
        index, seed = split_item(item)
        part = bisect.bisect_right(self.cumulative_sizes, index)
        return self.datasets[part][(index - (self.cumulative_sizes[part - 1] if part else 0), seed)]


def augment_stage(study, k, pool, seed, steps):
    """A segmenter trained on the k% real tiles, alone or with the synthetic ones (--synthetic), for the same
    `steps`; scored on the real test tiles."""
    args = study.args
    parts = [CoNIC(args.data_dir, study.split(k)[0], augment=True)]
    if pool == "real+synthetic":
        parts += [CoNIC(study.kdir(k) / f"synthetic_{source}", augment=True) for source in args.synthetic]
    model = train_segmenter(study, Pool(parts), steps, seed)
    return {"pool": pool, "seed": seed, "tiles": sum(map(len, parts)), "steps": steps,
            "test": segmentation_scores(predict(study, model, study.test.images), study.test)}


# --------------------------------------------------------------------------- 6. realism and mask fidelity

def c2st(study, real, other):
    """metrics.c2st with as many folds (up to C2ST_FOLDS) as the sets allow; None below two images a side."""
    folds = min(C2ST_FOLDS, len(real), len(other))
    if folds < 2:
        return None
    return metrics.c2st(real, other, folds=folds, epochs=study.args.c2st_epochs, seed=study.args.seed,
                        device=study.device)


def ratio(a, b):
    return a / b if a is not None and b else None


def sample_diversity(study, checkpoint, classes, model):
    """Mean pairwise distance, in the reference segmenter's pooled features, between DIVERSITY_SAMPLES
    paintings of each mask with different seeds: 0 for a generator that paints a mask one way only
    (pix2pix in eval mode), above 0 when noise makes the paintings differ."""
    features = torch.stack([segmenter_features(model, paint(study, checkpoint, classes, j * DIVERSITY_SEED_STEP),
                                               study.device) for j in range(DIVERSITY_SAMPLES)], 1)  # (masks, K, D)
    k = features.shape[1]
    return {"samples_per_mask": k, "masks": len(classes),
            "mean_pairwise_feature_distance": float(torch.cdist(features, features).sum((1, 2)).mean() / (k * (k - 1)))}


def realism_stage(study, reference):
    """The test masks painted by the GAN of the largest k. Realism: every score compares the real tiles of
    one half of the test masks (metrics.real_vs_real_split) with the other half, painted or real (the floor),
    so both sides have the same sizes. Fidelity: the reference segmenter's scores on the painted tiles
    against its scores on the real ones (the ceiling)."""
    args, test, folder = study.args, study.test, study.out / "realism"
    k = max(args.fractions)
    started = time.perf_counter()
    fake = paint(study, study.gan_checkpoint(k), test.classes)
    paint_seconds = time.perf_counter() - started
    write_tiles(folder / "synthetic_test", fake, test.classes, test.instances, test.names)
    model, _ = load_segmenter(study.out / "reference" / "segmenter.pt", study.device)
    half_a, half_b = metrics.real_vs_real_split(len(fake), args.seed)
    real_features = segmenter_features(model, test.images, study.device)  # Segmenter.pooled_features, float64
    sides = {"synthetic": (fake, segmenter_features(model, fake, study.device)),
             "real_vs_real": (test.images, real_features)}
    realism = {}
    for name, (images, features) in sides.items():
        kernel_mean, kernel_std = metrics.kernel_distance(real_features[half_a], features[half_b], seed=args.seed)
        realism[name] = {"c2st": c2st(study, test.images[half_a], images[half_b]),
                         "domain_frechet_distance": metrics.frechet_distance(real_features[half_a], features[half_b]),
                         "domain_kernel_distance": {"mean": kernel_mean, "std": kernel_std}}
    synthetic, real = segmentation_scores(predict(study, model, fake), test), reference["test"]
    most_nuclei = most_nuclei_first(test.classes)
    rows = [[labels_to_rgb(test.classes[i], CONIC), test.images[i], fake[i]] for i in most_nuclei[:GRID_ROWS]]
    atomic_save_png(grid(rows), folder / "grid.png")
    diversity = sample_diversity(study, study.gan_checkpoint(k), test.classes[most_nuclei[:DIVERSITY_MASKS]], model)
    return {"gan": f"{k:g}", "tiles": len(fake), "tiles_per_second": len(fake) / paint_seconds,
            "halves": [len(half_a), len(half_b)], **realism,
            "diversity": diversity,
            "mask_fidelity": {"synthetic": synthetic, "ratio": {
                "nuclei_dice": ratio(synthetic["dice"]["Nuclei"], real["dice"]["Nuclei"]),
                "mean_dice_types": ratio(synthetic["mean_dice_types"], real["mean_dice_types"]),
                "nuclei_pq": ratio(synthetic["pq"]["Nuclei"], real["pq"]["Nuclei"])}}}


# --------------------------------------------------------------------------- 7. report

def mean_sd(values):
    values = [v for v in values if v is not None]
    return {"mean": float(np.mean(values)) if values else None,
            "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None, "n": len(values)}


def compare(runs, value):
    """mean and sd over seeds of value(test scores) for each pool, and of the paired (same seed) difference."""
    per_pool = {pool: [value(r["test"]) for r in runs[pool]] for pool in POOLS}
    differences = [b - a for a, b in zip(*per_pool.values()) if a is not None and b is not None]
    return {**{pool: mean_sd(v) for pool, v in per_pool.items()}, "difference": mean_sd(differences)}


SUMMARY = {"nuclei_dice": lambda s: s["dice"]["Nuclei"], "mean_dice_types": lambda s: s["mean_dice_types"],
           "nuclei_pq": lambda s: s["pq"]["Nuclei"], "mpq": lambda s: s["mpq"]}
SUMMARY_NAMES = {"nuclei_dice": "nucleus Dice", "mean_dice_types": "mean Dice (types)", "nuclei_pq": "PQ", "mpq": "mPQ"}


def augmentation_summary(runs):
    return {"runs": runs, "summary": {name: compare(runs, value) for name, value in SUMMARY.items()},
            "per_class_dice": {c: compare(runs, lambda s, c=c: s["dice"][c]) for c in CONIC.class_names[1:]}}


def machine(study):
    cuda = study.device.type == "cuda"
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "device": str(study.device),
            "gpu": torch.cuda.get_device_name(study.device) if cuda else None, "precision": study.precision}


def pm(stat, signed=False):
    if stat["mean"] is None:
        return "n/a"
    text = f"{stat['mean']:+.3f}" if signed else f"{stat['mean']:.3f}"
    return text + (f"±{stat['sd']:.3f}" if stat["sd"] is not None else "")


def plot_dice(path, result):
    """Nucleus Dice on the real test tiles against the labelled fraction, with and without synthetic tiles
    (error bars: sd over seeds), and the reference segmenter's as the ceiling."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = [float(k) for k in result["augmentation"]]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for pool, style in zip(POOLS, ("o-", "s--")):
        stats = [a["summary"]["nuclei_dice"][pool] for a in result["augmentation"].values()]
        ax.errorbar(fractions, [np.nan if s["mean"] is None else s["mean"] for s in stats],
                    yerr=[s["sd"] or 0 for s in stats], fmt=style, capsize=3, label=pool)
    ceiling = result["reference"]["test"]["dice"]["Nuclei"]
    if ceiling is not None:
        ax.axhline(ceiling, color="grey", linestyle=":", label="all real training tiles")
    ax.set_xscale("log")
    ax.set_xticks(fractions, [f"{k:g}%" for k in fractions])
    ax.minorticks_off()
    ax.set_xlabel("labelled fraction of the training split")
    ax.set_ylabel("nucleus Dice on real test tiles")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_save_figure(fig, path)


def realism_rows(result):
    """(score, real vs synthetic, real vs real) rows of the realism table, as text."""
    sides = [result["realism"][side] for side in ("synthetic", "real_vs_real")]
    return [["C2ST accuracy (0.5: indistinguishable)", *(fmt(s["c2st"] and s["c2st"]["accuracy"]) for s in sides)],
            ["domain Fréchet distance", *(fmt(s["domain_frechet_distance"], 4) for s in sides)],
            ["domain kernel distance", *(fmt(s["domain_kernel_distance"]["mean"], 4) for s in sides)],
            [f"diversity ({result['realism']['diversity']['samples_per_mask']} paintings per mask, 0: identical)",
             fmt(result["realism"]["diversity"]["mean_pairwise_feature_distance"], 4), fmt(None)]]


def augmentation_section(result, folder):
    aug, ref, steps = result["augmentation"], result["reference"], result["budget"]["segmenter_steps"]
    columns = [(m, p) for m in ("nuclei_dice", "nuclei_pq", "mpq") for p in (*POOLS, "difference")]
    rows = [[f"{k}%", a["runs"]["real"][0]["tiles"], a["runs"]["real+synthetic"][0]["tiles"]]
            + [pm(a["summary"][m][p], p == "difference") for m, p in columns] for k, a in aug.items()]
    per_class = [[f"{k}%", c, *(pm(s[p], p == "difference") for p in (*POOLS, "difference"))]
                 for k, a in aug.items() for c, s in a["per_class_dice"].items()]
    return (f"<h2>1. Does adding synthetic tiles help a nucleus segmenter?</h2><p>For each labelled fraction and "
            f"seed, one segmenter is trained for {steps['augment']} steps on the labelled real tiles, and one on "
            f"those plus synthetic tiles (sources {html.escape(', '.join(result['options']['synthetic']))}); both "
            f"are scored on the {result['split']['test']['tiles']} real test tiles. Mean ± sd over the seeds; the "
            f"difference (real+synthetic - real) is paired by seed. Ceiling, from all {ref['tiles']} real training "
            f"tiles ({steps['reference']} steps): nucleus Dice {fmt(ref['test']['dice']['Nuclei'])}, PQ "
            f"{fmt(ref['test']['pq']['Nuclei'])}.</p>"
            + table(["labelled", "tiles", "tiles with synthetic"] + [f"{SUMMARY_NAMES[m]} {p}" for m, p in columns], rows)
            + f"<img alt='nucleus Dice vs labelled fraction' src='{data_uri(path=folder / 'dice_vs_fraction.png')}'>"
            + "<h3>Dice per class</h3>" + table(["labelled", "class", *POOLS, "difference"], per_class))


def realism_section(result):
    r = result["realism"]
    return (f"<h2>2. Do synthetic tiles look real?</h2><p>The GAN of the largest fraction ({r['gan']}%) paints the "
            f"held-out test masks. Each score compares the real tiles of one half of the test masks "
            f"({r['halves'][0]} tiles) with the other half ({r['halves'][1]}), painted, or real for the floor. The "
            f"domain distances are taken in the reference segmenter's pooled encoder features; they are not "
            f"FID/KID.</p>" + table(["score", "real vs synthetic", "real vs real (floor)"], realism_rows(result)))


def fidelity_section(result, folder):
    synthetic, real = result["realism"]["mask_fidelity"]["synthetic"], result["reference"]["test"]
    rows = [[f"Dice {n}", fmt(synthetic["dice"][n]), fmt(real["dice"][n]), fmt(ratio(synthetic["dice"][n], real["dice"][n]))]
            for n in ("Nuclei", *CONIC.class_names[1:])]
    rows.append(["PQ Nuclei", fmt(synthetic["pq"]["Nuclei"]), fmt(real["pq"]["Nuclei"]),
                 fmt(ratio(synthetic["pq"]["Nuclei"], real["pq"]["Nuclei"]))])
    return ("<h2>3. Do synthetic tiles follow their masks?</h2><p>The reference segmenter on the synthetic test "
            "tiles, against the masks they were painted from, and on the real ones (the ceiling).</p>"
            + table(["score", "synthetic", "real (ceiling)", "ratio"], rows)
            + "<h3>mask | real | synthetic (held-out test masks)</h3>"
            + f"<img alt='samples' src='{data_uri(path=folder / 'realism' / 'grid.png')}'>")


def training_section(result):
    gans = [[f"{k}%", g["tiles"], g["epochs"], g["steps"], f"{g['train_seconds']:.0f}",
             f"{g['parameters']['generator'] / 1e6:.2f}M / {g['parameters']['discriminator'] / 1e6:.2f}M"]
            for k, g in result["gan"].items()]
    realism = result["realism"]
    return ("<h2>Training and time</h2>"
            + table(["GAN (labelled)", "tiles", "epochs", "steps", "seconds", "parameters (G / D)"], gans)
            + f"<p>The GAN of {realism['gan']}% painted {realism['tiles_per_second']:.1f} test tiles/s "
              f"(batches of {BATCH}, loading included).</p>"
            + table(["stage", "seconds"], [[name, f"{s:.1f}"] for name, s in result["seconds"].items()]))


def write_report(path, result, folder):
    m = result["machine"]
    head = (f"<h1>Synthetic H&amp;E study</h1><p><code>{html.escape(result['command'])}</code></p><p>"
            + html.escape(f"{m['platform']}, {m['cpus_usable']} CPU(s), torch {m['torch']}, {m['device']} "
                          f"({m['precision']}); {result['budget']['gan_minutes']:g} min per GAN") + ".</p>")
    body = head + augmentation_section(result, folder) + realism_section(result) + fidelity_section(result, folder) \
        + training_section(result)
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}")
    atomic_save_text(path, f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>study</title><style>{style}"
                           f"</style></head><body>{body}</body></html>")


def print_table(result):
    """The study in a few lines on stdout."""
    print(f"\n{'labelled':>8} {'tiles':>6}  {'nucleus Dice real':>17} {'real+synthetic':>15} {'difference':>15}"
          f"  {'PQ real':>13} {'real+synthetic':>15}")
    for k, a in result["augmentation"].items():
        d, q = a["summary"]["nuclei_dice"], a["summary"]["nuclei_pq"]
        print(f"{k + '%':>8} {a['runs']['real'][0]['tiles']:>6}  {pm(d['real']):>17} {pm(d['real+synthetic']):>15} "
              f"{pm(d['difference'], True):>15}  {pm(q['real']):>13} {pm(q['real+synthetic']):>15}")
    ref, realism = result["reference"], result["realism"]
    print(f"ceiling (all {ref['tiles']} real training tiles): nucleus Dice {fmt(ref['test']['dice']['Nuclei'])}, "
          f"PQ {fmt(ref['test']['pq']['Nuclei'])}")
    print(f"realism (GAN {realism['gan']}%, {' vs '.join(map(str, realism['halves']))} test tiles; real vs real in "
          "brackets): " + ", ".join(f"{name} {syn} ({floor})" for name, syn, floor in realism_rows(result)))
    fidelity = realism["mask_fidelity"]
    print(f"mask fidelity: nucleus Dice {fmt(fidelity['synthetic']['dice']['Nuclei'])} on synthetic test tiles, "
          f"{fmt(ref['test']['dice']['Nuclei'])} on real (ratio {fmt(fidelity['ratio']['nuclei_dice'])})")
    print(f"diversity: {fmt(realism['diversity']['mean_pairwise_feature_distance'])} (mean feature distance between "
          f"{realism['diversity']['samples_per_mask']} paintings of a mask)")
    gan = result["gan"][realism["gan"]]
    print(f"GAN {realism['gan']}%: {gan['steps']} steps, {gan['parameters']['generator'] / 1e6:.2f}M + "
          f"{gan['parameters']['discriminator'] / 1e6:.2f}M parameters (G + D), painting "
          f"{realism['tiles_per_second']:.1f} tiles/s")


# --------------------------------------------------------------------------- main

def augment_name(k, pool, seed):
    return f"k{k:g}/augment/{pool.replace('+', '_')}_s{seed}"


def run_stages(study):
    """Stages 1-6 in order, each skipped when its marker says it finished: {stage name: its marker}."""
    args, done = study.args, {}

    def stage(name, work):
        done[name] = run_stage(study.out, name, work)
        return done[name]

    stage("split", lambda: split_stage(study))
    reference = stage("reference", lambda: reference_stage(study))
    for k in args.fractions:
        stage(f"k{k:g}/gan", lambda: gan_stage(study, k))
        for source in "ab":
            stage(f"k{k:g}/synthetic_{source}", lambda: synthetic_stage(study, k, source))
    for k, seed, pool in itertools.product(args.fractions, study.seeds, POOLS):
        stage(augment_name(k, pool, seed), lambda: augment_stage(study, k, pool, seed, reference["steps"]["augment"]))
    stage("realism", lambda: realism_stage(study, reference))
    return done


def collect(study, done, argv, options):
    """metrics.json: the stages' markers arranged by question, with the command, machine, budget and times."""
    args, reference = study.args, done["reference"]
    return {
        "command": shlex.join(["python", "study.py", *argv]), "options": options | {"seeds_used": study.seeds},
        "machine": machine(study),
        "budget": {"gan_minutes": args.budget_minutes, "segmenter_shares": SEGMENTER_SHARES,
                   "segmenter_step_seconds": reference["step_seconds"], "segmenter_steps": reference["steps"]},
        "seconds": {name: marker["seconds"] for name, marker in done.items()},
        "split": done["split"], "reference": reference,
        "gan": {f"{k:g}": done[f"k{k:g}/gan"] for k in args.fractions},
        "synthetic": {f"{k:g}": {s: done[f"k{k:g}/synthetic_{s}"] for s in "ab"} for k in args.fractions},
        "augmentation": {f"{k:g}": augmentation_summary(
            {pool: [done[augment_name(k, pool, seed)] for seed in study.seeds] for pool in POOLS})
            for k in args.fractions},
        "realism": done["realism"],
    }


@run_main
def main(argv=None):
    started = time.perf_counter()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parse_args(argv)
    names = open_data(args.data_dir)
    options = study_options(args)
    check_reference_source(args, options)
    study = Study(args, claim_out_dir(args, options), names)
    result = collect(study, run_stages(study), argv, options)
    plot_dice(study.out / "dice_vs_fraction.png", result)
    result["seconds"]["this_run_total"] = round(time.perf_counter() - started, 2)
    atomic_save_text(study.out / "metrics.json", json.dumps(result, indent=1, allow_nan=False))
    write_report(study.out / "report.html", result, study.out)
    print_table(result)
    print(f"wrote {study.out / 'metrics.json'} and {study.out / 'report.html'}")


if __name__ == "__main__":
    main()
