"""Discriminators, chosen by --discriminator.

patch: the 70 x 70 PatchGAN (pix2pix) on the mask and an image, concatenated.
C64 (no norm) - C128 - C256 - C512 (stride 1) - 1-channel logits: each output logit
sees a 70 x 70 receptive field, so a 256 x 256 input yields 30 x 30 patch scores.

multiscale: PatchGANs at 1-3 scales (pix2pixHD), each on the input average-pooled
by 2 once more than the last; they return their intermediate features too, for
feature matching.

oasis: a U-Net segmentation network on the image alone (OASIS): per pixel, logits
for the mask's N classes plus one "fake" class (index N).
"""
import torch
from torch import nn
from torch.nn import functional as F

from generator_model import make_norm


class Discriminator(nn.Module):
    kind = "patch"

    def __init__(self, mask_channels=6, image_channels=3, ndf=64, norm="batch"):
        super().__init__()
        widths = [ndf, ndf * 2, ndf * 4, ndf * 8]
        layers = [nn.Conv2d(mask_channels + image_channels, widths[0], 4, 2, 1, padding_mode="reflect"),
                  nn.LeakyReLU(0.2)]
        for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
            stride = 1 if i == len(widths) - 2 else 2
            layers += [nn.Conv2d(cin, cout, 4, stride, 1, bias=norm == "instance", padding_mode="reflect"),
                       make_norm(norm, cout), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(widths[-1], 1, 4, 1, 1, padding_mode="reflect"))
        self.model = nn.Sequential(*layers)

    def forward(self, mask, image):
        return self.model(torch.cat([mask, image], dim=1))

    def features(self, mask, image):
        """The activations after each LeakyReLU, then the logits (as forward gives them)."""
        x = torch.cat([mask, image], dim=1)
        out = []
        for layer in self.model:
            x = layer(x)
            if isinstance(layer, nn.LeakyReLU):
                out.append(x)
        return out + [x]


class MultiscaleDiscriminator(nn.Module):
    kind = "multiscale"

    def __init__(self, mask_channels=6, image_channels=3, ndf=64, norm="batch", num_scales=2):
        super().__init__()
        self.scales = nn.ModuleList([Discriminator(mask_channels, image_channels, ndf, norm)
                                     for _ in range(num_scales)])

    def forward(self, mask, image):
        """Per scale (full size first), the PatchGAN's features with its logits last."""
        out = []
        for i, patch_gan in enumerate(self.scales):
            if i:
                mask, image = (F.avg_pool2d(t, 3, stride=2, padding=1, count_include_pad=False) for t in (mask, image))
            out.append(patch_gan.features(mask, image))
        return out


class DResBlock(nn.Module):
    """LeakyReLU-conv3x3 twice plus a (1x1 where the width changes) shortcut; with
    `down`, both paths average-pool by 2, the body between its convs (the second conv
    then costs a quarter). No normalisation, as in OASIS's discriminator."""

    def __init__(self, cin, cout, down=False, first=False):
        super().__init__()
        pool = [nn.AvgPool2d(2)] if down else []
        # The first block reads the image itself: no activation in front of it.
        self.body = nn.Sequential(*([] if first else [nn.LeakyReLU(0.2)]), nn.Conv2d(cin, cout, 3, padding=1), *pool,
                                  nn.LeakyReLU(0.2), nn.Conv2d(cout, cout, 3, padding=1))
        self.shortcut = nn.Sequential(*pool, nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity())

    def forward(self, x):
        return self.body(x) + self.shortcut(x)


class OasisDiscriminator(nn.Module):
    """U-Net segmenter: `levels` residual blocks each halving the size (widths
    [1, 2, 4, 8] x ndf), then as many that upsample by 2, concatenating the encoder
    output of that size; a 1x1 conv gives N + 1 logits per pixel. Inputs must be
    multiples of 2**levels."""
    kind = "oasis"

    def __init__(self, num_classes=6, image_channels=3, ndf=64, levels=4):
        super().__init__()
        self.size_multiple = 2 ** levels
        widths = [ndf * min(2 ** i, 8) for i in range(levels)]
        self.downs = nn.ModuleList([DResBlock(image_channels, widths[0], down=True, first=True)])
        self.downs.extend(DResBlock(cin, cout, down=True) for cin, cout in zip(widths[:-1], widths[1:]))
        # Up block i (from the bottom) takes the upsampled features plus the encoder's of that size.
        ups = [DResBlock(widths[j] + widths[j - 1], widths[j - 1]) for j in range(levels - 1, 0, -1)]
        self.ups = nn.ModuleList(ups + [DResBlock(widths[0], widths[0])])  # the last one at full size, no skip
        self.head = nn.Conv2d(widths[0], num_classes + 1, 1)

    def forward(self, image):
        skips = []
        x = image
        for down in self.downs:
            x = down(x)
            skips.append(x)
        for up, skip in zip(self.ups, [*reversed(skips[:-1]), None]):
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = up(x if skip is None else torch.cat([x, skip], dim=1))
        return self.head(x)
