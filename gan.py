"""The GAN as a unit: its networks built from a model config (--generator unet or
spade, --discriminator patch, multiscale or oasis), its checkpoint kind, batches in
the networks' input format, and generation with an explicit normalisation mode and
seeded noise. The training step and loop are in train_utils.py, the losses in losses.py.
"""
import torch
from torch import nn

from config import GAN_OPTIONS, as_value, fill_legacy, flag_text, gan_values
from dataset.masks import NUM_CLASSES, get_label_set, label_set_spec, labels_to_onehot
from discriminator_model import Discriminator, MultiscaleDiscriminator, OasisDiscriminator
from generator_model import Generator, SPADEGenerator, depth_for_tile, init_weights, seeded_noise
from runtime import load_model_state
from utils import UserError, load_checkpoint_of_kind

CHECKPOINT_KIND = "he-pix2pix"
CHECKPOINT_VERSION = 1
# What generation needs of a checkpoint, and what resuming a run needs besides.
GENERATOR_KEYS = ("model_config", "generator")
RESUME_KEYS = GENERATOR_KEYS + ("config", "discriminator", "opt_g", "opt_d", "scaler_g", "scaler_d", "epoch",
                                "batches_done", "step", "history", "rng", "partial_sums")


def prepare_mask(labels, device, channels_last=True, num_classes=NUM_CLASSES, edges=False):
    """uint8 class maps from the loader -> one-hot masks on device ((B, K, H, W) items of several crops -> B*K),
    with the instance-edge channel when `edges` (the model config's instance_edges)."""
    labels = labels.reshape(-1, *labels.shape[-2:]).to(device, non_blocking=True)
    mask = labels_to_onehot(labels, num_classes, edges=edges)
    return mask.contiguous(memory_format=torch.channels_last) if channels_last else mask


def prepare_batch(labels, image, device, channels_last=True, num_classes=NUM_CLASSES, edges=False):
    """uint8 class map + uint8 image from the loader -> one-hot mask and [-1, 1] image on device.

    Items holding several crops, (B, K, H, W) and (B, K, 3, H, W), become a batch of B*K."""
    image = image.reshape(-1, *image.shape[-3:]).to(device, non_blocking=True)
    real = image.float().div_(127.5).sub_(1.0)
    if channels_last:
        real = real.contiguous(memory_format=torch.channels_last)
    return prepare_mask(labels, device, channels_last, num_classes, edges), real


def model_config(cfg, labels, tile):
    """The networks a run trains: every networks option of config.GAN_OPTIONS that the
    model config records (those with `when` only for their generator or discriminator),
    the label set (`labels`, a LabelSet) from the data, and the depth from the tile
    unless --unet-depth is given. For SPADE the depth sets only the tile test.py pads
    to and generates in (2**depth px), as for the U-Net."""
    try:
        depth = cfg.unet_depth or depth_for_tile(tile)
    except ValueError as exc:
        raise UserError(f"{cfg.data_dir}: {exc}") from None
    if tile % 2 ** depth:  # each level halves the tile
        deepest = (tile & -tile).bit_length() - 1
        raise UserError(f"--unet-depth {depth} needs training tiles that are a multiple of {2 ** depth} px; "
                        f"{cfg.data_dir}'s are {tile} px (at most --unet-depth {deepest})")
    values = {**gan_values(cfg, ("networks",)), "unet_depth": depth}
    return {"label_set": label_set_spec(labels),
            **{o.name: values[o.name] for o in GAN_OPTIONS if o.model and o.applies(values)}}


def check_model_config(model_cfg):
    """Options that contradict each other (checked after a resumed run's own config is compared)."""
    if model_cfg["noise_dim"] and model_cfg["generator"] != "spade":
        raise UserError(f"--noise-dim {model_cfg['noise_dim']} needs --generator spade (the U-Net's only noise is "
                        f"dropout)")


# Optimisation options that change what paints, so a GAN's name shows them.
PAINTING_OPTIONS = ("ema_half_life",)


def describe(options):
    """A short name for the GAN that options (a run's, a study's or a model config, by name) describe:
    its generator and discriminator, then every other networks or losses option recorded there
    that differs from its default, and the PAINTING_OPTIONS that do, as their flags."""
    name = options["generator"] + (f" ({options['upsample']})" if options["generator"] == "unet" else "")
    name += f" + {options['discriminator']}"
    shown = [o for o in GAN_OPTIONS if (o.group != "optimisation" or o.name in PAINTING_OPTIONS) and o.name in options
             and o.applies(options) and o.name not in ("generator", "upsample", "discriminator", "ngf", "ndf")]
    return ", ".join([name] + [flag_text(o.name, options[o.name]) for o in shown
                               if as_value(options[o.name]) != o.default])


def num_classes(model_cfg):
    return get_label_set(model_cfg["label_set"]).num_classes


def uses_instance_edges(model_cfg):
    """Whether the networks read the instance-edge channel (--instance-edges; older checkpoints do not)."""
    return fill_legacy(model_cfg)["instance_edges"]


def mask_channels(model_cfg):
    """Channels of the one-hot mask G (and a conditional D) reads: a class each, and the instance edges."""
    return num_classes(model_cfg) + int(uses_instance_edges(model_cfg))


def build_generator(cfg):
    cfg = fill_legacy(cfg)
    if cfg["generator"] == "spade":
        return init_weights(SPADEGenerator(mask_channels(cfg), 3, ngf=cfg["ngf"], norm=cfg["norm"],
                                           noise_dim=cfg["noise_dim"]))
    return init_weights(Generator(mask_channels(cfg), 3, ngf=cfg["ngf"], norm=cfg["norm"], dropout=cfg["dropout"],
                                  num_downs=cfg["unet_depth"], upsample=cfg["upsample"],
                                  noise_inject=cfg["noise_inject"]))


def build_discriminator(cfg):
    cfg = fill_legacy(cfg)
    if cfg["discriminator"] == "oasis":
        # No norm layers: PyTorch's fan-in scaled init keeps its activations in range,
        # where N(0, 0.02) would shrink them block by block.
        disc = OasisDiscriminator(num_classes(cfg), 3, ndf=cfg["ndf"])
    elif cfg["discriminator"] == "multiscale":
        disc = init_weights(MultiscaleDiscriminator(mask_channels(cfg), 3, ndf=cfg["ndf"], norm=cfg["norm"],
                                                    num_scales=cfg["num_d_scales"]))
    else:
        disc = init_weights(Discriminator(mask_channels(cfg), 3, ndf=cfg["ndf"], norm=cfg["norm"]))
    return spectral_normalised(disc) if cfg["d_spectral_norm"] else disc


def spectral_normalised(model):
    """`model` with spectral normalisation on the weight of every convolution and linear layer
    (after initialisation, so the direction of each initial weight is kept)."""
    for module in list(model.modules()):
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.utils.parametrizations.spectral_norm(module)
    return model


def parameter_counts(model_cfg):
    """Trainable parameters of the generator and discriminator a model config describes."""
    return {name: sum(p.numel() for p in build(model_cfg).parameters())
            for name, build in (("generator", build_generator), ("discriminator", build_discriminator))}


def read_checkpoint(path, required=GENERATOR_KEYS):
    """Load and check a pix2pix checkpoint of this project (weights_only=True)."""
    ckpt = load_checkpoint_of_kind(path, CHECKPOINT_KIND, required, CHECKPOINT_VERSION)
    ckpt["model_config"] = fill_legacy(ckpt["model_config"])
    return ckpt


def read_resume_checkpoint(path):
    """A checkpoint to resume: its run options gain the model config's values and, for options newer
    than the run, their legacy values (config.fill_legacy), so --resume continues the saved run even
    where a default has changed since (a U-Net saved before --upsample existed goes on with transpose)."""
    ckpt = read_checkpoint(path, RESUME_KEYS)
    model_cfg = ckpt["model_config"]
    recorded = {o.name: model_cfg[o.name] for o in GAN_OPTIONS if o.model and o.name in model_cfg}
    recorded.pop("unet_depth", None)  # the run's --unet-depth may be None (from the tile): keep what it said
    ckpt["config"] = fill_legacy({**recorded, **ckpt["config"]}, model=False)
    return ckpt


def load_generator(path, device, ema=True):
    """Rebuild the generator a checkpoint describes and load its weights: those of its
    moving average (--ema-half-life) when it has one, unless `ema` is False."""
    ckpt = read_checkpoint(path)
    generator = build_generator(ckpt["model_config"])
    averaged = ema and "generator_ema" in ckpt
    state = ckpt["generator_ema"]["model"] if averaged else ckpt["generator"]
    load_model_state(generator, state, path, f"generator{' average' if averaged else ''} ({ckpt['model_config']})")
    return generator.to(device), ckpt


@torch.no_grad()
def generate(generator, mask, autocast, norm_mode="eval", seeds=None):
    """Run the generator with an explicit normalisation mode, restoring its state.

    eval: running BatchNorm statistics and no dropout (deterministic); train: batch
    statistics and dropout as in the pix2pix paper, without touching the running
    statistics stored in the model. A generator that takes noise gets, for image i,
    the vector (SPADE) or the per-pixel noise inputs (U-Net, --noise-inject) seeded from
    seeds[i] (default: i), so the same seeds give the same images.
    """
    was_training = generator.training
    # Only train mode updates BatchNorm's running statistics: keep them to put back.
    saved = {k: v.clone() for k, v in generator.state_dict().items()
             if norm_mode == "train" and ("running_" in k or "num_batches" in k)}
    generator.train(norm_mode == "train")
    seeds = range(len(mask)) if seeds is None else seeds
    inputs = [mask]
    if generator.noise_dim:
        inputs.append(seeded_noise(seeds, generator.noise_dim, mask.device))
    elif getattr(generator, "noise_inject", False):
        inputs.append(seeds)  # the U-Net's per-pixel noise inputs, seeded per image
    with autocast:
        fake = generator(*inputs).float()
    if saved:
        generator.load_state_dict(saved, strict=False)
    generator.train(was_training)
    return fake
