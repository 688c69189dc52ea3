"""Train mask-to-H&E Pix2pix on CoNIC / Lizard (colon H&E at 20x, 6 nucleus types).

    python train_conic.py --data-dir data/conic --out-dir runs/conic
    python train_conic.py --data-dir ../shared/data/lizard_128 --label-set pannuke   # UniToPatho-ready
    torchrun --nproc_per_node=8 train_conic_ddp.py --data-dir ...   # multi-GPU
Patches are split into train and test by source image (no image on both sides),
seeded by --seed, or taken from --split-file; the split used is written to
OUT/split.csv. The U-Net's depth follows the patch size (7 downsamplings for 128 px
tiles, 8 for 256), so 20x tiles train at their own scale.
"""
import os
from pathlib import Path

import numpy as np

from config import add_conic_training_data_args
from dataset.conic import CoNIC, build_conic, write_split_file
from train_utils import train_main
from utils import run_main


def build_datasets(cfg):
    split = dict(seed=cfg.seed, test_fraction=cfg.test_fraction, split_file=cfg.split_file, label_set=cfg.label_set)
    train_set = build_conic(cfg.data_dir, "train", augment=True, check_data=cfg.check_data, **split)
    test_set = build_conic(cfg.data_dir, "test", **split)
    if int(os.environ.get("RANK", 0)) == 0:
        write_split_file(Path(cfg.out_dir) / "split.csv", train_set.all_names, train_set.indices, test_set.indices)
    # The sample grids show the test tiles with the most nucleus pixels: many tiles are nearly empty.
    nuclei = [int((test_set.classes(i) > 0).sum()) for i in range(len(test_set))]
    shown = test_set.indices[np.argsort(nuclei, kind="stable")[::-1]]
    return train_set, CoNIC(cfg.data_dir, shown, label_set=cfg.label_set)


@run_main
def main(argv=None, require_distributed=False):
    train_main("CoNIC", add_conic_training_data_args, "runs/conic", build_datasets, argv, require_distributed)


if __name__ == "__main__":
    main()
