"""Pix2pix U-Net generator (Isola et al. 2017) for 6-channel one-hot nucleus masks.

Eight stride-2 downsamplings take a 256 x 256 input to a 1 x 1 bottleneck, so inputs
must be multiples of 256 (test.py pads or tiles larger images). Each decoder block
gets the matching encoder output as a skip connection; the first three decoder
blocks use dropout, which is pix2pix's only source of noise.
"""
import torch
from torch import nn

NUM_DOWNSAMPLINGS = 8
SIZE_MULTIPLE = 2 ** NUM_DOWNSAMPLINGS


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
    def __init__(self, in_channels=6, out_channels=3, ngf=64, norm="batch", dropout=True):
        super().__init__()
        widths = [ngf, ngf * 2, ngf * 4, ngf * 8, ngf * 8, ngf * 8, ngf * 8]
        # Encoder: 7 blocks (256 -> 2), the first without norm, then the bottleneck (2 -> 1).
        self.downs = nn.ModuleList([DownBlock(in_channels, widths[0], norm, use_norm=False)])
        for cin, cout in zip(widths[:-1], widths[1:]):
            self.downs.append(DownBlock(cin, cout, norm))
        self.bottleneck = nn.Sequential(nn.Conv2d(widths[-1], ngf * 8, 4, 2, 1, padding_mode="reflect"), nn.ReLU())
        # Decoder: 7 blocks (1 -> 128); from the second on, input is concatenated with the skip.
        rev = widths[::-1]  # [8,8,8,8,4,2,1] * ngf
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
