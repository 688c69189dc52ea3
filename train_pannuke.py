"""Train mask-to-H&E Pix2pix on PanNuke.

    python train_pannuke.py --data-dir data/pannuke --tissue Colon --out-dir runs/pannuke
    python train_pannuke.py --demo          # no download: small real-H&E demo on CPU
    torchrun --nproc_per_node=8 train_pannuke_ddp.py --data-dir ...   # multi-GPU
"""
import os

from config import add_pannuke_training_data_args
from dataset.pannuke import build_pannuke, check_fold_overlap, fold_paths
from demo import write_demo_folds
from train_utils import train_main
from utils import run_main


def build_datasets(args):
    if args.demo:
        prepare_demo(args.data_dir)
    check_fold_overlap(args.data_dir, args.train_folds, args.test_folds, args.allow_overlap)
    train_set = build_pannuke(args.data_dir, args.train_folds, args.tissue, augment=True, split="train",
                              check_data=args.check_data, edges=args.instance_edges)
    sample_set = build_pannuke(args.data_dir, args.test_folds, args.tissue, augment=False, split="test",
                               edges=args.instance_edges)
    return train_set, sample_set


def prepare_demo(data_dir):
    """Write the demo folds once (rank 0 under torchrun; others wait for the files)."""
    last = fold_paths(data_dir, 3)["types"]
    if int(os.environ.get("RANK", 0)) == 0 and not last.exists():
        write_demo_folds(data_dir)
        print(f"demo: wrote a small PanNuke-format dataset of real H&E (demo_assets/) to {data_dir}")
    else:
        import time
        for _ in range(600):
            if last.exists():
                break
            time.sleep(0.1)


@run_main
def main(argv=None, require_distributed=False):
    train_main("PanNuke", add_pannuke_training_data_args, "runs/pannuke", build_datasets, argv, require_distributed)


if __name__ == "__main__":
    main()
