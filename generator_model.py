"""Pix2pix U-Net generator (Isola et al. 2017) for one-hot nucleus masks.

`num_downs` stride-2 downsamplings take a 2**num_downs px tile to a 1 x 1
bottleneck, as the reference implementation's unet_256 (8) and unet_128 (7): the
depth follows the training tile (`depth_for_tile`), and inputs must be multiples of
2**num_downs (test.py pads or tiles larger images). Each decoder block gets the
matching encoder output as a skip connection; the first three decoder blocks use
dropout, which is pix2pix's only source of noise.
"""
import math

import torch
from torch import nn

NUM_DOWNSAMPLINGS = 8
SIZE_MULTIPLE = 2 ** NUM_DOWNSAMPLINGS
MIN_DOWNSAMPLINGS = 5


def depth_for_tile(tile):
    """Downsamplings for a square training tile: down to 1 x 1 (7 for 128 px, 8 for
    256), at most 8 (larger tiles keep unet_256's depth and a larger bottleneck)."""
    depth = min(NUM_DOWNSAMPLINGS, int(math.log2(tile))) if tile > 0 else 0
    if depth < MIN_DOWNSAMPLINGS or tile % 2 ** depth:
        raise ValueError(f"tiles of {tile} px do not fit the U-Net: use a multiple of 256, or a power of two "
                         f"of at least {2 ** MIN_DOWNSAMPLINGS}")
    return depth


def make_norm(norm, channels):
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "instance":
        # As in pix2pix: no affine parameters and no running statistics.
        return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
    raise ValueError(f"unknown norm {norm!r}; expected 'batch' or 'instance'")


class DownBlock(nn.Module):
    def __init__(self, cin, cout, norm, use_norm=True):
        super().__init__()
        layers = [nn.Conv2d(cin, cout, 4, 2, 1, bias=not use_norm or norm == "instance", padding_mode="reflect")]
        if use_norm:
            layers.append(make_norm(norm, cout))
        layers.append(nn.LeakyReLU(0.2))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        return self.block(x)


class UpBlock(nn.Module):
    def __init__(self, cin, cout, norm, dropout):
        super().__init__()
        layers = [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=norm == "instance"), make_norm(norm, cout), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(0.5))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        return self.block(x)


class Generator(nn.Module):
    def __init__(self, in_channels=6, out_channels=3, ngf=64, norm="batch", dropout=True,
                 num_downs=NUM_DOWNSAMPLINGS):
        super().__init__()
        self.size_multiple = 2 ** num_downs
        widths = [ngf * min(2 ** i, 8) for i in range(num_downs - 1)]  # [1, 2, 4, 8, 8, ...] * ngf
        # Encoder: num_downs - 1 blocks (256 -> 2 at depth 8), the first without norm, then the bottleneck (2 -> 1).
        self.downs = nn.ModuleList([DownBlock(in_channels, widths[0], norm, use_norm=False)])
        for cin, cout in zip(widths[:-1], widths[1:]):
            self.downs.append(DownBlock(cin, cout, norm))
        self.bottleneck = nn.Sequential(nn.Conv2d(widths[-1], ngf * 8, 4, 2, 1, padding_mode="reflect"), nn.ReLU())
        # Decoder: num_downs - 1 blocks (1 -> 128 at depth 8); from the second on, input is concatenated with the skip.
        rev = widths[::-1]  # [..., 8, 8, 4, 2, 1] * ngf
        self.ups = nn.ModuleList([UpBlock(ngf * 8, rev[0], norm, dropout)])
        for i in range(1, len(rev)):
            self.ups.append(UpBlock(rev[i - 1] * 2, rev[i], norm, dropout and i < 3))
        self.final = nn.Sequential(nn.ConvTranspose2d(widths[0] * 2, out_channels, 4, 2, 1), nn.Tanh())

    def forward(self, x):
        skips = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
        x = self.ups[0](self.bottleneck(x))
        for up, skip in zip(self.ups[1:], reversed(skips[1:])):
            x = up(torch.cat([x, skip], dim=1))
        return self.final(torch.cat([x, skips[0]], dim=1))


def init_weights(module, std=0.02):
    """pix2pix init: conv weights ~ N(0, std), norm scales ~ N(1, std), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)
    return module
