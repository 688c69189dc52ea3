"""Train the 6-class nucleus segmenter on PanNuke (make_masks.py then uses it to
write nucleus masks for UniToPatho, which ships none).

    python train_segmenter.py --data-dir data/pannuke --tissue all --out-dir runs/segmenter
    torchrun --nproc_per_node=8 train_segmenter.py --data-dir data/pannuke ...   # DDP; --batch-size is per process

Classes are those of dataset/masks.py (5 nucleus types + background); data, folds
and --tissue work as for train_pannuke.py, with the same seeded flips/rotations.
The loss is cross-entropy + soft Dice, because background is most of every patch.
After every epoch the test folds are segmented and per-class Dice and IoU (pixel
counts summed over the whole test set; see segmenter.dice_iou) are printed and
appended to OUT/metrics.json, and OUT/checkpoints/last.pt is replaced atomically
(model, optimiser, grad scaler, epoch, RNG): continue a run with --resume.
The learning rate follows a cosine from --lr to 0 over --epochs.

The model learns PanNuke's scale (40x, about 0.25 um/px); make_masks.py resamples
other magnifications to it.
"""
import argparse
import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import config
from dataset.masks import CLASS_NAMES
from dataset.pannuke import build_pannuke
from runtime import (
    SeededSampler,
    autocast_context,
    barrier,
    distributed,
    load_model_state,
    loader_workers,
    make_loader,
    make_optimizer,
    maybe_compile,
    resolve_precision,
    unwrap,
    wrap_ddp,
)
from segmenter import (
    CHECKPOINT_KIND,
    CHECKPOINT_VERSION,
    ENCODERS,
    build_segmenter,
    confusion_matrix,
    format_table,
    load_encoder_weights,
    read_segmenter_checkpoint,
    segmentation_loss,
    summarize,
)
from train_utils import take_run_options
from utils import (
    UserError,
    atomic_save_text,
    atomic_save_torch,
    get_rng_state,
    run_main,
    seed_everything,
    set_rng_state,
)

LOG_EVERY_STEPS = 10
# Taken from the checkpoint on --resume unless given on the command line.
RUN_OPTIONS = ("train_folds", "tissue", "encoder", "width", "batch_size", "lr", "seed")


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=config.HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default=config.PANNUKE_DIR,
                   help="PanNuke root holding 'Fold 1', 'Fold 2', 'Fold 3' (official release) or "
                        "train/ and test/ (converted layout)")
    g.add_argument("--train-folds", type=int, nargs="+", default=list(config.TRAIN_FOLDS), help="folds to train on")
    g.add_argument("--test-folds", type=int, nargs="+", default=list(config.TEST_FOLDS),
                   help="folds scored after every epoch")
    g.add_argument("--tissue", default=config.TISSUE, help="one of PanNuke's 19 tissues, or 'all'")
    g = p.add_argument_group("model")
    g.add_argument("--encoder", default="unet", choices=ENCODERS,
                   help="unet: plain U-Net encoder sized by --width; resnet*: torchvision ResNet (random init "
                        "unless --encoder-weights)")
    g.add_argument("--width", type=int, default=32,
                   help="channels at the finest decoder level (and plain encoder level), doubling per level")
    g.add_argument("--encoder-weights", default=None, metavar="PATH",
                   help="state dict for the encoder, e.g. torchvision's ImageNet resnet34-b627a593.pth for "
                        "--encoder resnet34 (fc.* ignored); not used when resuming")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=50, help="total epochs to reach (also when resuming)")
    g.add_argument("--batch-size", type=int, default=16, help="batch size per process")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate at the start of the cosine schedule")
    g = p.add_argument_group("outputs and resuming")
    g.add_argument("--out-dir", default="runs/segmenter", help="run folder: checkpoints/last.pt, metrics.json")
    g.add_argument("--resume", default=None, metavar="CKPT", help="continue from OUT/checkpoints/last.pt")
    config.add_device_args(p)
    return p


@torch.no_grad()
def evaluate(model, loader, device, autocast, channels_last):
    """Confusion matrix of the argmax over this process's share of the test set."""
    model.eval()
    cm = torch.zeros(len(CLASS_NAMES), len(CLASS_NAMES), dtype=torch.int64, device=device)
    for labels, image in loader:
        x, target = to_device(labels, image, device, channels_last)
        with autocast:
            logits = model(x)
        cm += confusion_matrix(logits.argmax(1), target)
    return cm


def to_device(labels, image, device, channels_last):
    x = image.to(device, non_blocking=True).float().div_(255)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, labels.to(device, non_blocking=True).long()


def train(args, info, device):
    out_dir = Path(args.out_dir)
    ckpt_path = out_dir / "checkpoints" / "last.pt"
    precision = resolve_precision(args.precision, device)
    autocast = autocast_context(device, precision)
    log = print if info.is_main else (lambda *a, **k: None)

    resume = read_segmenter_checkpoint(args.resume) if args.resume else None
    if resume is not None:
        take_run_options(args, resume["config"], log, RUN_OPTIONS)
    model_cfg = {"encoder": args.encoder, "width": args.width}
    if resume is not None and resume["model_config"] != model_cfg:
        raise UserError(f"checkpoint {args.resume} was trained with {resume['model_config']}, but this run asks for "
                        f"{model_cfg}; leave out --encoder/--width to resume with the checkpoint's")
    seed_everything(args.seed)  # same initial weights on every rank
    model = build_segmenter(model_cfg)
    if resume is not None:
        load_model_state(model, resume["model"], args.resume, "segmenter")
    elif args.encoder_weights:
        load_encoder_weights(model, args.encoder_weights)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    opt = make_optimizer(model.parameters(), args.lr, (0.9, 0.999), device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    start_epoch, history = 0, []
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        scaler.load_state_dict(resume["scaler"])
        start_epoch, history = resume["epoch"], list(resume["history"])
        if resume["world_size"] == info.world_size:
            set_rng_state(resume["rng"][info.rank])
        log(f"resumed from {args.resume}: epoch {start_epoch + 1}")

    model = maybe_compile(wrap_ddp(model, info, device), args.compile)

    train_set = build_pannuke(args.data_dir, args.train_folds, args.tissue, augment=True, split="train")
    test_set = build_pannuke(args.data_dir, args.test_folds, args.tissue, augment=False, split="test")
    sampler = SeededSampler(train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=args.seed)
    workers = loader_workers(args.workers, device)
    loader = make_loader(train_set, args.batch_size, workers, device, sampler=sampler)
    # Each rank scores every world-th test patch: no padding duplicates, so the summed counts are exact.
    my_test = torch.utils.data.Subset(test_set, range(info.rank, len(test_set), info.world_size))
    test_loader = make_loader(my_test, args.batch_size, workers, device)
    log(f"training on {len(train_set)} patches, scoring {len(test_set)}, {info.world_size} process(es) on "
        f"{device.type}, precision {precision}, batch {args.batch_size} x {info.world_size}, "
        f"{workers} loader worker(s)")

    for epoch in range(start_epoch, args.epochs):
        lr = args.lr * 0.5 * (1 + math.cos(math.pi * epoch / args.epochs))
        for group in opt.param_groups:
            group["lr"] = lr
        sampler.set_epoch(epoch)
        model.train()
        sums = torch.zeros(2, device=device)  # [loss sum, batches]
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not info.is_main, dynamic_ncols=True)
        for step, (labels, image) in enumerate(bar, start=1):
            x, target = to_device(labels, image, device, args.channels_last)
            with autocast:
                logits = model(x)
            loss = segmentation_loss(logits, target)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sums += torch.stack([loss.detach(), torch.ones((), device=device)])
            if step % LOG_EVERY_STEPS == 0:  # reading the loss syncs the device: not every step
                bar.set_postfix(loss=f"{(sums[0] / sums[1]).item():.4f}")
        bar.close()

        cm = evaluate(unwrap(model), test_loader, device, autocast, args.channels_last)
        rng = get_rng_state()
        if info.distributed:
            dist.all_reduce(sums)
            dist.all_reduce(cm)
            rngs = [None] * info.world_size
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        train_loss = (sums[0] / sums[1].clamp(min=1)).item()
        if not math.isfinite(train_loss):  # stop before last.pt is overwritten: it keeps the last good epoch
            raise UserError(f"training diverged in epoch {epoch + 1} (mean loss {train_loss}): lower --lr or use "
                            f"--precision fp32; {ckpt_path} still holds the last good epoch, if any")
        metrics = summarize(cm.cpu())
        history.append({"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, **metrics})
        if info.is_main:
            atomic_save_torch({
                "kind": CHECKPOINT_KIND, "version": CHECKPOINT_VERSION, "model": unwrap(model).state_dict(),
                "model_config": model_cfg, "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch + 1, "history": history, "rng": rngs, "world_size": info.world_size,
                "config": vars(args)}, ckpt_path)
            atomic_save_text(out_dir / "metrics.json", json.dumps(
                {"classes": list(CLASS_NAMES), "test_patches": len(test_set), "history": history},
                indent=1, allow_nan=False))
            log(f"epoch {epoch + 1}: train loss {history[-1]['train_loss']:.4f}, test ({len(test_set)} patches):\n"
                + format_table(metrics))
        barrier()
    log(f"done: {ckpt_path}")


@run_main
def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    args.options_given = config.options_given(p, argv)
    with distributed(args.device, channels_last=args.channels_last) as (info, device, args.channels_last):
        train(args, info, device)


if __name__ == "__main__":
    main()
