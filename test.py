"""Write synthetic H&E images for a test set from a trained generator.

    python test.py --checkpoint runs/pannuke/checkpoints/last.pt --dataset pannuke \
        --data-dir data/pannuke --test-folds 3 --tissue Colon --out-dir synthetic/pannuke
Under torchrun each process writes its own share of the files.

Normalisation at generation time is explicit (--norm-mode): `eval` (default) uses
the running BatchNorm statistics and no dropout, so an image does not depend on
which other images share its batch or tile; `train` uses each image's own
statistics and dropout, as the pix2pix paper did (seeded per image).
"""
import os
from pathlib import Path

import torch
from tqdm import tqdm

from config import test_parser
from dataset.pannuke import build_pannuke
from train_utils import (autocast_context, barrier, cleanup_distributed, load_generator, prepare_batch,
                         resolve_precision, save_png, setup_distributed, to_uint8_image, triplet_grid, generate)
from utils import UserError, resolve_wandb_mode, run_main


def fetch_wandb_checkpoint(spec, out_dir):
    """wandb:ENTITY/PROJECT/ARTIFACT:VERSION, or wandb:ENTITY/PROJECT/RUN_ID for that
    run's latest checkpoint artifact. Needs an online account."""
    if resolve_wandb_mode("auto") != "online":
        raise UserError(f"{spec}: fetching from wandb needs an account (set WANDB_API_KEY or run `wandb login`)")
    import wandb
    path = spec[len("wandb:"):]
    if ":" not in path.rsplit("/", 1)[-1]:
        path = f"{path}-checkpoint:latest"
    try:
        folder = wandb.Api().artifact(path, type="model").download(root=str(Path(out_dir) / ".checkpoint"))
    except Exception as exc:
        raise UserError(f"cannot fetch wandb artifact {path}: {exc}") from None
    found = sorted(Path(folder).glob("*.pt"))
    if not found:
        raise UserError(f"wandb artifact {path} holds no .pt file")
    return found[0]


def generate_images(generator, mask, autocast, norm_mode, seeds):
    """Per-image generation in train mode (batch statistics must not mix images)."""
    if norm_mode == "eval":
        return generate(generator, mask, autocast, "eval")
    outs = []
    for m, seed in zip(mask, seeds):
        torch.manual_seed(seed)
        outs.append(generate(generator, m[None], autocast, "train"))
    return torch.cat(outs)


def generate_pannuke(args, generator, ckpt, device, autocast, rank, world_size):
    train_cfg = ckpt.get("config", {})
    data_dir = args.data_dir or train_cfg.get("data_dir")
    if not data_dir:
        raise UserError("--data-dir is required (the checkpoint does not record one)")
    dataset = build_pannuke(data_dir, args.test_folds, args.tissue, augment=False, split="test")
    out_dir = Path(args.out_dir)
    mine = list(range(rank, len(dataset), world_size))
    todo = [i for i in mine if args.overwrite or not (out_dir / f"{dataset.names[i]}.png").exists()]
    grids_left = args.grids if rank == 0 else 0
    channels_last = train_cfg.get("channels_last", True)
    bar = tqdm(total=len(todo), desc=f"generating ({len(mine) - len(todo)} already done)", disable=rank != 0)
    for start in range(0, len(todo), args.batch_size):
        batch = todo[start:start + args.batch_size]
        labels, images = map(torch.stack, zip(*(dataset[i] for i in batch)))
        mask, real = prepare_batch(labels, images, device, channels_last)
        fake = generate_images(generator, mask, autocast, args.norm_mode, [args.seed + i for i in batch])
        for i, f in zip(batch, fake):
            save_png(to_uint8_image(f), out_dir / f"{dataset.names[i]}.png")
        if grids_left > 0:
            save_png(triplet_grid(labels, real, fake), out_dir / "grids" / f"grid_{start // args.batch_size:04d}.png")
            grids_left -= 1
        bar.update(len(batch))
    bar.close()
    return len(mine)


@run_main
def main(argv=None):
    args = test_parser().parse_args(argv)
    info, device = setup_distributed(args.device, 30)
    try:
        checkpoint = args.checkpoint
        if checkpoint.startswith("wandb:"):
            checkpoint = fetch_wandb_checkpoint(checkpoint, args.out_dir)
        generator, ckpt = load_generator(checkpoint, device)
        if args.channels_last:
            generator = generator.to(memory_format=torch.channels_last)
        autocast = autocast_context(device, resolve_precision(args.precision, device))
        if args.dataset == "pannuke":
            count = generate_pannuke(args, generator, ckpt, device, autocast, info.rank, info.world_size)
        else:
            raise UserError("--dataset unitopatho generation is not available yet")
        barrier()
        if info.is_main:
            print(f"wrote synthetic images for {count} {'(this rank) ' if info.distributed else ''}"
                  f"test samples to {args.out_dir}")
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main()
