"""Train the nucleus segmenter on PanNuke or CoNIC (make_masks.py then uses it to
write nucleus masks for UniToPatho, which ships none; study.py scores with it).

    python train_segmenter.py --data-dir data/pannuke --tissue all --out-dir runs/segmenter
    python train_segmenter.py --dataset conic --data-dir data/conic --label-set pannuke --out-dir runs/seg_conic
    torchrun --nproc_per_node=8 train_segmenter.py --data-dir data/pannuke ...   # DDP; --batch-size is per process

Classes are those of the data's label set (dataset/masks.py): PanNuke's 5 nucleus
types + background, or CoNIC's 6 (+ background), or CoNIC mapped to PanNuke's with
--label-set pannuke (a 20x colon segmenter whose masks UniToPatho training reads).
Data, folds, --tissue and the CoNIC split work as for the GAN scripts, with the same
seeded flips/rotations.
The loss is cross-entropy + soft Dice, because background is most of every patch.
After every epoch the test folds are segmented and per-class Dice and IoU (pixel
counts summed over the whole test set; see metrics.dice_iou) are printed and
appended to OUT/metrics.json, and OUT/checkpoints/last.pt is replaced atomically
(model, optimiser, grad scaler, epoch, RNG): continue a run with --resume.
The learning rate follows a cosine from --lr to 0 over --epochs.

The model learns its data's scale (PanNuke 40x, about 0.25 um/px; CoNIC 20x, about
0.5 um/px), recorded in the checkpoint as `mpp`; make_masks.py resamples other
magnifications to it.
"""
import argparse
import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import config
from dataset.conic import build_conic
from dataset.pannuke import build_pannuke
from metrics import confusion_matrix, format_mask_table, mask_scores
from runtime import (SeededSampler, autocast_context, barrier, distributed, init_wandb, load_model_state,
                     loader_workers, main_process_log, make_loader, make_optimizer, maybe_compile, prepare_run_dir,
                     resolve_precision, unwrap, wrap_ddp)
from segmenter import (CHECKPOINT_KIND, CHECKPOINT_VERSION, ENCODERS, RESUME_KEYS, build_segmenter,
                       load_encoder_weights, read_segmenter_checkpoint, to_device, train_step)
from utils import (UserError, atomic_save_text, atomic_save_torch, get_rng_state, run_main, seed_everything,
                   set_rng_state)


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=config.HelpFormatter)
    p.add_argument("--dataset", default="pannuke", choices=list(DATASETS), help="what --data-dir holds")
    config.add_pannuke_data_args(p, "folds scored after every epoch")
    g = p.add_argument_group("data (CoNIC, with --dataset conic)")
    config.add_conic_split_args(g)
    g.add_argument("--label-set", default="conic", choices=["conic", "pannuke"],
                   help="CoNIC's own classes, or mapped to PanNuke's (masks UniToPatho training can read)")
    g = p.add_argument_group("model")
    g.add_argument("--encoder", default="unet", choices=ENCODERS,
                   help="unet: plain U-Net encoder sized by --width; resnet*: torchvision ResNet (random init "
                        "unless --encoder-weights)")
    g.add_argument("--width", type=int, default=config.SEGMENTER_WIDTH,
                   help="channels at the finest decoder level (and plain encoder level), doubling per level")
    g.add_argument("--encoder-weights", default=None, metavar="PATH",
                   help="state dict for the encoder, e.g. torchvision's ImageNet resnet34-b627a593.pth for "
                        "--encoder resnet34 (fc.* ignored); not used when resuming")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=config.SEGMENTER_EPOCHS, help="total epochs to reach (also when resuming)")
    g.add_argument("--batch-size", type=int, default=config.SEGMENTER_BATCH_SIZE, help="batch size per process")
    g.add_argument("--lr", type=float, default=config.SEGMENTER_LR,
                   help="Adam learning rate at the start of the cosine schedule")
    g = p.add_argument_group("outputs and resuming")
    g.add_argument("--out-dir", default="runs/segmenter", help="run folder: checkpoints/last.pt, metrics.json")
    g.add_argument("--resume", default=None, metavar="CKPT", help="continue from OUT/checkpoints/last.pt")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out-dir that already holds a run, deleting its checkpoints")
    config.add_wandb_args(g, project=config.WANDB_PROJECT + "-segmenter")
    config.add_device_args(p)
    return p


@torch.no_grad()
def evaluate(model, loader, device, autocast, channels_last, num_classes):
    """Confusion matrix of the argmax over this process's share of the test set."""
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for labels, image in loader:
        x, target = to_device(labels, image, device, channels_last)
        with autocast:
            logits = model(x)
        cm += confusion_matrix(logits.argmax(1), target, num_classes)
    return cm


def pannuke_datasets(args):
    return (build_pannuke(args.data_dir, args.train_folds, args.tissue, augment=True, split="train"),
            build_pannuke(args.data_dir, args.test_folds, args.tissue, augment=False, split="test"))


def conic_datasets(args):
    split = dict(seed=args.seed, test_fraction=args.test_fraction, split_file=args.split_file,
                 label_set=args.label_set)
    return (build_conic(args.data_dir, "train", augment=True, **split), build_conic(args.data_dir, "test", **split))


# --dataset: (train and test sets, um per pixel of the data)
DATASETS = {"pannuke": (pannuke_datasets, config.PANNUKE_MPP), "conic": (conic_datasets, config.CONIC_MPP)}


def train(args, resume, info, device, channels_last):
    out_dir = Path(args.out_dir)
    ckpt_path = out_dir / "checkpoints" / "last.pt"
    precision = resolve_precision(args.precision, device)
    autocast = autocast_context(device, precision)
    log = print if info.is_main else (lambda *a, **k: None)

    build_datasets, mpp = DATASETS[args.dataset]
    train_set, test_set = build_datasets(args)
    label_set = train_set.label_set
    model_cfg = {"encoder": args.encoder, "width": args.width, "label_set": label_set.name}
    if resume is not None and resume["model_config"] != model_cfg:
        raise UserError(f"checkpoint {args.resume} was trained with {resume['model_config']}, but this run asks for "
                        f"{model_cfg}; leave out --encoder/--width (and use the same data) to resume with the "
                        f"checkpoint's")
    seed_everything(args.seed)  # same initial weights on every rank
    model = build_segmenter(model_cfg)
    if resume is not None:
        load_model_state(model, resume["model"], args.resume, "segmenter")
    elif args.encoder_weights:
        load_encoder_weights(model, args.encoder_weights)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
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
    run = init_wandb(args, resume.get("wandb_run_id") if resume else None) if info.is_main else None

    model = maybe_compile(wrap_ddp(model, info, device), args.compile)

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
            loss = train_step(model, opt, scaler, labels, image, device, channels_last, autocast)
            sums += torch.stack([loss, torch.ones((), device=device)])
            if step % config.LOG_EVERY_STEPS == 0:  # reading the loss syncs the device: not every step
                bar.set_postfix(loss=f"{(sums[0] / sums[1]).item():.4f}")
        bar.close()

        cm = evaluate(unwrap(model), test_loader, device, autocast, channels_last, label_set.num_classes)
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
        scores = mask_scores(cm.cpu(), label_set)
        history.append({"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, **scores})
        if info.is_main:
            atomic_save_torch({
                "kind": CHECKPOINT_KIND, "version": CHECKPOINT_VERSION, "model": unwrap(model).state_dict(),
                "model_config": model_cfg, "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch + 1, "history": history, "rng": rngs, "world_size": info.world_size,
                "config": vars(args), "mpp": mpp, "wandb_run_id": run.id if run is not None else None}, ckpt_path)
            atomic_save_text(out_dir / "metrics.json", json.dumps(
                {"classes": list(label_set.class_names), "test_patches": len(test_set), "history": history},
                indent=1, allow_nan=False))
            log(f"epoch {epoch + 1}: train loss {history[-1]['train_loss']:.4f}, test ({len(test_set)} patches):\n"
                + format_mask_table(scores))
            if run is not None:
                run.log({"epoch": epoch + 1, "lr": lr, "train/loss": train_loss, "test/dice_nuclei":
                         scores["dice"]["Nuclei"], "test/mean_dice_types": scores["mean_dice_types"]})
        barrier()
    if run is not None:
        run.finish()
    log(f"done: {ckpt_path}")


@run_main
def main(argv=None):
    args, resume = config.settle_config(parser(), argv, lambda path: read_segmenter_checkpoint(path, RESUME_KEYS),
                                        config.SEGMENTER_RUN_OPTIONS, log=main_process_log)
    config.check_option_ranges(args, {"epochs": 1, "batch_size": 1, "width": 1}, positive=("lr",))
    config.check_epochs_left(args, resume)
    with distributed(args.device, channels_last=args.channels_last) as (info, device, channels_last):
        if info.is_main:
            prepare_run_dir(args.out_dir, resume is not None, args.overwrite)
        barrier()
        train(args, resume, info, device, channels_last)


if __name__ == "__main__":
    main()
