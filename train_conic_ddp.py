"""Multi-GPU / multi-node CoNIC training: the train_conic.py loop under torchrun.

    torchrun --nproc_per_node=8 train_conic_ddp.py --data-dir data/conic
Every option of train_conic.py applies; --batch-size is per process.
"""
import train_conic

if __name__ == "__main__":
    train_conic.main(require_distributed=True)
