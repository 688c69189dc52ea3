"""Multi-GPU / multi-node UniToPatho training: the train_utp.py loop under torchrun.

    torchrun --nproc_per_node=8 train_utp_ddp.py --data-dir data/unitopatho/800 --masks-dir data/unitopatho_masks
Every option of train_utp.py applies; --batch-size is per process (images, each
giving --crops-per-image crops). Ranks may share one --cache-dir: writes are atomic.
"""
import train_utp

if __name__ == "__main__":
    train_utp.main(require_distributed=True)
