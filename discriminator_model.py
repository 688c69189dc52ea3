"""70 x 70 PatchGAN discriminator (pix2pix) on the mask and an image, concatenated.

C64 (no norm) - C128 - C256 - C512 (stride 1) - 1-channel logits: each output logit
sees a 70 x 70 receptive field, so a 256 x 256 input yields 30 x 30 patch scores.
"""
import torch
from torch import nn

from generator_model import make_norm


class Discriminator(nn.Module):
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
