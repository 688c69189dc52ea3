"""Write synthetic H&E images for a test set from a trained generator.

    python test.py --checkpoint runs/pannuke/checkpoints/last.pt --dataset pannuke \
        --data-dir data/pannuke --test-folds 3 --tissue Colon --out-dir synthetic/pannuke
    python test.py --checkpoint runs/unitopatho/checkpoints/last.pt --dataset unitopatho \
        --data-dir data/unitopatho/800 --masks-dir data/unitopatho_masks --out-dir synthetic/unitopatho [--tile]
    python test.py --checkpoint runs/folder/checkpoints/last.pt --dataset folder --masks-only \
        --data-dir my_masks --out-dir synthetic/my_masks [--tile]
Under torchrun each process writes its own share of the files. Files already
written are skipped, so an interrupted run resumes. OUT/.run.json (a manifest) records
what made them (the checkpoint's sha256, epoch and step, and every option that
changes an image): a re-run with another checkpoint or such an option is refused
unless --overwrite, which first deletes the images that run wrote (run_folder.py).

UniToPatho test images are generated at native size (1812 x 1812) from their masks
and written as a drop-in copy of the split: OUT/<top_label_name>/<image_id> plus
OUT/test.csv (see tiling.py for the whole-image and --tile modes). Nothing else
goes inside OUT: the mask | real | fake grids go to OUT.grids/ (--grids-dir).

A folder dataset (dataset/folder.py) is painted the same way, each tile at its own
size, into OUT/images/NAME.png beside copies of its masks (and instance maps) and the
checkpoint's classes.json, which a folder loader reads back: the run's test (or
train) tiles, or with --masks-only every mask of a folder that has no images.

Normalisation at generation time is explicit (--norm-mode): `eval` (default) uses
the running BatchNorm statistics and no dropout, so an image does not depend on
which other images share its batch or tile; `train` uses each image's own
statistics and dropout, as the pix2pix paper did (seeded per image).

--samples-per-mask K > 1 writes K images per mask into K drop-in trees,
OUT/sample_1 ... OUT/sample_K, sample k of image i seeded from (--seed, i, k): a
SPADE generator's noise vector (--noise-dim) or, for a U-Net, its dropout (with
--norm-mode train). With K = 1, OUT itself is the tree, as before.
"""
import argparse
import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from config import (CONIC_TEST_FRACTION, FOLDER_TEST_FRACTION, INSTANCE_DATASETS, SEED, check_option_ranges,
                    test_parser)
from dataset.conic import build_conic, write_repainted_folder
from dataset.folder import FolderTiles, open_folder, split_folder, write_classes
from dataset.masks import get_label_set
from dataset.pannuke import build_pannuke
from dataset.unitopatho import UniToPatho
from dataset.unitopatho_mask import UniToPathoPairs, centre_origin, read_mask
from gan import generate, load_generator, prepare_batch, uses_instance_edges
from report import to_uint8_image, triplet_grid
from run_folder import RunFolder, input_paths, manifest_options
from runtime import autocast_context, barrier, claim_folder, distributed, resolve_precision
from tiling import generate_tiled, generate_whole
from utils import UserError, atomic_copy, file_sha256, atomic_save_png, inside, resolve_wandb_mode, run_main


def beside(out_dir, suffix):
    """OUT<suffix>, a sibling of the output folder: what is not part of the drop-in tree."""
    out = Path(out_dir).resolve()
    return out.with_name(out.name + suffix)


def grids_folder(args):
    return Path(args.grids_dir) if args.grids_dir else beside(args.out_dir, ".grids")


def tiles_folder(args):
    return Path(args.tiles_dir) if args.tiles_dir else beside(args.out_dir, ".tiles")


# Between the seeds of one image's samples: above any split's size, so (image, sample) pairs never share a seed.
SAMPLE_SEED_STRIDE = 1_000_003


def sample_trees(args):
    """The options of each sample's run: with one sample per mask, `args` as given;
    with K, sample k writes OUT/sample_k, its grids and CoNIC tiles in sample_k folders
    beside OUT, from seeds shifted by (k - 1) x SAMPLE_SEED_STRIDE (image i: seed + i)."""
    if args.samples_per_mask == 1:
        return [args]
    return [argparse.Namespace(**{**vars(args), "out_dir": str(Path(args.out_dir) / f"sample_{k}"),
                                  "grids_dir": str(grids_folder(args) / f"sample_{k}"),
                                  "tiles_dir": str(tiles_folder(args) / f"sample_{k}"),
                                  "seed": args.seed + (k - 1) * SAMPLE_SEED_STRIDE})
            for k in range(1, args.samples_per_mask + 1)]


def check_samples(args, model_cfg):
    """Several samples per mask need a source of variation, or they would all be the same image."""
    if args.samples_per_mask < 1:
        raise UserError(f"--samples-per-mask must be at least 1, got {args.samples_per_mask}")
    if args.samples_per_mask == 1 or model_cfg["noise_dim"]:
        return
    if model_cfg["generator"] == "unet" and model_cfg["dropout"] and args.norm_mode == "train":
        return
    cause = ("this U-Net varies only through dropout: add --norm-mode train" if model_cfg.get("dropout") else
             "this generator was trained without noise (--noise-dim) or dropout")
    raise UserError(f"--samples-per-mask {args.samples_per_mask} would write identical images: {cause}")


def fetch_wandb_checkpoint(spec, out_dir):
    """wandb:ENTITY/PROJECT/ARTIFACT:VERSION, or wandb:ENTITY/PROJECT/RUN_ID for that
    run's latest checkpoint artifact. Needs an online account."""
    try:
        resolve_wandb_mode("online")
    except UserError as exc:
        raise UserError(f"{spec}: fetching from wandb: {exc}") from None
    import wandb
    path = spec[len("wandb:"):]
    if ":" not in path.rsplit("/", 1)[-1]:
        path = f"{path}-checkpoint:latest"
    try:
        folder = wandb.Api().artifact(path, type="model").download(root=str(beside(out_dir, ".checkpoint")))
    except Exception as exc:
        raise UserError(f"cannot fetch wandb artifact {path}: {exc}") from None
    found = sorted(Path(folder).glob("*.pt"))
    if not found:
        raise UserError(f"wandb artifact {path} holds no .pt file")
    return found[0]


def checkpoint_identity(path, ckpt, args):
    """What made the images: the checkpoint (its sha256), and which of its weights painted."""
    weights = "ema" if args.ema and "generator_ema" in ckpt else "raw"
    return {"checkpoint_sha256": file_sha256(path), "checkpoint_epoch": ckpt.get("epoch"),
            "checkpoint_step": ckpt.get("step"), "weights": weights}


def output_folders(args):
    """{flag: folder} this run writes: OUT, its grids and (CoNIC) its tiles."""
    folders = {"--out-dir": Path(args.out_dir)}
    if args.grids:
        folders["--grids-dir"] = grids_folder(args)
    if args.dataset == "conic":
        folders["--tiles-dir"] = tiles_folder(args)
    return folders


def claim_outputs(args, options, info, held):
    """Claim every output folder for these options (run_folder.RunFolder) on the main
    process, then join them on the others; `held` (an ExitStack) releases them."""
    folders = output_folders(args)
    claim = dict(script="test.py", options=options, inputs=input_paths(args), overwrite=args.overwrite,
                 continue_hint="give the same options and checkpoint to continue it")
    for flag, folder in folders.items():  # every folder checked before any is claimed
        RunFolder.check(folder, flag=flag, **claim)
    barrier()  # under torchrun, rank 0's claim must not meet another rank's check (which it would refuse)
    for flag, folder in folders.items():
        held.enter_context(claim_folder(info, folder, flag=flag, **claim))


def generate_images(generator, mask, autocast, norm_mode, seeds, noise_seeds=None):
    """Per-image generation in train mode (batch statistics must not mix images), its
    dropout seeded from `seeds`; a noise generator's vectors come from `noise_seeds`
    (default `seeds`; the tiles of one image share its vector)."""
    noise_seeds = seeds if noise_seeds is None else noise_seeds
    if norm_mode == "eval":
        return generate(generator, mask, autocast, "eval", noise_seeds)
    outs = []
    for m, seed, noise_seed in zip(mask, seeds, noise_seeds):
        torch.manual_seed(seed)
        outs.append(generate(generator, m[None], autocast, "train", [noise_seed]))
    return torch.cat(outs)


def data_dir_of(args, ckpt):
    data_dir = args.data_dir or ckpt.get("config", {}).get("data_dir")
    if not data_dir:
        raise UserError("--data-dir is required (the checkpoint does not record one)")
    return data_dir


def open_folder_inputs(args, ckpt, data_dir):
    """A folder's tiles of --split (the run's split, or --split-file), or with
    --masks-only all its masks, read in the checkpoint's classes."""
    folder = open_folder(data_dir, get_label_set(ckpt["model_config"]["label_set"]), masks_only=args.masks_only)
    if args.masks_only:
        return FolderTiles(folder)
    run = ckpt.get("config", {})
    train_idx, test_idx = split_folder(folder, args.split_file or run.get("split_file"),
                                       run.get("test_fraction", FOLDER_TEST_FRACTION), run.get("seed", SEED))
    return FolderTiles(folder, train_idx if args.split == "train" else test_idx)


def open_inputs(args, ckpt):
    """What to generate from: PanNuke test patches, UniToPatho (image, mask) pairs, a
    CoNIC split, or a folder's tiles; its masks must be in the generator's label set."""
    data_dir = data_dir_of(args, ckpt)
    edges = uses_instance_edges(ckpt["model_config"])
    if edges and args.dataset not in INSTANCE_DATASETS:
        raise UserError(f"checkpoint {args.checkpoint} paints from class maps with nucleus instance edges "
                        f"(--instance-edges), which {args.dataset} masks do not have; give PanNuke or CoNIC data")
    if args.masks_only and args.dataset != "folder":
        raise UserError(f"--masks-only paints a folder of masks: add --dataset folder (not {args.dataset})")
    if args.dataset == "folder":
        return open_folder_inputs(args, ckpt, data_dir)
    if args.dataset == "pannuke":
        inputs = build_pannuke(data_dir, args.test_folds, args.tissue, augment=False, split="test", edges=edges)
    elif args.dataset == "unitopatho":
        inputs = UniToPathoPairs(UniToPatho(data_dir, args.split), args.masks_dir, augment=False)
    else:
        run = ckpt.get("config", {})
        inputs = build_conic(data_dir, args.split, seed=run.get("seed", SEED),
                             test_fraction=run.get("test_fraction", CONIC_TEST_FRACTION),
                             split_file=args.split_file or run.get("split_file"),
                             label_set=args.label_set or run.get("label_set", "conic"), edges=edges)
    wanted = get_label_set(ckpt["model_config"]["label_set"])
    if not inputs.label_set.same_classes(wanted):
        raise UserError(f"{data_dir} gives masks in the {inputs.label_set.describe()}, but checkpoint "
                        f"{args.checkpoint} is conditioned on the {wanted.describe()}")
    return inputs


@dataclass
class Painter:
    """The generator a checkpoint describes, where it paints, and this process's share of the work."""
    generator: torch.nn.Module
    ckpt: dict
    device: torch.device
    autocast: object
    rank: int = 0
    world_size: int = 1

    @property
    def label_set(self):
        return get_label_set(self.ckpt["model_config"]["label_set"])

    @property
    def edges(self):
        """Whether the generator reads the instance-edge channel."""
        return uses_instance_edges(self.ckpt["model_config"])

    @property
    def multiple(self):
        """The side every painted size is padded to a multiple of."""
        return 2 ** self.ckpt["model_config"]["unet_depth"]

    def share(self, count):
        """This process's indices of `count` items."""
        return list(range(self.rank, count, self.world_size))


def generate_patches(args, painter, dataset, out_dir):
    """One PNG per patch, OUT/<patch name>.png (PanNuke and CoNIC test patches)."""
    labels_set, multiple = painter.label_set, painter.multiple
    if len(dataset) and dataset[0][0].shape[-1] % multiple:
        raise UserError(f"patches of {dataset[0][0].shape[-1]} px do not fit checkpoint {args.checkpoint}, whose "
                        f"U-Net needs multiples of {multiple} px")
    grids_dir = grids_folder(args)
    outputs = [inside(out_dir, out_dir / f"{name}.png") for name in dataset.names]
    mine = painter.share(len(dataset))
    todo = [i for i in mine if args.overwrite or not outputs[i].exists()]
    grids_left = args.grids if painter.rank == 0 else 0
    bar = tqdm(total=len(todo), desc=f"generating ({len(mine) - len(todo)} already done)", disable=painter.rank != 0)
    for start in range(0, len(todo), args.batch_size):
        batch = todo[start:start + args.batch_size]
        labels, images = map(torch.stack, zip(*(dataset[i] for i in batch)))
        mask, real = prepare_batch(labels, images, painter.device, args.channels_last, labels_set.num_classes,
                                   painter.edges)
        fake = generate_images(painter.generator, mask, painter.autocast, args.norm_mode, [args.seed + i for i in batch])
        for i, f in zip(batch, fake):
            atomic_save_png(to_uint8_image(f), outputs[i])
        if grids_left > 0:
            atomic_save_png(triplet_grid(labels, real, fake, labels_set),
                            inside(grids_dir, grids_dir / f"grid_{start // args.batch_size:04d}.png"))
            grids_left -= 1
        bar.update(len(batch))
    bar.close()
    return len(dataset)


def generate_pannuke(args, painter, dataset):
    return generate_patches(args, painter, dataset, Path(args.out_dir))


def generate_conic(args, painter, dataset):
    """A drop-in CoNIC folder: OUT/images.npy holds the synthetic patches, beside copies
    of the split's labels.npy rows, patch_info.csv and counts.csv. Patches are written
    as PNGs to --tiles-dir (OUT.tiles/) first, so an interrupted run resumes; rank 0 assembles."""
    tiles = tiles_folder(args)
    count = generate_patches(args, painter, dataset, tiles)
    barrier()
    if painter.rank == 0:
        write_repainted_folder(dataset, [tiles / f"{name}.png" for name in dataset.names], Path(args.out_dir))
    return count


def paint_at_native_size(args, painter, labels, seed):
    """One class map painted at its own size: padded whole, or in overlapping tiles with --tile;
    train-mode dropout and noise seeded from `seed`."""
    def forward(mask, seeds):
        return generate_images(painter.generator, mask, painter.autocast, args.norm_mode, seeds, [seed] * len(seeds))

    num_classes = painter.label_set.num_classes
    if args.tile:
        return generate_tiled(forward, labels, painter.device, args.tile_overlap, args.batch_size, seed,
                              args.channels_last, tile=painter.multiple, num_classes=num_classes, edges=painter.edges)
    return generate_whole(forward, labels, painter.device, seed, args.channels_last, painter.multiple, num_classes,
                          painter.edges)


def generate_unitopatho(args, painter, pairs=None):
    """Every image of --split at native size from its mask, in the split's own layout."""
    pairs = open_inputs(args, painter.ckpt) if pairs is None else pairs
    split = pairs.dataset
    out_dir, grids_dir = Path(args.out_dir), grids_folder(args)
    outputs = [inside(out_dir, out_dir / label / name) for label, name in zip(split.rows["top_label_name"], split.names)]
    if painter.rank == 0:
        atomic_copy(split.data_dir / f"{args.split}.csv", out_dir / f"{args.split}.csv")
    mine = painter.share(len(split))
    todo = [i for i in mine if args.overwrite or not outputs[i].exists()]

    grids_left = args.grids if painter.rank == 0 else 0
    for i in tqdm(todo, desc=f"generating ({len(mine) - len(todo)} already done)", disable=painter.rank != 0):
        labels = read_mask(pairs.mask_paths[i], split.paths[i])
        fake = paint_at_native_size(args, painter, labels, args.seed + i)
        atomic_save_png(to_uint8_image(fake), outputs[i])
        if grids_left > 0:
            # mask | real | fake at the centre crop: a quick visual check beside the drop-in tree.
            y, x = centre_origin(*labels.shape, 256)
            crop = (slice(y, y + 256), slice(x, x + 256))
            real = torch.tensor(split.load_image(i)[crop]).permute(2, 0, 1).float().div(127.5).sub(1)
            grid = triplet_grid(torch.from_numpy(labels[crop])[None], real[None], fake[:, crop[0], crop[1]][None])
            atomic_save_png(grid, inside(grids_dir, grids_dir / f"grid_{i:04d}.png"))
            grids_left -= 1
    return len(split)


def generate_folder(args, painter, tiles):
    """A folder dataset: OUT/images/NAME.png painted from each mask at its own size (whole,
    or --tile), beside OUT/masks/NAME.png and OUT/instances/ (copies of the inputs) and
    the checkpoint's classes as OUT/classes.json. A mask is copied before its image is
    written, so an image on disk means its tile is complete."""
    classes = tiles.label_set
    out_dir, grids_dir = Path(args.out_dir), grids_folder(args)
    outputs = [inside(out_dir, out_dir / "images" / f"{name}.png") for name in tiles.names]
    if painter.rank == 0:
        write_classes(out_dir / "classes.json", classes)
    mine = painter.share(len(tiles))
    todo = [i for i in mine if args.overwrite or not outputs[i].exists()]

    grids_left = args.grids if painter.rank == 0 else 0
    for i in tqdm(todo, desc=f"generating ({len(mine) - len(todo)} already done)", disable=painter.rank != 0):
        labels = tiles.classes(i)
        copies = [(tiles.mask_path(i), out_dir / "masks" / f"{tiles.names[i]}.png")]
        if tiles.instance_path(i) is not None:
            copies.append((tiles.instance_path(i), out_dir / "instances" / tiles.instance_path(i).name))
        for source, target in copies:
            atomic_copy(source, inside(out_dir, target))
        fake = paint_at_native_size(args, painter, labels, args.seed + i)
        atomic_save_png(to_uint8_image(fake), outputs[i])
        if grids_left > 0:
            real = None if args.masks_only else \
                [torch.from_numpy(tiles.image(i)).permute(2, 0, 1).float().div(127.5).sub(1)]
            grid = triplet_grid(torch.from_numpy(labels)[None], real, fake[None], classes)
            atomic_save_png(grid, inside(grids_dir, grids_dir / f"grid_{i:04d}.png"))
            grids_left -= 1
    return len(tiles)


WRITERS = {"pannuke": generate_pannuke, "unitopatho": generate_unitopatho, "conic": generate_conic,
           "folder": generate_folder}


@run_main
def main(argv=None):
    args = test_parser().parse_args(argv)
    check_option_ranges(args, {"batch_size": 1, "grids": 0, "samples_per_mask": 1, "tile_overlap": 0, "seed": 0})
    with distributed(args.device, channels_last=args.channels_last) as (info, device, args.channels_last), \
            contextlib.ExitStack() as held:
        checkpoint = args.checkpoint
        if checkpoint.startswith("wandb:"):
            checkpoint = fetch_wandb_checkpoint(checkpoint, args.out_dir)
        generator, ckpt = load_generator(checkpoint, device, ema=args.ema)
        args.dataset = args.dataset or ckpt.get("config", {}).get("dataset") or "pannuke"
        args.data_dir = data_dir_of(args, ckpt)
        check_samples(args, ckpt["model_config"])
        inputs = open_inputs(args, ckpt)  # read and checked before anything is written
        options = manifest_options(args, leave_out=("batch_size", "grids")) | checkpoint_identity(checkpoint, ckpt, args)
        claim_outputs(args, options, info, held)
        if args.channels_last:
            generator = generator.to(memory_format=torch.channels_last)
        autocast = autocast_context(device, resolve_precision(args.precision, device))
        painter = Painter(generator, ckpt, device, autocast, info.rank, info.world_size)
        for tree_args in sample_trees(args):
            count = WRITERS[args.dataset](tree_args, painter, inputs)
        barrier()
        if info.is_main:
            shared = f" ({info.world_size} processes, each wrote its share)" if info.distributed else ""
            trees = f" x {args.samples_per_mask} per mask, in sample_1 ... sample_{args.samples_per_mask}" \
                if args.samples_per_mask > 1 else ""
            print(f"synthetic images for {count} samples{trees} are in {args.out_dir}{shared}")


if __name__ == "__main__":
    main()
