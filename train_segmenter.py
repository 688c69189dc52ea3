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
(model, optimiser, grad scaler, position in the epoch, RNG): continue a run with
--resume. SIGTERM or Ctrl-C saves last.pt at the next step and exits with status 143;
a run killed outright resumes from its last epoch.
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

import config
from dataset.conic import build_conic, check_split_overlap
from dataset.pannuke import build_pannuke, check_fold_overlap
from loop import Loop, StopRequest
from metrics import confusion_matrix, format_mask_table, mask_scores
from runtime import (SeededSampler, autocast_context, distributed, init_wandb, load_model_state,
                     loader_workers, main_process_log, make_loader, make_optimizer, maybe_compile, claim_run_dir,
                     resolve_precision, unwrap, wrap_ddp)
from segmenter import (CHECKPOINT_KIND, CHECKPOINT_VERSION, ENCODERS, RESUME_KEYS, build_segmenter,
                       load_encoder_weights, read_segmenter_checkpoint, to_device, train_step)
from utils import UserError, atomic_save_text, run_main, seed_everything


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=config.HelpFormatter)
    p.add_argument("--dataset", default="pannuke", choices=list(DATASETS), help="what --data-dir holds")
    config.add_allow_overlap_arg(config.add_pannuke_data_args(p, "folds scored after every epoch"))
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
    g.add_argument("--save-every-steps", type=int, default=0,
                   help="also refresh last.pt every N steps inside an epoch (0: at epoch ends only)")
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
    check_fold_overlap(args.data_dir, args.train_folds, args.test_folds, args.allow_overlap)
    return (build_pannuke(args.data_dir, args.train_folds, args.tissue, augment=True, split="train"),
            build_pannuke(args.data_dir, args.test_folds, args.tissue, augment=False, split="test"))


def conic_datasets(args):
    split = dict(seed=args.seed, test_fraction=args.test_fraction, split_file=args.split_file,
                 label_set=args.label_set)
    train_set = build_conic(args.data_dir, "train", augment=True, **split)
    test_set = build_conic(args.data_dir, "test", **split)
    if args.split_file is not None:
        check_split_overlap(args.split_file, train_set.all_names, train_set.indices, test_set.indices, args.allow_overlap)
    return train_set, test_set


# --dataset: (train and test sets, um per pixel of the data)
DATASETS = {"pannuke": (pannuke_datasets, config.PANNUKE_MPP), "conic": (conic_datasets, config.CONIC_MPP)}


def segmenter_payload(args, model_cfg, model, opt, scaler, mpp):
    """The segmenter's own checkpoint entries (loop.Loop adds the position and RNG state)."""
    return {"kind": CHECKPOINT_KIND, "version": CHECKPOINT_VERSION, "model": unwrap(model).state_dict(),
            "model_config": model_cfg, "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
            "config": vars(args), "mpp": mpp}


def train(args, resume, info, device, channels_last, stop, run_id):
    out_dir = Path(args.out_dir)
    precision = resolve_precision(args.precision, device)
    autocast = autocast_context(device, precision)
    log = print if info.is_main else (lambda *a, **k: None)

    # --- data, and the model it asks for
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
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        scaler.load_state_dict(resume["scaler"])

    # --- where the run stands
    loop = Loop(out_dir, info, device, ("train_loss",),
                lambda: segmenter_payload(args, model_cfg, model, opt, scaler, mpp), stop, config.LOG_EVERY_STEPS,
                args.save_every_steps, run_id=run_id)
    position = loop.restore(resume, args.resume, log)
    run = init_wandb(args, position.wandb_run_id) if info.is_main else None
    if run is not None:
        position.wandb_run_id = run.id
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

    def step(batch):
        return train_step(model, opt, scaler, *batch, device, channels_last, autocast)

    # --- the epochs
    while position.epoch < args.epochs:
        lr = args.lr * 0.5 * (1 + math.cos(math.pi * position.epoch / args.epochs))
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        sums = loop.epoch(position, loader, sampler, step, f"epoch {position.epoch + 1}/{args.epochs}")
        cm = evaluate(unwrap(model), test_loader, device, autocast, channels_last, label_set.num_classes)
        if info.distributed:
            dist.all_reduce(cm)
        scores = mask_scores(cm.cpu(), label_set)
        means = loop.end_epoch(position, sums, {"lr": lr, **scores})
        if not math.isfinite(means["train_loss"]):  # stop before last.pt is overwritten: it keeps the last good epoch
            raise UserError(f"training diverged in epoch {position.epoch} (mean loss {means['train_loss']}): lower "
                            f"--lr or use --precision fp32; {loop.last_checkpoint} still holds the last good epoch, "
                            f"if any")
        loop.save(position, loop.zeros())
        if info.is_main:
            atomic_save_text(out_dir / "metrics.json", json.dumps(
                {"classes": list(label_set.class_names), "test_patches": len(test_set), "history": position.history},
                indent=1, allow_nan=False))
            log(f"epoch {position.epoch}: train loss {means['train_loss']:.4f}, test ({len(test_set)} patches):\n"
                + format_mask_table(scores))
            if run is not None:
                run.log({"epoch": position.epoch, "lr": lr, "train/loss": means["train_loss"],
                         "test/dice_nuclei": scores["dice"]["Nuclei"], "test/mean_dice_types": scores["mean_dice_types"]})
    if run is not None:
        run.finish()
    log(f"done: {loop.last_checkpoint}")


@run_main
def main(argv=None):
    args, resume = config.settle_config(parser(), argv, lambda path: read_segmenter_checkpoint(path, RESUME_KEYS),
                                        config.SEGMENTER_RUN_OPTIONS, log=main_process_log)
    config.check_option_ranges(args, {"epochs": 1, "batch_size": 1, "width": 1, "save_every_steps": 0, "seed": 0},
                               positive=("lr",))
    config.check_epochs_left(args, resume)
    with distributed(args.device, channels_last=args.channels_last) as (info, device, channels_last), \
            StopRequest() as stop:
        with claim_run_dir(args, "segmenter training", resume, info) as folder:
            train(args, resume, info, device, channels_last, stop, folder.run_id)


if __name__ == "__main__":
    main()
