"""The study's data, its six stages, and the runner that skips finished ones.

Each stage returns a dict that run_stage saves as S/<stage>/done.json; run_stages runs them in order:
split, reference segmenter, a GAN per labelled fraction, its synthetic tiles (a and b), the augmentation
experiment, realism and mask fidelity."""
import bisect
import itertools
import json
import math
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

import config
import metrics
from config import (FEATURE_C2ST_FOLDS, PRDC_K, STUDY_C2ST_FOLDS, STUDY_DIVERSITY_MASKS, STUDY_DIVERSITY_SAMPLES,
                    STUDY_DIVERSITY_SEED_STEP, STUDY_GAN_SAMPLES, STUDY_GRID_ROWS, STUDY_MIN_LABELLED_TILES,
                    STUDY_NUCLEI_COPIED, STUDY_PAINT_BATCH, STUDY_RARE_SHARE, STUDY_SAVE_EVERY_STEPS)
from dataset.common import split_item
from degradations import calibration_ladder
from dataset.conic import (CoNIC, gan_datasets, most_nuclei_first, open_conic, patch_source, read_split_file,
                           split_by_source, write_conic_folder, write_split_file)
from dataset.layouts import new_layouts, relabel_instances
from dataset.masks import CONIC, get_label_set, labels_to_onehot, labels_to_rgb, mark_edges
from gan import (generate, load_generator, parameter_counts, read_checkpoint, read_resume_checkpoint,
                 uses_instance_edges)
from generator_model import depth_for_tile
from quality.options import GAN_OPTIONS
from report import grid, to_uint8_image
from loop import Loop
from runtime import (DistInfo, SeededSampler, autocast_context, loader_workers, make_loader, make_optimizer,
                     resolve_channels_last, resolve_device, resolve_precision)
from segmenter import (CHECKPOINT_KIND, CHECKPOINT_VERSION, build_segmenter, load_segmenter, segmenter_features,
                       train_step)
from train_utils import run_training
from utils import (UserError, atomic_save_png, atomic_save_text, atomic_save_torch, atomic_write, safe_torch_load,
                   seed_everything)

# Each fraction's segmenters: on the labelled real tiles, on those plus synthetic ones, and on the synthetic
# ones alone (train on synthetic, test on real: TSTR).
POOLS = ("real", "real+synthetic", "synthetic")


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


def write_tiles(folder, images, classes, instances, names):
    """Tiles as a CoNIC folder, labels.npy as uint16 [instance id, class id]."""
    write_conic_folder(folder, images, np.stack([instances, classes], -1).astype(np.uint16), names)


class Study:
    """The options, S, the device, the stop request (loop.StopRequest) its loops heed, and the split as the
    split stage wrote it."""

    def __init__(self, args, out, names, stop):
        self.args, self.out, self.names, self.stop = args, out, names, stop
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


def curve_name(steps, seed):
    return f"curve/steps{steps}_s{seed}"


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
    for steps, seed in itertools.product(args.learning_curve or (), study.seeds):
        stage(curve_name(steps, seed), lambda: curve_stage(study, steps, seed))
    for k in args.fractions:
        stage(f"k{k:g}/gan", lambda: gan_stage(study, k))
        for source in "ab":
            stage(f"k{k:g}/synthetic_{source}", lambda: synthetic_stage(study, k, source))
    for k, seed, pool in itertools.product(args.fractions, study.seeds, POOLS):
        stage(augment_name(k, pool, seed), lambda: augment_stage(study, k, pool, seed, reference["steps"]["augment"]))
    stage("realism", lambda: realism_stage(study, reference))
    return done


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
        target = min(len(train), max(STUDY_MIN_LABELLED_TILES, round(k / 100 * len(train))))
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


def fit_segmenter(study, dataset, steps, seed, run_dir=None):
    """A fresh segmenter trained for exactly `steps` Adam steps on `dataset` (CoNIC items; seeded flips and
    rotations through SeededSampler), its lr on a cosine from config.SEGMENTER_LR to 0 over those steps, so the
    schedule is the same whatever the pool. Returned in eval mode. With `run_dir` it runs on loop.Loop: a stop
    request or a kill resumes there from the last save (every STUDY_SAVE_EVERY_STEPS steps), and the
    checkpoint is removed once the run is done."""
    seed_everything(seed)
    layout = torch.channels_last if study.channels_last else torch.contiguous_format
    model = build_segmenter(segmenter_config(study.args)).to(study.device, memory_format=layout)
    opt = make_optimizer(model.parameters(), config.SEGMENTER_LR, (0.9, 0.999), study.device)
    scaler = torch.amp.GradScaler(study.device.type, enabled=study.precision == "fp16")
    sampler = SeededSampler(dataset, seed=seed)
    loader = make_loader(dataset, study.args.segmenter_batch_size, study.workers, study.device, sampler=sampler)
    loop = Loop(run_dir, DistInfo(), study.device, ("loss",),
                lambda: {"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict()},
                study.stop, log_every=steps, save_every_steps=STUDY_SAVE_EVERY_STEPS if run_dir else 0,
                resume_hint="run the same study.py command again to continue", progress=False)
    last = loop.last_checkpoint
    resume = safe_torch_load(last) if last is not None and last.is_file() else None
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        scaler.load_state_dict(resume["scaler"])
    position = loop.restore(resume, last, print)

    def step(batch):
        for group in opt.param_groups:
            group["lr"] = config.SEGMENTER_LR * 0.5 * (1 + math.cos(math.pi * position.step / steps))
        return train_step(model, opt, scaler, *batch, study.device, study.channels_last, study.autocast)

    model.train()
    while position.step < steps:
        sums = loop.epoch(position, loader, sampler, step, "segmenter", until_step=steps)
        if position.step < steps:
            loop.end_epoch(position, sums)
    if last is not None:
        last.unlink(missing_ok=True)
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
    instances are the 4-connected pieces of each predicted class; PQ pooled over all tiles for all nuclei and
    per class, mPQ (the mean of the per-class PQs that are defined), and CoNIC's "pq" and "mpq+"."""
    cm = metrics.confusion_matrix(torch.from_numpy(pred), torch.from_numpy(tiles.classes), CONIC.num_classes)
    pred_instances = np.stack([relabel_instances(p, (p != CONIC.background).astype(np.int32)) for p in pred])
    pq = {"Nuclei": metrics.panoptic_quality(pred_instances, tiles.instances)["pq"]}
    for c in CONIC.nucleus_classes:
        pq[CONIC.class_names[c]] = metrics.panoptic_quality(np.where(pred == c, pred_instances, 0),
                                                            np.where(tiles.classes == c, tiles.instances, 0))["pq"]
    per_class = [v for name, v in pq.items() if name != "Nuclei" and v is not None]
    # CoNIC's own statistics, by their challenge names: "pq" averages each tile's binary PQ, "mpq+" pools each
    # class over all tiles and counts a class absent on both sides as 0.
    conic = {"pq": metrics.pq_per_image(pred_instances, tiles.instances),
             "mpq+": metrics.mpq_plus(pred_instances, pred, tiles.instances, tiles.classes)["mpq+"]}
    return {**metrics.mask_scores(cm, CONIC), "pq": pq, "mpq": float(np.mean(per_class)) if per_class else None,
            "conic": conic}


def reference_stage(study):
    """The segmenter trained on every real training tile: the ceiling, the feature space of the domain
    distances, and the judge of mask fidelity. It and every augmentation run take --segmenter-steps steps."""
    args = study.args
    if args.reference_from:
        return copy_reference(study, Path(args.reference_from))
    train = CoNIC(args.data_dir, study.split()[0], augment=True)
    steps = {"reference": args.segmenter_steps, "augment": args.segmenter_steps}
    started = time.perf_counter()
    model = fit_segmenter(study, train, steps["reference"], args.seed, study.out / "reference" / "run")
    step_seconds = (time.perf_counter() - started) / steps["reference"]
    # A train_segmenter.py-style checkpoint: segmenter.load_segmenter (and make_masks.py) read it.
    atomic_save_torch({"kind": CHECKPOINT_KIND, "version": CHECKPOINT_VERSION, "model": model.state_dict(),
                       "model_config": segmenter_config(args), "mpp": config.CONIC_MPP},
                      study.out / "reference" / "segmenter.pt")
    return {"tiles": len(train), "step_seconds": step_seconds, "steps": steps,
            "test": segmentation_scores(predict(study, model, study.test.images), study.test)}


def curve_stage(study, steps, seed):
    """One point of the segmenter's learning curve (--learning-curve): the real-only segmenter on all real
    training tiles after `steps` steps, scored on the real test tiles; the curve chooses --segmenter-steps."""
    train = CoNIC(study.args.data_dir, study.split()[0], augment=True)
    model = fit_segmenter(study, train, steps, seed, study.out / curve_name(steps, seed) / "run")
    return {"steps": steps, "seed": seed, "test": segmentation_scores(predict(study, model, study.test.images),
                                                                      study.test)}


def copy_reference(study, source):
    """Study S0's reference stage (checked by options.check_reference_source): its segmenter, copied into
    this study, and its marker (scores, step counts) with the folder it came from."""
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


def gan_seed(args):
    return args.seed if args.gan_seed is None else args.gan_seed


def gan_run_config(study, k, epochs):
    """The settled config of the k% GAN's run to `epochs`: train_conic.py's defaults with the study's data,
    split, GAN options and device, resuming from the run's last.pt when there is one."""
    args, last = study.args, study.gan_checkpoint(k)
    out_dir = str(last.parents[1])
    defaults = config.training_parser("CoNIC", config.add_conic_training_data_args, out_dir).parse_args([])
    return config.RunConfig(**{
        **vars(defaults), **{name: getattr(args, name) for name in GAN_OPTIONS},
        "data_dir": str(args.data_dir), "split_file": str(study.kdir(k) / "split.csv"), "out_dir": out_dir,
        "label_set": CONIC.name, "epochs": epochs, "seed": gan_seed(args), "wandb": "disabled", "save_every": 0,
        "num_samples": STUDY_GAN_SAMPLES, "device": args.device, "precision": args.precision,
        "workers": args.workers, "channels_last": args.channels_last, "compile": args.compile,
        "resume": str(last) if last.is_file() else None})


def gan_stage(study, k):
    """The training scripts' GAN on the k% labelled tiles alone, as train_conic.py trains it, in this process.
    The first epoch (or, after an interrupted run, the next one) is timed, start-up and saving included, and
    fixes the epochs that fill the budget (plan.json); a re-run resumes from the run's last.pt."""
    args, last = study.args, study.gan_checkpoint(k)
    plan_path = last.parents[1] / "plan.json"

    def train(epochs):
        started = time.perf_counter()
        cfg = gan_run_config(study, k, epochs)
        run_training(cfg, read_resume_checkpoint(cfg.resume) if cfg.resume else None, gan_datasets, folder_owned=True)
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
def paint(study, checkpoint, classes, instances, first_seed=0):
    """uint8 (N, H, W, 3) tiles painted from (N, H, W) class maps (and their instance maps, for a generator
    that reads the instance edges) by a checkpoint's generator in eval mode (running BatchNorm statistics,
    no dropout: a tile does not depend on its batch); tile i's noise, for generators that take noise, is
    seeded from first_seed + i."""
    generator, ckpt = load_generator(checkpoint, study.device)
    num_classes = get_label_set(ckpt["model_config"]["label_set"]).num_classes
    edges = uses_instance_edges(ckpt["model_config"])
    if edges:
        classes = np.stack([mark_edges(c, i) for c, i in zip(classes, instances)])
    tiles = []
    for start in range(0, len(classes), STUDY_PAINT_BATCH):
        mask = labels_to_onehot(torch.from_numpy(classes[start:start + STUDY_PAINT_BATCH]).to(study.device),
                                num_classes, edges=edges)
        seeds = range(first_seed + start, first_seed + start + len(mask))
        tiles += [to_uint8_image(fake) for fake in generate(generator, mask, study.autocast, "eval", seeds)]
    return np.stack(tiles)


def rare_class_weights(tiles, weight):
    """({class: weight} for the classes with under STUDY_RARE_SHARE of the nuclei in `tiles`, for
    copy_nuclei), and the nucleus counts behind it."""
    counts = np.zeros(CONIC.num_classes, dtype=np.int64)
    for classes, instances in zip(tiles.classes, tiles.instances):
        ids, first = np.unique(instances, return_index=True)
        counts += np.bincount(classes.ravel()[first[ids > 0]], minlength=CONIC.num_classes)
    rare = [c for c in CONIC.nucleus_classes if 0 < counts[c] < STUDY_RARE_SHARE * counts.sum()]
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
        layouts = new_layouts(classes, instances, count, seed=args.seed, copies=STUDY_NUCLEI_COPIED,
                              class_weights=weights)
        classes, instances = map(np.stack, zip(*layouts))
        names = [f"layout-{j:05d}" for j in range(count)]
    write_tiles(study.kdir(k) / f"synthetic_{source}", paint(study, study.gan_checkpoint(k), classes, instances),
                classes, instances, names)
    return {"tiles": len(names), **info}


# --------------------------------------------------------------------------- 5. augmentation experiment

class Pool(torch.utils.data.ConcatDataset):
    """ConcatDataset that hands the sampler's (index, seed) items on, so every tile keeps its seeded augmentation."""

    def __getitem__(self, item):
        index, seed = split_item(item)
        part = bisect.bisect_right(self.cumulative_sizes, index)
        return self.datasets[part][(index - (self.cumulative_sizes[part - 1] if part else 0), seed)]


def augment_stage(study, k, pool, seed, steps):
    """A segmenter trained for the same `steps` on a POOLS pool of the k% labelled tiles: the real ones, those
    plus the synthetic ones (--synthetic), or the synthetic ones alone; scored on the real test tiles."""
    args = study.args
    parts = [] if pool == "synthetic" else [CoNIC(args.data_dir, study.split(k)[0], augment=True)]
    if pool != "real":
        parts += [CoNIC(study.kdir(k) / f"synthetic_{source}", augment=True) for source in args.synthetic]
    model = fit_segmenter(study, Pool(parts), steps, seed, study.out / augment_name(k, pool, seed) / "run")
    return {"pool": pool, "seed": seed, "tiles": sum(map(len, parts)), "steps": steps,
            "test": segmentation_scores(predict(study, model, study.test.images), study.test)}


# --------------------------------------------------------------------------- 6. realism and mask fidelity

def c2st(study, real, other):
    """metrics.c2st with as many folds (up to STUDY_C2ST_FOLDS) as the sets allow; None below two images a side."""
    folds = min(STUDY_C2ST_FOLDS, len(real), len(other))
    if folds < 2:
        return None
    return metrics.c2st(real, other, folds=folds, epochs=study.args.c2st_epochs, seed=study.args.seed,
                        device=study.device)


def ratio(a, b):
    return a / b if a is not None and b else None


def realism_scores(study, real, real_features, other, other_features):
    """The two C2STs (in the reference segmenter's features, which has range; on pixels, which sees any lost
    detail), the domain Fréchet and kernel distances and PRDC (precision, density: looks real; recall,
    coverage: covers real variety) of `other` tiles against `real` ones, in the reference segmenter's features."""
    kernel_mean, kernel_std = metrics.kernel_distance(real_features, other_features, seed=study.args.seed)
    k = min(PRDC_K, len(real_features) - 1, len(other_features) - 1)
    folds = min(FEATURE_C2ST_FOLDS, len(real_features), len(other_features))
    return {"feature_c2st": metrics.feature_c2st(real_features, other_features, folds=folds, seed=study.args.seed)
            if folds >= 2 else None,
            "c2st": c2st(study, real, other),
            "domain_frechet_distance": metrics.frechet_distance(real_features, other_features),
            "domain_kernel_distance": {"mean": kernel_mean, "std": kernel_std},
            "prdc": metrics.prdc(real_features, other_features, k=k) if k >= 1 else None}


def sample_diversity(study, checkpoint, classes, instances, model):
    """Mean pairwise distance, in the reference segmenter's pooled features, between STUDY_DIVERSITY_SAMPLES
    paintings of each mask with different seeds: 0 for a generator that paints a mask one way only
    (pix2pix in eval mode), above 0 when noise makes the paintings differ."""
    features = torch.stack([segmenter_features(model, paint(study, checkpoint, classes, instances,
                                                            j * STUDY_DIVERSITY_SEED_STEP), study.device)
                            for j in range(STUDY_DIVERSITY_SAMPLES)], 1)  # (masks, K, D)
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
    fake = paint(study, study.gan_checkpoint(k), test.classes, test.instances)
    paint_seconds = time.perf_counter() - started
    write_tiles(folder / "synthetic_test", fake, test.classes, test.instances, test.names)
    model, _ = load_segmenter(study.out / "reference" / "segmenter.pt", study.device)
    half_a, half_b = metrics.real_vs_real_split(len(fake), args.seed)
    real_features = segmenter_features(model, test.images, study.device)  # Segmenter.pooled_features, float64
    sides = {"synthetic": (fake, segmenter_features(model, fake, study.device)),
             "real_vs_real": (test.images, real_features)}
    # The calibration ladder: real test tiles degraded in known ways, scored like the synthetic ones, show where
    # a generator sits between "real" (the floor) and "clearly degraded".
    for rung, tiles in calibration_ladder(test.images).items():
        sides[f"ladder_{rung}"] = (tiles, segmenter_features(model, tiles, study.device))
    realism = {name: realism_scores(study, test.images[half_a], real_features[half_a], images[half_b],
                                    features[half_b]) for name, (images, features) in sides.items()}
    synthetic, real = segmentation_scores(predict(study, model, fake), test), reference["test"]
    most_nuclei = most_nuclei_first(test.classes)
    rows = [[labels_to_rgb(test.classes[i], CONIC), test.images[i], fake[i]] for i in most_nuclei[:STUDY_GRID_ROWS]]
    atomic_save_png(grid(rows), folder / "grid.png")
    shown = most_nuclei[:STUDY_DIVERSITY_MASKS]
    diversity = sample_diversity(study, study.gan_checkpoint(k), test.classes[shown], test.instances[shown], model)
    return {"gan": f"{k:g}", "tiles": len(fake), "tiles_per_second": len(fake) / paint_seconds,
            "halves": [len(half_a), len(half_b)], **realism,
            "diversity": diversity,
            "mask_fidelity": {"synthetic": synthetic, "ratio": {
                "nuclei_dice": ratio(synthetic["dice"]["Nuclei"], real["dice"]["Nuclei"]),
                "mean_dice_types": ratio(synthetic["mean_dice_types"], real["mean_dice_types"]),
                "nuclei_pq": ratio(synthetic["pq"]["Nuclei"], real["pq"]["Nuclei"])}}}
