"""Multi-GPU / multi-node PanNuke training: the train_pannuke.py loop under torchrun.

    torchrun --nproc_per_node=8 train_pannuke_ddp.py --data-dir data/pannuke
Every option of train_pannuke.py applies; --batch-size is per process.
"""
import train_pannuke

if __name__ == "__main__":
    train_pannuke.main(require_distributed=True)
