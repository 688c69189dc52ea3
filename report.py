"""What runs write for people to look at: sample grids, loss curves, and the pieces of
the HTML reports (evaluate.py, study.py, compare_studies.py) and printed tables.

A low-level module: it reads no data and imports only numpy, PIL, dataset.masks and utils."""
import base64
import html
import io
from pathlib import Path

import numpy as np
from PIL import Image

from dataset.masks import PANNUKE, labels_to_rgb
from utils import atomic_save_figure


# --------------------------------------------------------------------------- images

def to_uint8_image(tensor):
    """(3, H, W) tensor in [-1, 1] -> (H, W, 3) uint8."""
    return ((tensor.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def grid(rows, gap=4):
    """Rows of equally sized (H, W, 3) uint8 tiles -> one image with white gaps."""
    def join(tiles, axis):
        spacer_shape = list(tiles[0].shape)
        spacer_shape[axis] = gap
        spacer = np.full(spacer_shape, 255, np.uint8)
        return np.concatenate([x for t in tiles for x in (t, spacer)][:-1], axis=axis)
    return join([join(row, 1) for row in rows], 0)


def triplet_grid(labels, real, fake, labels_set=PANNUKE, gap=4):
    """Rows of mask (in the label set's palette) | real | fake, as one uint8 image; with
    `real` None (masks painted without images), rows of mask | fake."""
    return grid([[labels_to_rgb(lab.cpu().numpy(), labels_set), *([] if real is None else [to_uint8_image(real[k])]),
                  to_uint8_image(f)] for k, (lab, f) in enumerate(zip(labels, fake))], gap)


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


# --------------------------------------------------------------------------- text and HTML

def fmt(value, digits=3):
    """A score as text with `digits` decimals; "n/a" for an undefined one (None)."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def data_uri(array=None, path=None):
    """An image for an <img> tag, embedded: a PNG file as it is, or a uint8 array as JPEG."""
    if path is not None:
        return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=92)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def table(header, rows):
    """An HTML table, every cell escaped."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"
