r"""Write nucleus masks for UniToPatho with a segmenter from train_segmenter.py.

    python make_masks.py --checkpoint runs/segmenter/checkpoints/last.pt \
        --data-dir data/unitopatho/800 --out-dir data/unitopatho_masks
    python make_masks.py ... --stain-normalize --out-dir data/unitopatho_masks_torchstain
    torchrun --nproc_per_node=8 make_masks.py ...   # process r segments masks r, r + 8, ... of those missing

Output: one RGB PNG per image in the PanNuke palette (dataset/masks.py), with the
image's file name and size, under OUT/training/masks/ (train.csv) and
OUT/test/masks/ (test.csv): the --masks-dir layout train_utp.py and test.py read.
Masks already there are skipped and each is written
atomically, so an interrupted run continues where it stopped. OUT/.run.json records
the segmenter (its sha256) and the options that change a mask: a re-run with others
is refused unless --overwrite, which first deletes the masks that run wrote.

Magnification: the segmenter learnt PanNuke at 40x (--model-mpp 0.25 um/px);
UniToPatho is 20x (--source-mpp 0.4415 um/px). Each image is resampled by
source/model (1812 px -> 3200 px, bilinear) so nuclei have the size the model
knows, segmented in overlapping --tile px tiles blended with a smooth window
(segmenter.predict_probs), and the class probabilities are resampled back to the
image's size before the argmax. Pass other values for other scanners.

--stain-normalize: Macenko normalisation (torchstain, numpy backend) of each image
before segmenting, towards --reference IMG when given, else torchstain's built-in
reference stain vectors and concentrations (see segmenter.StainNormalizer). An
image with almost no stained tissue is segmented as it is.
"""
import argparse
import contextlib

import torch
from tqdm import tqdm

import config
from dataset.common import read_rgb
from dataset.masks import labels_to_rgb
from dataset.unitopatho import SPLITS, UniToPatho
from dataset.unitopatho_mask import masks_folder
from runtime import (autocast_context, barrier, claim_folder, distributed, loader_workers, make_loader,
                     maybe_compile, resolve_precision)
from segmenter import StainNormalizer, load_pannuke_segmenter, segment_image
from run_folder import input_paths, manifest_options
from utils import atomic_save_png, file_sha256, inside, run_main


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=config.HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="segmenter checkpoint from train_segmenter.py")
    config.add_utp_data_args(p, masks=False)
    p.add_argument("--out-dir", default=config.UTP_MASKS_DIR,
                   help="masks root: training/masks/ and test/masks/ go here")
    p.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS, help="CSV splits to segment")
    config.add_segmentation_args(p.add_argument_group("segmentation"))
    p.add_argument("--overwrite", action="store_true",
                   help="delete every mask earlier runs wrote into --out-dir (its .run.written), then segment "
                        "--splits afresh")
    config.add_device_args(p)
    return p


class Images(torch.utils.data.Dataset):
    """Decoded, optionally stain-normalised images: loader workers prepare the next
    ones while the model segments."""

    def __init__(self, paths, normalizer):
        self.paths, self.normalizer = paths, normalizer

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        image = read_rgb(self.paths[index])
        return torch.from_numpy(self.normalizer(image) if self.normalizer else image)


@run_main
def main(argv=None):
    args = parser().parse_args(argv)
    config.check_segmentation_args(args)
    with distributed(args.device, channels_last=args.channels_last) as (info, device, args.channels_last), \
            contextlib.ExitStack() as held:
        model, model_mpp = load_pannuke_segmenter(args.checkpoint, device, args.model_mpp)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        model = maybe_compile(model, args.compile)
        normalizer = StainNormalizer(args.reference) if args.stain_normalize else None
        autocast = autocast_context(device, resolve_precision(args.precision, device))

        jobs = []  # (image path, mask path)
        for split in args.splits:
            data = UniToPatho(args.data_dir, split)
            folder = masks_folder(args.out_dir, split)
            jobs += [(path, inside(folder, folder / name)) for path, name in zip(data.paths, data.names)]
        # Claimed once every output path is known to stay inside it. The splits are not part of the
        # manifest: segmenting test, then training, fills one folder.
        options = manifest_options(args, leave_out=("splits", "batch_size")) | \
            {"checkpoint_sha256": file_sha256(args.checkpoint)}
        owner = held.enter_context(claim_folder(info, args.out_dir, "make_masks.py", options,
                                                inputs=input_paths(args), overwrite=args.overwrite))
        # Shard what is left, so a resumed run stays balanced; every rank lists it before any writes.
        left = [job for job in jobs if args.overwrite or not job[1].exists()]
        barrier()
        todo = left[info.rank::info.world_size]
        for _, mask_path in todo:  # a link in the way is refused before the first image is segmented
            owner.check_path(mask_path)
        workers = loader_workers(args.workers, device)
        images = make_loader(Images([path for path, _ in todo], normalizer), None, workers, device)
        tiling = dict(tile=args.tile, overlap=args.overlap, batch_size=args.batch_size, autocast=autocast,
                      channels_last=args.channels_last)
        # The context closes the bar before an error is printed, so the error gets its own line.
        with tqdm(total=len(todo), desc=f"segmenting ({len(jobs) - len(left)} already done)",
                  disable=not info.is_main, dynamic_ncols=True) as bar:
            for (_, mask_path), image in zip(todo, images):
                labels = segment_image(model, image, device, args.source_mpp / model_mpp, **tiling)
                atomic_save_png(labels_to_rgb(labels), mask_path)
                bar.update()
        barrier()
        if info.is_main:
            print(f"masks for {len(jobs)} images in {args.out_dir} ({len(todo)} written "
                  f"{'by this process' if info.distributed else 'now'})")


if __name__ == "__main__":
    main()
