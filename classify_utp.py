r"""Does synthetic data help? Train a UniToPatho classifier on real images, or on
real + synthetic ones, and score it on the real test split.

    python classify_utp.py --data-dir data/unitopatho/800 --target top_label --out-dir runs/cls_real
    python classify_utp.py --data-dir data/unitopatho/800 --synthetic-dir synthetic/utp_train \
        --target top_label --out-dir runs/cls_real_synth
    torchrun --standalone --nproc_per_node=2 classify_utp.py ...   # same run, two processes

Protocol (after the EIDOSLAB UC2 reference): a torchvision ResNet-18 (random
initialisation; --weights for an ImageNet file such as resnet18-f37072fd.pth),
class-balanced training, balanced accuracy on the real test split. Images are
resized to --image-size squared and flipped/rotated by multiples of 90 degrees.

Class balance: every draw picks a class uniformly, then an image of that class
uniformly from the training pool (with replacement). An epoch is as many draws
as there are real training images, whatever the pool, so a real + synthetic run
takes exactly the optimiser steps of the real-only run with the same seed,
schedule and initial weights: only the pool it draws from differs.

--synthetic-dir holds synthetic training images in the split's own layout,
S/<top_label_name>/<image_id> with S/train.csv (test.py's drop-in format). They
must be generated from training masks: images sharing a file name with the real
test split are refused, since they would leak the test set into training.

--target grade skips HP and NORM rows (they have no dysplasia grade).
Writes OUT/metrics.json (accuracy, balanced_accuracy, confusion_matrix, ...),
OUT/confusion_matrix.png and OUT/classifier.pt; under torchrun only rank 0 writes.
OUT/checkpoints/last.pt is refreshed every epoch (and every --save-every-steps):
SIGTERM or Ctrl-C saves it and exits with status 143, and --resume continues the
run exactly; a folder that holds a run is refused without --resume or --overwrite.
"""
import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torchvision
from PIL import Image
from torch import nn
from tqdm import tqdm

import config
import metrics
from dataset.common import split_item
from dataset.unitopatho import CLASSES, UniToPatho, read_split
from loop import Loop, StopRequest
from runtime import (autocast_context, barrier, distributed, init_wandb, load_model_state, loader_workers,
                     main_process_log, make_loader, make_optimizer, maybe_compile, claim_run_dir, resolve_precision,
                     unwrap, wrap_ddp)
from utils import (ArrayCache, UserError, atomic_save_figure, atomic_save_text, atomic_save_torch,
                   load_checkpoint_of_kind, run_main, safe_torch_load)

CHECKPOINT_KIND = "utp-classifier"
CHECKPOINT_VERSION = 1
RESUME_KEYS = ("model", "classes", "optimizer", "schedule", "scaler", "config", "epoch", "history", "rng")


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=config.HelpFormatter)
    config.add_utp_data_args(p, "real UniToPatho '800' folder (train.csv, test.csv, class folders)", masks=False)
    p.add_argument("--synthetic-dir", default=None,
                   help="synthetic training images: S/train.csv + S/<top_label_name>/<image_id>")
    p.add_argument("--target", default="top_label", choices=list(CLASSES), help="label to predict")
    p.add_argument("--out-dir", default="runs/classify",
                   help="where metrics.json, confusion_matrix.png, classifier.pt and checkpoints/last.pt go")
    p.add_argument("--resume", default=None, metavar="CKPT", help="continue from OUT/checkpoints/last.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out-dir that already holds a run, deleting its checkpoints")
    p.add_argument("--save-every-steps", type=int, default=0,
                   help="also refresh last.pt every N steps inside an epoch (0: at epoch ends only)")
    p.add_argument("--epochs", type=int, default=config.CLASSIFIER_EPOCHS,
                   help="epochs of (number of real training images) draws")
    p.add_argument("--batch-size", type=int, default=config.CLASSIFIER_BATCH_SIZE, help="batch size per process")
    p.add_argument("--lr", type=float, default=config.CLASSIFIER_LR,
                   help="Adam learning rate, cosine-annealed to 0 over the run")
    p.add_argument("--image-size", type=int, default=config.CLASSIFIER_IMAGE_SIZE, help="side images are resized to")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="keep each image resized to --image-size here as .npy (about 150 KB at 224 px), so epochs "
                        "after the first skip decoding the 1812 px PNGs")
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="torchvision ResNet-18 ImageNet state dict to start from (default: random initialisation)")
    p.add_argument("--dist-timeout", type=float, default=config.DIST_TIMEOUT_MINUTES,
                   help="minutes a process waits for the others under torchrun before failing")
    config.add_wandb_args(p.add_argument_group("logging"), project=config.WANDB_PROJECT + "-classifier")
    config.add_device_args(p)
    return p


# --------------------------------------------------------------------------- data

class ClassifierImages(torch.utils.data.Dataset):
    """Items of one or more UniToPatho splits as (uint8 (3, S, S) image, target).

    Indexed with (index, seed) pairs, the seed picks the item's flips and rotation,
    so augmentation does not depend on worker or process counts."""

    def __init__(self, splits, image_size, augment, cache_dir=None):
        self.items = [(split, i) for split in splits for i in range(len(split))]
        self.targets = np.concatenate([split.targets for split in splits])
        self.image_size, self.augment = image_size, augment
        self.cache = ArrayCache(cache_dir) if cache_dir else None

    def resized(self, split, i):
        """(S, S, 3) uint8: the image resized once, then read from the cache when there is one."""
        def resize():
            # reducing_gap: a cheap box reduction first, then an antialiased resize of the rest.
            size = (self.image_size, self.image_size)
            return (np.array(Image.fromarray(split.load_image(i)).resize(size, Image.Resampling.BILINEAR,
                                                                          reducing_gap=2.0)),)
        if self.cache is None:
            return resize()[0]
        tag = f"resized to {self.image_size} px, downsample {split.downsample}"
        return self.cache.get((split.paths[i],), ("resized",), resize, tag)[0]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, item):
        index, seed = split_item(item)
        image = self.resized(*self.items[index])
        if self.augment and seed is not None:
            rng = np.random.default_rng(seed)
            image = np.rot90(image, int(rng.integers(4)))
            if rng.integers(2):
                image = image[:, ::-1]
        # A copy: writable, contiguous, and detached from a memory-mapped cache file.
        return torch.from_numpy(np.array(image)).permute(2, 0, 1), int(self.targets[index])


class BalancedSampler(torch.utils.data.Sampler):
    """Class-balanced draws with replacement, as (index, augmentation seed) pairs.

    An epoch's `num_samples` draws come from (seed, epoch) alone, so every process
    agrees on them; process r takes draws r, r + world, ... (padded to equal shares)."""

    def __init__(self, targets, num_samples, num_replicas=1, rank=0, seed=0):
        counts = np.bincount(targets)
        self.probs = 1.0 / counts[targets]
        self.probs /= self.probs.sum()
        self.num_replicas, self.rank, self.seed, self.epoch, self.skip = num_replicas, rank, seed, 0, 0
        self.per_rank = math.ceil(num_samples / num_replicas)

    def set_epoch(self, epoch, skip=0):
        """`skip`: this process's draws already trained on (a run resumed mid-epoch)."""
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        total = self.per_rank * self.num_replicas
        draws = rng.choice(len(self.probs), size=total, p=self.probs)
        seeds = rng.integers(2 ** 32, size=total)
        mine = range(self.rank, total, self.num_replicas)[self.skip:]
        return iter([(int(draws[i]), int(seeds[i])) for i in mine])

    def __len__(self):
        return max(0, self.per_rank - self.skip)


def load_splits(args):
    """(real train split, synthetic train split or None, real test split)."""
    if not Path(args.data_dir).is_dir():
        raise UserError(f"--data-dir not found: {args.data_dir} (expected UniToPatho's '800' folder)")
    grade_only = args.target == "grade"
    real = UniToPatho(args.data_dir, "train", args.target, grade_only=grade_only)
    test = UniToPatho(args.data_dir, "test", args.target, grade_only=grade_only)
    for split in (real, test):
        if not len(split):
            graded = " with a dysplasia grade (--target grade skips HP and NORM)" if grade_only else ""
            raise UserError(f"{split.data_dir / f'{split.split}.csv'}: no rows{graded}; expected at least one image "
                            f"to {'train on' if split is real else 'score'}")
    if not args.synthetic_dir:
        return real, None, test
    synthetic_dir = Path(args.synthetic_dir)
    if not synthetic_dir.is_dir():
        raise UserError(f"--synthetic-dir not found: {synthetic_dir}")
    if not (synthetic_dir / "train.csv").is_file():
        hint = (" It holds test.csv: images generated from the test split's masks cannot be used for training "
                "(they would leak the test set)." if (synthetic_dir / "test.csv").is_file() else "")
        raise UserError(f"{synthetic_dir / 'train.csv'} not found: --synthetic-dir must hold synthetic images "
                        f"generated from the training split's masks, with that split's train.csv.{hint}")
    test_names = set(read_split(args.data_dir, "test")["image_id"])
    leaked = sorted(set(read_split(synthetic_dir, "train")["image_id"]) & test_names)
    if leaked:
        raise UserError(f"{len(leaked)} synthetic image(s) share their file name with the real test split, e.g. "
                        f"{leaked[0]!r}: training on them would leak the test set")
    return real, UniToPatho(synthetic_dir, "train", args.target, grade_only=grade_only), test


# --------------------------------------------------------------------------- model

def build_classifier(num_classes, weights):
    """ResNet-18; ImageNet weights (a torchvision state dict) load before the head is
    replaced by one for `num_classes`."""
    if weights is None:
        return torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model = torchvision.models.resnet18(weights=None)
    state = safe_torch_load(weights, "ResNet-18 weights")
    if not isinstance(state, dict):
        raise UserError(f"--weights {weights}: expected a state dict, got {type(state).__name__}")
    load_model_state(model, state, weights, "ResNet-18")
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def to_input(images, device, channels_last):
    """uint8 (B, 3, H, W) -> ImageNet-normalised float on the device."""
    mean = torch.tensor(config.IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(config.IMAGENET_STD, device=device).view(1, 3, 1, 1)
    x = (images.to(device, non_blocking=True).float() / 255 - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def predict(model, dataset, args, device, autocast, workers, info):
    """Predictions for every item of `dataset`, each process scoring items r, r + world, ..."""
    mine = list(range(info.rank, len(dataset), info.world_size))
    loader = make_loader(dataset, args.batch_size, workers, device, sampler=mine)
    model.eval()
    preds = []
    for images, _ in tqdm(loader, desc="testing", disable=not info.is_main, dynamic_ncols=True):
        with autocast:
            preds.append(model(to_input(images, device, args.channels_last)).argmax(1).cpu())
    preds = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
    if not info.distributed:
        return preds
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, (mine, preds))
    full = torch.empty(len(dataset), dtype=torch.long)
    for indices, p in gathered:
        full[indices] = p
    return full


def save_confusion_plot(cm, classes, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    recall = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.1 * len(classes) + 2, 1.1 * len(classes) + 1.5))
    ax.imshow(recall, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(cm):
        ax.text(j, i, f"{count}\n{recall[i, j]:.2f}", ha="center", va="center", fontsize=8,
                color="white" if recall[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (row-normalised: recall)")
    ax.set_title(title)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=120)


# --------------------------------------------------------------------------- main

def train(args, resume, info, device, stop, run_id):
    out_dir = Path(args.out_dir)
    real, synthetic, test = load_splits(args)
    classes = CLASSES[args.target]
    pool = ClassifierImages([real] + ([synthetic] if synthetic else []), args.image_size, augment=True,
                            cache_dir=args.cache_dir)
    precision = resolve_precision(args.precision, device)
    autocast = autocast_context(device, precision)
    workers = loader_workers(args.workers, device)

    torch.manual_seed(args.seed)  # the same initial weights on every rank and in every run
    model = build_classifier(len(classes), args.weights)
    if resume is not None:
        load_model_state(model, resume["model"], args.resume, "classifier")
    model = model.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    model = maybe_compile(wrap_ddp(model, info, device), args.compile)

    sampler = BalancedSampler(pool.targets, len(real), info.world_size, info.rank, args.seed)
    loader = make_loader(pool, args.batch_size, workers, device, sampler=sampler)
    total_steps = args.epochs * len(loader)
    opt = make_optimizer(model.parameters(), args.lr, (0.9, 0.999), device)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps)))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    log = print if info.is_main else (lambda *a, **k: None)
    if info.is_main:
        print(f"training on {len(real)} real + {len(synthetic) if synthetic else 0} synthetic images, "
              f"{len(real)} class-balanced draws per epoch, {total_steps} steps, {info.world_size} process(es) on "
              f"{device.type}, precision {precision}")

    if resume is not None:
        for name, part in (("optimizer", opt), ("schedule", schedule), ("scaler", scaler)):
            part.load_state_dict(resume[name])

    def payload():
        return {"kind": CHECKPOINT_KIND, "version": CHECKPOINT_VERSION, "model": unwrap(model).state_dict(),
                "classes": list(classes), "optimizer": opt.state_dict(), "schedule": schedule.state_dict(),
                "scaler": scaler.state_dict(), "config": vars(args)}

    loop = Loop(out_dir, info, device, ("loss",), payload, stop, config.LOG_EVERY_STEPS, args.save_every_steps,
                run_id=run_id)
    position = loop.restore(resume, args.resume, log)
    run = init_wandb(args, position.wandb_run_id) if info.is_main else None
    if run is not None:
        position.wandb_run_id = run.id

    def step(batch):
        images, targets = batch
        with autocast:
            logits = model(to_input(images, device, args.channels_last))
        loss = nn.functional.cross_entropy(logits.float(), targets.to(device))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        schedule.step()
        return loss.detach()

    while position.epoch < args.epochs:
        model.train()
        sums = loop.epoch(position, loader, sampler, step, f"epoch {position.epoch + 1}/{args.epochs}")
        means = loop.end_epoch(position, sums)
        loop.save(position, loop.zeros())
        log(f"epoch {position.epoch}: loss {means['loss']:.4f}")
        if run is not None:
            run.log({"epoch": position.epoch, "train/loss": means["loss"]})
    history = position.history

    test_items = ClassifierImages([test], args.image_size, augment=False, cache_dir=args.cache_dir)
    preds = predict(model, test_items, args, device, autocast, workers, info)
    if not info.is_main:
        return
    cm = metrics.confusion_matrix(preds, torch.from_numpy(test_items.targets), len(classes))
    support = cm.sum(1).clamp(min=1)
    result = {
        "target": args.target, "classes": list(classes), "test_images": len(test_items),
        "accuracy": metrics.accuracy(cm), "balanced_accuracy": metrics.balanced_accuracy(cm),
        "confusion_matrix": cm.tolist(),
        "per_class_recall": {c: (cm[i, i] / support[i]).item() if cm[i].sum() else None for i, c in enumerate(classes)},
        "train": {"real_images": len(real), "synthetic_images": len(synthetic) if synthetic else 0,
                  "synthetic_dir": args.synthetic_dir, "draws_per_epoch": len(real), "epochs": args.epochs,
                  "optimizer_steps": total_steps, "batch_size": args.batch_size, "world_size": info.world_size,
                  "lr": args.lr, "image_size": args.image_size, "weights": args.weights, "seed": args.seed,
                  "precision": precision, "loss_history": history},
    }
    atomic_save_text(out_dir / "metrics.json", json.dumps(result, indent=2))
    which = "real + synthetic" if synthetic else "real only"
    save_confusion_plot(cm, classes, out_dir / "confusion_matrix.png",
                        f"{args.target}, {which}: balanced accuracy {result['balanced_accuracy']:.3f}")
    atomic_save_torch({"kind": CHECKPOINT_KIND, "version": CHECKPOINT_VERSION, "model": unwrap(model).state_dict(),
                       "classes": list(classes), "config": vars(args)}, out_dir / "classifier.pt")
    print(f"{which}: accuracy {result['accuracy']:.4f}, balanced accuracy {result['balanced_accuracy']:.4f} "
          f"on {len(test_items)} test images; wrote {out_dir / 'metrics.json'}")
    if run is not None:
        run.log({"test/accuracy": result["accuracy"], "test/balanced_accuracy": result["balanced_accuracy"]})
        run.finish()


def read_resume_checkpoint(path):
    return load_checkpoint_of_kind(path, CHECKPOINT_KIND, RESUME_KEYS, CHECKPOINT_VERSION)


@run_main
def main(argv=None):
    args, resume = config.settle_config(parser(), argv, read_resume_checkpoint, config.CLASSIFIER_RUN_OPTIONS,
                                        log=main_process_log)
    if args.epochs < 1 or args.batch_size < 1 or args.image_size < 32:
        raise UserError("--epochs and --batch-size must be at least 1 and --image-size at least 32")
    config.check_option_ranges(args, {"save_every_steps": 0, "seed": 0}, positive=("lr",))
    config.check_epochs_left(args, resume)
    with distributed(args.device, args.dist_timeout, args.channels_last) as (info, device, channels_last), \
            StopRequest() as stop:
        args = config.RunConfig(**{**vars(args), "channels_last": channels_last})  # the layout resolved for the device
        with claim_run_dir(args, "classifier training", resume, info) as folder:
            train(args, resume, info, device, stop, folder.run_id)
        barrier()


if __name__ == "__main__":
    main()
