"""Generate an image of any size from its class map with a U-Net that needs sides
divisible by its size multiple (2**depth: 256 for eight stride-2 downsamplings, 128
for seven).

whole: reflect-pad the map to a multiple of that size, one forward pass, crop back
    (the original project's way; memory grows with the image).
tiled: overlapping tiles of that size, batched, blended with a window that ramps as
    sin^2 over the overlap, so neighbouring weights sum to one and seams vanish;
    memory per pass is bounded by the batch of tiles.

Class maps may carry instance edges (dataset.masks.EDGE_BIT), which `edges` adds as a channel.
`forward(mask, seeds)` maps a one-hot (N, C, H, W) batch to (N, 3, H, W) in
[-1, 1]; `seeds` (one per input) lets train-mode normalisation be reproducible.
"""
import math

import numpy as np
import torch

from dataset.masks import NUM_CLASSES, labels_to_onehot
from generator_model import SIZE_MULTIPLE
from utils import UserError


def reflect_pad(labels, height, width):
    """Pad an (H, W) map to (height, width), split evenly between the sides."""
    top, left = (height - labels.shape[0]) // 2, (width - labels.shape[1]) // 2
    pad = ((top, height - labels.shape[0] - top), (left, width - labels.shape[1] - left))
    return np.pad(labels, pad, mode="reflect"), top, left


def to_mask(labels, device, channels_last, num_classes, edges=False):
    mask = labels_to_onehot(torch.from_numpy(np.ascontiguousarray(labels)).to(device), num_classes, edges=edges)
    return mask.contiguous(memory_format=torch.channels_last) if channels_last else mask


def generate_whole(forward, labels, device, seed=0, channels_last=True, multiple=SIZE_MULTIPLE,
                   num_classes=NUM_CLASSES, edges=False):
    """(H, W) class map -> (3, H, W) float image in [-1, 1] (on the CPU), in one pass
    over the map reflect-padded to a `multiple` of the generator's input size."""
    h, w = labels.shape
    padded, top, left = reflect_pad(labels, math.ceil(h / multiple) * multiple, math.ceil(w / multiple) * multiple)
    fake = forward(to_mask(padded[None], device, channels_last, num_classes, edges), [seed])[0]
    return fake[:, top:top + h, left:left + w].float().cpu()


def tile_starts(length, tile, stride):
    """Tile origins along one side: every `stride`, plus one flush with the far edge."""
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def blend_window(tile, overlap):
    """(tile, tile) weights: 1 in the middle, sin^2 ramps over `overlap` px at each edge
    (never 0, so pixels that only one tile covers keep that tile's value)."""
    ramp = torch.ones(tile)
    if overlap:
        rise = torch.sin(math.pi / 2 * (torch.arange(overlap) + 0.5) / overlap) ** 2
        ramp[:overlap] = rise
        ramp[-overlap:] = torch.minimum(ramp[-overlap:], rise.flip(0))
    return ramp[:, None] * ramp[None, :]


def blend_tiles(run, height, width, tile, overlap, batch_size, device):
    """Cover a (height, width) canvas with `tile`-px tiles sharing `overlap` px and blend
    their outputs with `blend_window`. `run(origins, first)` returns the (N, C, tile,
    tile) outputs for a batch of tile origins; `first` is the index of the batch's
    first tile. Returns (C, height, width) on `device`."""
    origins = [(y, x) for y in tile_starts(height, tile, tile - overlap)
               for x in tile_starts(width, tile, tile - overlap)]
    window = blend_window(tile, overlap).to(device)
    total = None
    weight = torch.zeros(height, width, device=device)
    for first in range(0, len(origins), batch_size):
        batch = origins[first:first + batch_size]
        for (y, x), out in zip(batch, run(batch, first)):
            if total is None:  # C is whatever the model gives
                total = torch.zeros(out.shape[0], height, width, device=device)
            total[:, y:y + tile, x:x + tile] += out.float() * window
            weight[y:y + tile, x:x + tile] += window
    return total / weight


def generate_tiled(forward, labels, device, overlap=64, batch_size=8, seed=0, channels_last=True,
                   tile=SIZE_MULTIPLE, num_classes=NUM_CLASSES, edges=False):
    """(H, W) class map -> (3, H, W) float image in [-1, 1] (on the CPU), from
    overlapping tiles blended by `blend_window`."""
    if not 0 <= overlap < tile:
        raise UserError(f"--tile-overlap must be in [0, {tile}), got {overlap}")
    h, w = labels.shape
    # Maps smaller than a tile are reflect-padded up to one.
    padded, top, left = reflect_pad(labels, max(h, tile), max(w, tile))

    def run(batch, first):
        crops = np.stack([padded[y:y + tile, x:x + tile] for y, x in batch])
        # Tile seeds differ from each other and from other images' (seed * 10^6 + tile).
        seeds = [seed * 1_000_000 + first + i for i in range(len(batch))]
        return forward(to_mask(crops, device, channels_last, num_classes, edges), seeds)

    fake = blend_tiles(run, *padded.shape, tile, overlap, batch_size, device)
    return fake[:, top:top + h, left:left + w].cpu()
