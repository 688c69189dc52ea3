"""Multi-GPU / multi-node training on a folder dataset: the train_folder.py loop under torchrun.

    torchrun --nproc_per_node=8 train_folder_ddp.py --data-dir my_tiles
Every option of train_folder.py applies; --batch-size is per process.
"""
import train_folder

if __name__ == "__main__":
    train_folder.main(require_distributed=True)
