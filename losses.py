"""The GAN losses of every generator / discriminator combination, in one place.

The discriminator chooses the family (`LOSSES[D.kind]`); the generator does not
change the losses. Each family gives D's loss and G's adversarial loss, which
train_utils.gan_train_step puts into the first two of its three loss slots:

| --discriminator | loss_d (D's step) | loss_g_adv (G's step) |
| --- | --- | --- |
| patch (pix2pix) | (BCE(D(real), smoothed 1) + BCE(D(fake), smoothed 0)) / 2 | BCE(D(fake), 1) |
| multiscale, hinge (SPADE) | relu(1 - D(real)) + relu(1 + D(fake)), mean per scale | -D(fake) + feature matching |
| multiscale, bce (pix2pixHD) | as patch, per scale | as patch + feature matching |
| oasis (OASIS) | balanced CE: real pixels -> mask class, fake ones -> "fake"; + LabelMix | balanced CE: fake -> mask class |

Smoothed targets are drawn from --real-label-range / --fake-label-range (1 and 0
with --no-smooth-real / --no-smooth-fake). Multiscale losses are averaged over the
scales; --gan-loss picks hinge or bce.

- Feature matching (in loss_g_adv): L1 between D's intermediate features on the
  fake and on the real image (real ones without gradient), summed over the layers
  and averaged over the scales, as pix2pixHD weighs it.
- LabelMix (in loss_d): each class of each mask picks real or fake at random; D's
  output on the image mixed that way should equal the same mix of its outputs on
  the real and on the fake image (mean squared error).
- Class balance: a class's pixels weigh total pixels / (classes present x its
  pixels), so every class present in the batch counts alike and the mean weight is 1.
- The third slot, loss_l1 = --l1-lambda x L1(fake, real), is added to G's loss for
  every combination. OASIS trains without it (--l1-lambda 0 there), but the value
  given is used as given. `lowpass_l1` compares the images average-pooled by a
  factor instead: L1 then anchors colour and layout and leaves the texture to D.
- `r1_penalty` (Mescheder et al. 2018) is the squared gradient of D's logits on
  real images, for D's loss.
"""
import torch
from torch.nn import functional as F


def discriminator_targets(logits, label_range, smooth, hard_value):
    if not smooth:
        return torch.full_like(logits, hard_value, dtype=torch.float32)
    lo, hi = label_range
    return torch.rand(logits.shape, device=logits.device).mul_(hi - lo).add_(lo)


# --------------------------------------------------------------------------- patch (pix2pix)

def bce_d_terms(d_real, d_fake, cfg):
    bce = F.binary_cross_entropy_with_logits
    return 0.5 * (bce(d_real.float(), discriminator_targets(d_real, cfg.real_label_range, cfg.smooth_real, 1.0))
                  + bce(d_fake.float(), discriminator_targets(d_fake, cfg.fake_label_range, cfg.smooth_fake, 0.0)))


def bce_g_term(d_fake):
    return F.binary_cross_entropy_with_logits(d_fake.float(), torch.ones_like(d_fake, dtype=torch.float32))


def patch_d_loss(d, mask, real, fake, cfg):
    return bce_d_terms(d(mask, real), d(mask, fake), cfg)


def patch_g_loss(d, mask, real, fake, cfg):
    return bce_g_term(d(mask, fake))


# --------------------------------------------------------------------------- multiscale (pix2pixHD)

def multiscale_d_loss(d, mask, real, fake, cfg):
    per_scale = []
    for real_feats, fake_feats in zip(d(mask, real), d(mask, fake)):
        d_real, d_fake = real_feats[-1], fake_feats[-1]
        if cfg.gan_loss == "hinge":
            per_scale.append(F.relu(1 - d_real.float()).mean() + F.relu(1 + d_fake.float()).mean())
        else:
            per_scale.append(bce_d_terms(d_real, d_fake, cfg))
    return torch.stack(per_scale).mean()


def feature_matching(fake_scales, real_scales):
    """Sum over each scale's intermediate layers (not the logits) of the L1 distance, averaged over scales."""
    per_scale = [sum(F.l1_loss(f.float(), r.float()) for f, r in zip(fakes[:-1], reals[:-1]))
                 for fakes, reals in zip(fake_scales, real_scales)]
    return torch.stack(per_scale).mean()


def multiscale_g_loss(d, mask, real, fake, cfg):
    fake_scales = d(mask, fake)
    adv = [-s[-1].float().mean() if cfg.gan_loss == "hinge" else bce_g_term(s[-1]) for s in fake_scales]
    loss = torch.stack(adv).mean()
    if cfg.feat_match_lambda:
        with torch.no_grad():
            real_scales = d(mask, real)
        loss = loss + cfg.feat_match_lambda * feature_matching(fake_scales, real_scales)
    return loss


# --------------------------------------------------------------------------- oasis

def balanced_cross_entropy(logits, target):
    """Cross-entropy per pixel, each class weighted by the inverse of its pixel count in `target`."""
    flat = target.flatten()
    # index_add_ rather than bincount: bincount's output size waits for the device.
    counts = torch.zeros(logits.shape[1], device=logits.device).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float))
    weights = flat.numel() / ((counts > 0).sum() * counts.clamp(min=1))
    return (F.cross_entropy(logits.float(), target, reduction="none") * weights[target]).mean()


def labelmix_map(classes, num_classes):
    """(B, 1, H, W) of 0/1: per image, each class is given to the real (1) or the fake (0) image."""
    coins = torch.randint(0, 2, (classes.shape[0], num_classes), device=classes.device)
    return coins.gather(1, classes.flatten(1)).view_as(classes)[:, None].float()


def labelmix_loss(d, classes, num_classes, real, fake, d_real, d_fake):
    pick = labelmix_map(classes, num_classes)
    d_mixed = d(pick * real + (1 - pick) * fake)
    return F.mse_loss(d_mixed.float(), (pick * d_real.float() + (1 - pick) * d_fake.float()))


def mask_classes(mask, num_classes):
    """(B, H, W) class ids of a one-hot mask; its channels past the classes (the instance edges) are left out."""
    return mask[:, :num_classes].argmax(1)


def oasis_d_loss(d, mask, real, fake, cfg):
    d_real, d_fake = d(real), d(fake)
    num_classes = d_real.shape[1] - 1  # OASIS's D predicts a class per pixel, or "fake"
    classes = mask_classes(mask, num_classes)
    loss = balanced_cross_entropy(d_real, classes) + balanced_cross_entropy(d_fake, torch.full_like(classes, num_classes))
    if cfg.labelmix_lambda:
        loss = loss + cfg.labelmix_lambda * labelmix_loss(d, classes, num_classes, real, fake, d_real, d_fake)
    return loss


def oasis_g_loss(d, mask, real, fake, cfg):
    d_fake = d(fake)
    return balanced_cross_entropy(d_fake, mask_classes(mask, d_fake.shape[1] - 1))


# --------------------------------------------------------------------------- regularisers

def r1_penalty(d_out_real, real_image):
    """Mean over the batch of |grad of D's logits wrt the real image|^2 (R1).

    `d_out_real` is D's output on `real_image`, which must have been made to require
    gradients before D saw it (after augmentation too: the gradient then flows back
    through it to the image, as stylegan2-ada does). A patch D's logits are summed
    per image; a multiscale D's output (per scale, features with the logits last)
    has its logits summed over the scales. The graph is kept, so the penalty trains D.

    The caller scales it: D's loss + gamma / 2 x r1_penalty. Lazily, as stylegan2
    does, every `interval` steps only, with gamma / 2 x interval so that its weight
    per step stays the same (stylegan2 also scales Adam's learning rate and betas by
    interval / (interval + 1) for the extra steps of D).
    """
    if isinstance(d_out_real, (list, tuple)):
        logits = torch.stack([scale[-1].float().sum() for scale in d_out_real]).sum()
    else:
        logits = d_out_real.float().sum()
    grad, = torch.autograd.grad(logits, real_image, create_graph=True, allow_unused=True)
    if grad is None:  # D does not read the image at all
        return real_image.new_zeros((), dtype=torch.float32)
    return grad.float().square().flatten(1).sum(1).mean()


def lowpass_l1(fake, real, factor):
    """L1 between the images average-pooled by `factor` (1: plain L1)."""
    if factor < 1 or factor != int(factor):
        raise ValueError(f"the low-pass factor must be a whole number >= 1, got {factor}")
    if factor > 1:
        fake, real = F.avg_pool2d(fake, factor), F.avg_pool2d(real, factor)
    return F.l1_loss(fake.float(), real.float())


# (D's loss, G's adversarial loss), each called as f(d, mask, real, fake, step config).
LOSSES = {"patch": (patch_d_loss, patch_g_loss), "multiscale": (multiscale_d_loss, multiscale_g_loss),
          "oasis": (oasis_d_loss, oasis_g_loss)}
