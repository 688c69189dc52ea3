"""An exponential moving average (EMA) of the generator's weights, to paint with.

StyleGAN and BigGAN paint from a running average of G's weights: it smooths out the
step-to-step wander of adversarial training. The average's half-life is counted in
training images, as stylegan2's `ema_kimg`: after each batch of n images,

    beta = 0.5 ** (n / half_life_images),   ema = beta * ema + (1 - beta) * weights.

With a ramp-up r (stylegan2's `ema_rampup`), the half-life is at most r x the images
seen before the batch, so a short run's average does not stay anchored to the
random initial weights (the first update copies the weights).

BatchNorm: the averaged weights need running statistics of their own. The raw G's
statistics belong to the raw weights, and copying them into the average (what
stylegan2 does with its buffers; its G has no BatchNorm) makes the average paint
noise. So `update` leaves the buffers alone, and `recompute_batchnorm_stats`
re-estimates them from training masks: call it on `GeneratorEMA.model` before it
paints or is saved.
"""
import copy

import torch
from torch import nn


def ema_beta(batch_images, half_life_images, images_seen=None, rampup=None):
    """Weight kept by the average when a batch of `batch_images` is averaged in;
    with `rampup`, the half-life is capped at rampup x `images_seen`."""
    half_life = half_life_images
    if rampup is not None and images_seen is not None:
        half_life = min(half_life, rampup * images_seen)
    return 0.5 ** (batch_images / max(half_life, 1e-8))


class GeneratorEMA:
    """A frozen copy of `generator` (the plain module, not its DDP/compiled wrapper)
    whose parameters follow the generator's as an EMA. `model` paints; its
    BatchNorm statistics are set by recompute_batchnorm_stats, not by `update`."""

    def __init__(self, generator, half_life_images, rampup=None):
        self.model = copy.deepcopy(generator).eval().requires_grad_(False)
        self.half_life_images = half_life_images
        self.rampup = rampup
        self.images_seen = 0

    @torch.no_grad()
    def update(self, generator, batch_images):
        """Average in `generator`'s current parameters after a step on `batch_images` images; returns beta."""
        beta = ema_beta(batch_images, self.half_life_images, self.images_seen, self.rampup)
        for averaged, current in zip(self.model.parameters(), generator.parameters(), strict=True):
            averaged.lerp_(current.detach().to(averaged.dtype), 1.0 - beta)
        self.images_seen += batch_images
        return beta

    def state_dict(self):
        return {"model": self.model.state_dict(), "images_seen": self.images_seen}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.images_seen = int(state["images_seen"])


def batchnorm_layers(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recompute_batchnorm_stats(model, batches):
    """Reset `model`'s BatchNorm running statistics and re-estimate them from
    `batches` (inputs to model(batch), e.g. training masks), with dropout off.

    Each statistic becomes the plain average over the batches of that batch's
    statistic (BatchNorm's momentum=None): the running mean is the mean of the
    batch means, the running variance the mean of the batches' (unbiased)
    variances. Momentum and every module's train/eval mode are restored after, and
    noise the model draws (noise inputs, SPADE's vector) comes from a forked RNG, so
    recalibrating at a save does not change the training run's random stream.
    Returns the number of batches used (0 leaves the statistics reset)."""
    norms = batchnorm_layers(model)
    if not norms:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = {bn: bn.momentum for bn in norms}
    model.eval()  # dropout off
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    count = 0
    cuda_devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            for batch in batches:
                model(batch)
                count += 1
    finally:
        for bn, momentum in momenta.items():
            bn.momentum = momentum
        for m, training in modes.items():
            m.training = training
    return count
