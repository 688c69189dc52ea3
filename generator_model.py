"""Pix2pix U-Net generator (Isola et al. 2017) for one-hot nucleus masks.

`num_downs` stride-2 downsamplings take a 2**num_downs px tile to a 1 x 1
bottleneck, as the reference implementation's unet_256 (8) and unet_128 (7): the
depth follows the training tile (`depth_for_tile`), and inputs must be multiples of
2**num_downs (test.py pads or tiles larger images). Each decoder block gets the
matching encoder output as a skip connection; the first three decoder blocks use
dropout, which is pix2pix's only source of noise unless `noise_inject` adds
StyleGAN's per-pixel noise inputs (Karras et al. 2019) after each decoder block's
upsampling convolution: one Gaussian value per pixel, times a learned per-channel
scale that starts at 0, for stochastic texture. The decoder upsamples by 4x4
stride-2 transposed convolutions (pix2pix's), or with `upsample="resize"` by
nearest-neighbour x2 then a 3x3 convolution (Odena et al. 2016, "Deconvolution and
checkerboard artifacts"): every output pixel then gets the same number of kernel
taps, which removes the regular grid of dots transposed convolutions leave.

`SPADEGenerator` (Park et al. 2019, with OASIS's optional noise, Schonfeld et al.
2021) is the alternative: residual blocks upsampled from a small grid, each
normalised without parameters and then scaled and shifted per pixel by what small
convolutions read from the mask (resized to that block). The start grid is the
input's size / 2**SPADE_UPSAMPLINGS, so any multiple of 32 px works, tiles included.
"""
import math

import torch
from torch import nn
from torch.nn import functional as F

NUM_DOWNSAMPLINGS = 8
SIZE_MULTIPLE = 2 ** NUM_DOWNSAMPLINGS
MIN_DOWNSAMPLINGS = 5
SPADE_UPSAMPLINGS = 5


def depth_for_tile(tile):
    """Downsamplings for a square training tile: down to 1 x 1 (7 for 128 px, 8 for
    256), at most 8 (larger tiles keep unet_256's depth and a larger bottleneck)."""
    depth = min(NUM_DOWNSAMPLINGS, int(math.log2(tile))) if tile > 0 else 0
    if depth < MIN_DOWNSAMPLINGS or tile % 2 ** depth:
        raise ValueError(f"tiles of {tile} px do not fit the U-Net: use a multiple of 256, or a power of two "
                         f"of at least {2 ** MIN_DOWNSAMPLINGS}")
    return depth


def make_norm(norm, channels, affine=True):
    if norm == "batch":
        return nn.BatchNorm2d(channels, affine=affine)
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


def upsampling_conv(cin, cout, upsample, bias=True):
    """A x2 upsampling convolution: transposed (4x4, stride 2) or resize (nearest x2, then 3x3)."""
    if upsample == "transpose":
        return nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=bias)
    if upsample == "resize":
        return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                             nn.Conv2d(cin, cout, 3, 1, 1, bias=bias, padding_mode="reflect"))
    raise ValueError(f"unknown upsample {upsample!r}; expected 'transpose' or 'resize'")


def pixel_noise(like, generators=None):
    """(B, 1, H, W) standard normal noise for `like`: from the global RNG, or image i's
    from generators[i], drawn on the CPU so a seed gives the same noise on any device."""
    b, _, h, w = like.shape
    if generators is None:
        return torch.randn(b, 1, h, w, device=like.device, dtype=like.dtype)
    return torch.stack([torch.randn(1, h, w, generator=g) for g in generators]).to(like.device, like.dtype)


class NoiseInjection(nn.Module):
    """x + scale x noise: one noise value per pixel, shared by the channels, each
    channel with a learned scale that starts at 0 (the block starts as without noise)."""

    def __init__(self, channels):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x, generators=None):
        return x + self.scale.to(x.dtype) * pixel_noise(x, generators)


class UpBlock(nn.Module):
    def __init__(self, cin, cout, norm, dropout, upsample, noise_inject=False):
        super().__init__()
        layers = [upsampling_conv(cin, cout, upsample, bias=norm == "instance"), make_norm(norm, cout), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(0.5))
        self.block = nn.Sequential(*layers)
        # Outside `block`, so the keys of checkpoints without noise stay as they were.
        self.noise = NoiseInjection(cout) if noise_inject else None

    def forward(self, x, generators=None):
        if self.noise is None:
            return self.block(x)
        x = self.noise(self.block[0](x), generators)
        return self.block[1:](x)


class Generator(nn.Module):
    noise_dim = 0  # no noise vector: dropout, and the noise inputs when on

    def __init__(self, in_channels=6, out_channels=3, ngf=64, norm="batch", dropout=True,
                 num_downs=NUM_DOWNSAMPLINGS, upsample="transpose", noise_inject=False):
        super().__init__()
        self.size_multiple = 2 ** num_downs
        self.noise_inject = noise_inject
        widths = [ngf * min(2 ** i, 8) for i in range(num_downs - 1)]  # [1, 2, 4, 8, 8, ...] * ngf
        # Encoder: num_downs - 1 blocks (256 -> 2 at depth 8), the first without norm, then the bottleneck (2 -> 1).
        self.downs = nn.ModuleList([DownBlock(in_channels, widths[0], norm, use_norm=False)])
        for cin, cout in zip(widths[:-1], widths[1:]):
            self.downs.append(DownBlock(cin, cout, norm))
        self.bottleneck = nn.Sequential(nn.Conv2d(widths[-1], ngf * 8, 4, 2, 1, padding_mode="reflect"), nn.ReLU())
        # Decoder: num_downs - 1 blocks (1 -> 128 at depth 8); from the second on, input is concatenated with the skip.
        rev = widths[::-1]  # [..., 8, 8, 4, 2, 1] * ngf
        self.ups = nn.ModuleList([UpBlock(ngf * 8, rev[0], norm, dropout, upsample, noise_inject)])
        for i in range(1, len(rev)):
            self.ups.append(UpBlock(rev[i - 1] * 2, rev[i], norm, dropout and i < 3, upsample, noise_inject))
        self.final = nn.Sequential(upsampling_conv(widths[0] * 2, out_channels, upsample), nn.Tanh())

    def forward(self, x, seeds=None):
        """`seeds` (one int per image) seed the noise inputs, block after block; without
        them (training) the noise comes from the global RNG. Ignored without noise inputs."""
        generators = None
        if self.noise_inject and seeds is not None:
            generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        skips = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
        x = self.ups[0](self.bottleneck(x), generators)
        for up, skip in zip(self.ups[1:], reversed(skips[1:])):
            x = up(torch.cat([x, skip], dim=1), generators)
        return self.final(torch.cat([x, skips[0]], dim=1))


def init_weights(module, std=0.02):
    """pix2pix init: conv weights ~ N(0, std), norm scales ~ N(1, std), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)
    return module


# --------------------------------------------------------------------------- SPADE


def seeded_noise(seeds, dim, device):
    """One noise vector per seed, drawn on the CPU so a seed gives the same vector on any device."""
    return torch.stack([torch.randn(dim, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)


class SPADE(nn.Module):
    """Parameter-free normalisation, then a per-pixel scale and bias predicted from the condition."""

    def __init__(self, channels, cond_channels, hidden, norm):
        super().__init__()
        self.norm = make_norm(norm, channels, affine=False)
        self.shared = nn.Sequential(nn.Conv2d(cond_channels, hidden, 3, padding=1), nn.ReLU())
        self.gamma = nn.Conv2d(hidden, channels, 3, padding=1)
        self.beta = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x, cond):
        h = self.shared(cond)
        # 1 + gamma: a zero-initialised prediction leaves the normalised input unscaled.
        return self.norm(x) * (1 + self.gamma(h)) + self.beta(h)


class SPADEResBlock(nn.Module):
    """SPADE-LeakyReLU-conv twice, plus a shortcut (SPADE then a 1x1 conv where the width
    changes). Its SPADE layers read the condition through `min(cout, hidden)` channels."""

    def __init__(self, cin, cout, cond_channels, hidden, norm):
        super().__init__()
        mid, hidden = min(cin, cout), min(cout, hidden)
        self.norm_0, self.conv_0 = SPADE(cin, cond_channels, hidden, norm), nn.Conv2d(cin, mid, 3, padding=1)
        self.norm_1, self.conv_1 = SPADE(mid, cond_channels, hidden, norm), nn.Conv2d(mid, cout, 3, padding=1)
        self.learned_shortcut = cin != cout
        if self.learned_shortcut:
            self.norm_s, self.conv_s = SPADE(cin, cond_channels, hidden, norm), nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x, cond):
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, cond), 0.2))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, cond), 0.2))
        skip = self.conv_s(self.norm_s(x, cond)) if self.learned_shortcut else x
        return skip + dx


class SPADEGenerator(nn.Module):
    """SPADE residual generator: a 3x3 conv reads the condition (one-hot mask, plus the
    noise broadcast over the image when noise_dim > 0) at the start grid, then
    `num_ups + 1` SPADE blocks with a nearest-neighbour x2 upsampling before each but
    the first. Widths halve from 8 x ngf block by block ([8, 4, 2, 1, 1/2, 1/4] x ngf
    at 5 upsamplings) and the SPADE layers read the condition through at most ngf
    channels, so the full-size blocks stay cheap (docs/networks.md compares FLOPs)."""

    def __init__(self, in_channels=6, out_channels=3, ngf=64, norm="batch", noise_dim=0, num_ups=SPADE_UPSAMPLINGS):
        super().__init__()
        self.noise_dim = noise_dim
        self.size_multiple = 2 ** num_ups
        cond = in_channels + noise_dim
        widths = [max(1, ngf * 8 // 2 ** i) for i in range(num_ups + 1)]
        self.head = nn.Conv2d(cond, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList([SPADEResBlock(cin, cout, cond, ngf, norm)
                                     for cin, cout in zip(widths[:1] + widths[:-1], widths)])
        self.final = nn.Sequential(nn.LeakyReLU(0.2), nn.Conv2d(widths[-1], out_channels, 3, padding=1), nn.Tanh())

    def condition(self, mask, noise, size):
        """The mask resized to `size` (nearest: classes stay one-hot), with the noise broadcast over it."""
        cond = F.interpolate(mask, size=size, mode="nearest")
        if not self.noise_dim:
            return cond
        return torch.cat([cond, noise[:, :, None, None].to(cond.dtype).expand(-1, -1, *size)], dim=1)

    def forward(self, mask, noise=None):
        """`noise` (B, noise_dim); drawn from the global RNG when not given (training)."""
        if self.noise_dim and noise is None:
            noise = torch.randn(mask.shape[0], self.noise_dim, device=mask.device)
        h, w = mask.shape[-2:]
        scale = self.size_multiple
        x = self.head(self.condition(mask, noise, (h // scale, w // scale)))
        for i, block in enumerate(self.blocks):
            if i:
                x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = block(x, self.condition(mask, noise, tuple(x.shape[-2:])))
        return self.final(x)
