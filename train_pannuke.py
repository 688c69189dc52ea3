"""Train mask-to-H&E Pix2pix on PanNuke.

    python train_pannuke.py --data-dir data/pannuke --tissue Colon --out-dir runs/pannuke
    python train_pannuke.py --demo          # no download: small real-tissue demo on CPU
    torchrun --nproc_per_node=8 train_pannuke_ddp.py --data-dir ...   # multi-GPU
"""
import os
from pathlib import Path

from config import parse_training_args
from dataset.pannuke import build_pannuke, fold_paths, write_demo_folds
from train_utils import run_training
from utils import run_main


def build_datasets(args):
    train_set = build_pannuke(args.data_dir, args.train_folds, args.tissue, augment=True, split="train")
    sample_set = build_pannuke(args.data_dir, args.test_folds, args.tissue, augment=False, split="test")
    return train_set, sample_set


def prepare_demo(args):
    """Write the demo folds once (rank 0 under torchrun; others wait for the files)."""
    args.data_dir = str(Path(args.out_dir) / "demo_data")
    last = fold_paths(args.data_dir, 3)["types"]
    if int(os.environ.get("RANK", 0)) == 0 and not last.exists():
        write_demo_folds(args.data_dir)
        print(f"demo: wrote a small PanNuke-format dataset to {args.data_dir}")
    else:
        import time
        for _ in range(600):
            if last.exists():
                break
            time.sleep(0.1)


@run_main
def main(argv=None, require_distributed=False):
    args = parse_training_args("PanNuke", argv)
    if args.demo:
        prepare_demo(args)
    run_training(args, build_datasets, require_distributed=require_distributed)


if __name__ == "__main__":
    main()
