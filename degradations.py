"""Real tiles degraded in known ways: the rungs of a calibration ladder. A realism score
(C2ST, a distance, PRDC) of a generator means little alone; beside the same score of
real tiles that were blurred, JPEG-compressed or stain-shifted, a reader sees where the
generator sits between "real" and "clearly degraded".

Every function takes uint8 (N, H, W, 3) RGB tiles and returns new uint8 tiles of the
same shape, deterministically (the input is left as it is):
    gaussian_blur(tiles, sigma)    loss of fine detail
    jpeg(tiles, quality)           block and ringing artefacts, chroma subsampling
    stain_shift(tiles, shift)      a different stain balance, in haematoxylin-eosin-DAB space
    calibration_ladder(tiles)      all three at the config.py LADDER_* settings, by name
"""
import io

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.color import hed2rgb, rgb2hed

from config import LADDER_BLUR_SIGMA, LADDER_HED_SHIFT, LADDER_JPEG_QUALITY


def _check_tiles(tiles):
    tiles = np.asarray(tiles)
    if tiles.dtype != np.uint8 or tiles.ndim != 4 or tiles.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB tiles (N, H, W, 3), got {tiles.dtype} {tiles.shape}")
    return tiles


def _to_uint8(values):
    return np.clip(np.round(values), 0, 255).astype(np.uint8)


def gaussian_blur(tiles, sigma=LADDER_BLUR_SIGMA):
    """Each channel blurred with a Gaussian of `sigma` pixels (scipy.ndimage, mirrored
    edges, kernel cut at 4 sigma), rounded back to uint8."""
    tiles = _check_tiles(tiles)
    return _to_uint8(ndimage.gaussian_filter(tiles.astype(np.float64), (0, sigma, sigma, 0)))


def jpeg(tiles, quality=LADDER_JPEG_QUALITY):
    """Each tile saved as a JPEG of `quality` (1-95) with PIL and read back."""
    tiles = _check_tiles(tiles)
    out = np.empty_like(tiles)
    for k, tile in enumerate(tiles):
        buffer = io.BytesIO()
        Image.fromarray(tile).save(buffer, format="JPEG", quality=quality)
        out[k] = np.asarray(Image.open(buffer).convert("RGB"))
    return out


def stain_shift(tiles, shift=LADDER_HED_SHIFT):
    """`shift` (haematoxylin, eosin, DAB) added to every pixel's stain amounts from
    skimage's colour deconvolution (rgb2hed, Ruifrok & Johnston 2001), then back to RGB
    (hed2rgb). Positive haematoxylin and negative eosin make a tile bluer and less pink,
    the way a darker haematoxylin bath would."""
    tiles = _check_tiles(tiles)
    stains = rgb2hed(tiles.reshape(-1, 3)) + np.asarray(shift, dtype=np.float64)
    return _to_uint8(hed2rgb(stains) * 255).reshape(tiles.shape)


def calibration_ladder(tiles):
    """{"blur": ..., "jpeg": ..., "stain": ...}: `tiles` degraded by each rung at the
    config.py settings."""
    return {"blur": gaussian_blur(tiles), "jpeg": jpeg(tiles), "stain": stain_shift(tiles)}
