"""Train mask-to-H&E Pix2pix on a folder of your own image and mask files (dataset/folder.py).

    python train_folder.py --data-dir my_tiles --crop-size 256 --out-dir runs/folder
    torchrun --nproc_per_node=8 train_folder_ddp.py --data-dir ...   # multi-GPU
Each visit of a tile trains on one random --crop-size square of it, flipped and
rotated. Tiles are split into train and test by DATA_DIR/split.csv or --split-file,
else by source (the name's prefix) seeded by --seed; the split used is written to
OUT/split.csv. Classes come from DATA_DIR/classes.json, or are inferred from the masks
and written to OUT/classes.json. The sample grids show the centre crops of the test
tiles with the most nucleus pixels.
"""
import os
from pathlib import Path

from config import add_folder_training_data_args
from dataset.conic import most_nuclei_first, write_split_file
from dataset.folder import FolderTiles, open_folder, split_folder, write_classes
from train_utils import train_main
from utils import run_main


def build_datasets(cfg):
    folder = open_folder(cfg.data_dir, check_data=cfg.check_data)
    train_idx, test_idx = split_folder(folder, cfg.split_file, cfg.test_fraction, cfg.seed, cfg.allow_overlap)
    train_set = FolderTiles(folder, train_idx, cfg.crop_size, augment=True)
    test_set = FolderTiles(folder, test_idx, cfg.crop_size)
    if int(os.environ.get("RANK", 0)) == 0:
        out_dir = Path(cfg.out_dir)
        write_split_file(out_dir / "split.csv", folder.names, train_idx, test_idx, column="name")
        if folder.classes_inferred:
            write_classes(out_dir / "classes.json", folder.label_set)
            print(f"note: {cfg.data_dir} has no classes.json; the classes were inferred from its masks and written "
                  f"to {out_dir / 'classes.json'} (name them there and copy it to {cfg.data_dir})")
    ranked = most_nuclei_first((test_set.classes(i) for i in range(len(test_set))), folder.label_set.background)
    shown = test_set.indices[ranked]
    return train_set, FolderTiles(folder, shown, cfg.crop_size)


@run_main
def main(argv=None, require_distributed=False):
    train_main("a folder of images and masks", add_folder_training_data_args, "runs/folder", build_datasets, argv,
               require_distributed)


if __name__ == "__main__":
    main()
