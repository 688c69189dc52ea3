"""Figures written during training and generation: sample grids and loss curves."""
import numpy as np

from dataset.masks import PANNUKE, labels_to_rgb
from utils import atomic_save_figure


def to_uint8_image(tensor):
    """(3, H, W) tensor in [-1, 1] -> (H, W, 3) uint8."""
    return ((tensor.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def triplet_grid(labels, real, fake, labels_set=PANNUKE, gap=4):
    """Rows of mask (in the label set's palette) | real | fake, as one uint8 image; with
    `real` None (masks painted without images), rows of mask | fake."""
    rows = []
    for k, (lab, f) in enumerate(zip(labels, fake)):
        tiles = [labels_to_rgb(lab.cpu().numpy(), labels_set), *([] if real is None else [to_uint8_image(real[k])]),
                 to_uint8_image(f)]
        spacer = np.full((tiles[0].shape[0], gap, 3), 255, np.uint8)
        rows.append(np.concatenate([x for tile in tiles for x in (tile, spacer)][:-1], axis=1))
    spacer = np.full((gap, rows[0].shape[1], 3), 255, np.uint8)
    return np.concatenate([x for row in rows for x in (row, spacer)][:-1], axis=0)


def save_loss_plot(history, path, title="Training losses"):
    """Per-epoch mean losses, one line per loss, written atomically as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    epochs = [h["epoch"] for h in history]
    keys = [k for k in history[0] if k != "epoch"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ax.plot(epochs, [h.get(key, float("nan")) for h in history], marker="o", ms=3)
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_save_figure(fig, path)
