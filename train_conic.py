"""Train mask-to-H&E Pix2pix on CoNIC / Lizard (colon H&E at 20x, 6 nucleus types).

    python train_conic.py --data-dir data/conic --out-dir runs/conic
    python train_conic.py --data-dir ../shared/data/lizard_128 --label-set pannuke   # UniToPatho-ready
    torchrun --nproc_per_node=8 train_conic_ddp.py --data-dir ...   # multi-GPU
Patches are split into train and test by source image (no image on both sides),
seeded by --seed, or taken from --split-file; the split used is written to
OUT/split.csv. The U-Net's depth follows the patch size (7 downsamplings for 128 px
tiles, 8 for 256), so 20x tiles train at their own scale.
"""
from config import add_conic_training_data_args
from dataset.conic import gan_datasets
from train_utils import train_main
from utils import run_main


@run_main
def main(argv=None, require_distributed=False):
    train_main("CoNIC", add_conic_training_data_args, "runs/conic", gan_datasets, argv, require_distributed)


if __name__ == "__main__":
    main()
