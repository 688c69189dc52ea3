"""Write synthetic H&E images for a test set from a trained generator.

    python test.py --checkpoint runs/pannuke/checkpoints/last.pt --dataset pannuke \
        --data-dir data/pannuke --test-folds 3 --tissue Colon --out-dir synthetic/pannuke
    python test.py --checkpoint runs/unitopatho/checkpoints/last.pt --dataset unitopatho \
        --data-dir data/unitopatho/800 --masks-dir data/unitopatho_masks --out-dir synthetic/unitopatho [--tile]
Under torchrun each process writes its own share of the files. Files already
written are skipped (--overwrite regenerates them), so an interrupted run resumes.

UniToPatho test images are generated at native size (1812 x 1812) from their masks
and written as a drop-in copy of the split: OUT/<top_label_name>/<image_id> plus
OUT/test.csv (see tiling.py for the whole-image and --tile modes).

Normalisation at generation time is explicit (--norm-mode): `eval` (default) uses
the running BatchNorm statistics and no dropout, so an image does not depend on
which other images share its batch or tile; `train` uses each image's own
statistics and dropout, as the pix2pix paper did (seeded per image).
"""
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from config import test_parser
from dataset.pannuke import build_pannuke
from dataset.unitopatho import UniToPatho
from dataset.unitopatho_mask import UniToPathoPairs, centre_origin, read_mask
from figures import to_uint8_image, triplet_grid
from gan import generate, load_generator, prepare_batch
from runtime import autocast_context, barrier, distributed, resolve_precision
from tiling import generate_tiled, generate_whole
from utils import UserError, atomic_save_png, resolve_wandb_mode, run_main


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
    bar = tqdm(total=len(todo), desc=f"generating ({len(mine) - len(todo)} already done)", disable=rank != 0)
    for start in range(0, len(todo), args.batch_size):
        batch = todo[start:start + args.batch_size]
        labels, images = map(torch.stack, zip(*(dataset[i] for i in batch)))
        mask, real = prepare_batch(labels, images, device, args.channels_last)
        fake = generate_images(generator, mask, autocast, args.norm_mode, [args.seed + i for i in batch])
        for i, f in zip(batch, fake):
            atomic_save_png(to_uint8_image(f), out_dir / f"{dataset.names[i]}.png")
        if grids_left > 0:
            atomic_save_png(triplet_grid(labels, real, fake), out_dir / "grids" / f"grid_{start // args.batch_size:04d}.png")
            grids_left -= 1
        bar.update(len(batch))
    bar.close()
    return len(dataset)


def generate_unitopatho(args, generator, ckpt, device, autocast, rank, world_size):
    """Every image of --split at native size from its mask, in the split's own layout."""
    train_cfg = ckpt.get("config", {})
    data_dir = args.data_dir or train_cfg.get("data_dir")
    if not data_dir:
        raise UserError("--data-dir is required (the checkpoint does not record one)")
    pairs = UniToPathoPairs(UniToPatho(data_dir, args.split), args.masks_dir, augment=False)
    split = pairs.dataset
    out_dir = Path(args.out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(split.data_dir / f"{args.split}.csv", out_dir / f"{args.split}.csv")
    outputs = [out_dir / label / name for label, name in zip(split.rows["top_label_name"], split.names)]
    mine = list(range(rank, len(split), world_size))
    todo = [i for i in mine if args.overwrite or not outputs[i].exists()]

    def forward(mask, seeds):
        return generate_images(generator, mask, autocast, args.norm_mode, seeds)

    grids_left = args.grids if rank == 0 else 0
    for i in tqdm(todo, desc=f"generating ({len(mine) - len(todo)} already done)", disable=rank != 0):
        labels = read_mask(pairs.mask_paths[i], split.paths[i])
        if args.tile:
            fake = generate_tiled(forward, labels, device, args.tile_overlap, args.batch_size, args.seed + i,
                                  args.channels_last)
        else:
            fake = generate_whole(forward, labels, device, args.seed + i, args.channels_last)
        atomic_save_png(to_uint8_image(fake), outputs[i])
        if grids_left > 0:
            # mask | real | fake at the centre crop: a quick visual check beside the drop-in tree.
            y, x = centre_origin(*labels.shape, 256)
            crop = (slice(y, y + 256), slice(x, x + 256))
            real = torch.tensor(split.load_image(i)[crop]).permute(2, 0, 1).float().div(127.5).sub(1)
            atomic_save_png(triplet_grid(torch.from_numpy(labels[crop])[None], real[None], fake[:, crop[0], crop[1]][None]),
                     out_dir / "grids" / f"grid_{i:04d}.png")
            grids_left -= 1
    return len(split)


@run_main
def main(argv=None):
    args = test_parser().parse_args(argv)
    with distributed(args.device, channels_last=args.channels_last) as (info, device, args.channels_last):
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
            count = generate_unitopatho(args, generator, ckpt, device, autocast, info.rank, info.world_size)
        barrier()
        if info.is_main:
            shared = f" ({info.world_size} processes, each wrote its share)" if info.distributed else ""
            print(f"synthetic images for {count} samples are in {args.out_dir}{shared}")


if __name__ == "__main__":
    main()
