"""Train mask-to-H&E Pix2pix on UniToPatho 800 (1812 x 1812 images) and its nucleus masks.

    python train_utp.py --data-dir data/unitopatho/800 --masks-dir data/unitopatho_masks \
        --out-dir runs/unitopatho --cache-dir /scratch/utp_cache
    torchrun --nproc_per_node=8 train_utp_ddp.py --data-dir ...   # multi-GPU
Each visit of an image trains on --crops-per-image crops of it (or the five of
--crop-scheme fivecrop); sample grids show centre crops of test images, one per class
in turn. --cache-dir stores decoded pairs (about 13 MB each) so later epochs skip
PNG decoding.
"""
from config import add_utp_training_data_args
from dataset.unitopatho import UniToPatho
from dataset.unitopatho_mask import UniToPathoCentre, UniToPathoPairs
from generator_model import SIZE_MULTIPLE
from train_utils import train_main
from utils import run_main


def build_datasets(args):
    train = UniToPatho(args.data_dir, "train", grade_only=args.grade_only)
    train_set = UniToPathoPairs(train, args.masks_dir, args.crop_size, args.crops_per_image, args.crop_scheme,
                                augment=True, cache_dir=args.cache_dir, size_multiple=SIZE_MULTIPLE)
    test = UniToPatho(args.data_dir, "test")
    shown = test.take(test.class_interleaved_order()[:args.num_samples])
    sample_set = UniToPathoCentre(shown, args.masks_dir, args.crop_size, cache_dir=args.cache_dir)
    return train_set, sample_set


@run_main
def main(argv=None, require_distributed=False):
    train_main("UniToPatho", add_utp_training_data_args, "runs/unitopatho", build_datasets, argv, require_distributed)


if __name__ == "__main__":
    main()
