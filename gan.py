"""The pix2pix GAN as a unit: its networks built from a model config, its
checkpoint kind, batches in the networks' input format, and generation with an
explicit normalisation mode. The training step and loop are in train_utils.py.
"""
import torch

from dataset.masks import NUM_CLASSES, PANNUKE, get_label_set, labels_to_onehot
from discriminator_model import Discriminator
from generator_model import NUM_DOWNSAMPLINGS, Generator, depth_for_tile, init_weights
from runtime import load_model_state
from utils import UserError, load_checkpoint_of_kind

CHECKPOINT_KIND = "he-pix2pix"
CHECKPOINT_VERSION = 1
# What generation needs of a checkpoint, and what resuming a run needs besides.
GENERATOR_KEYS = ("model_config", "generator")
RESUME_KEYS = GENERATOR_KEYS + ("config", "discriminator", "opt_g", "opt_d", "scaler_g", "scaler_d", "epoch",
                                "batches_done", "step", "history", "rng", "partial_sums")


def prepare_batch(labels, image, device, channels_last=True, num_classes=NUM_CLASSES):
    """uint8 class map + uint8 image from the loader -> one-hot mask and [-1, 1] image on device.

    Items holding several crops, (B, K, H, W) and (B, K, 3, H, W), become a batch of B*K."""
    labels = labels.reshape(-1, *labels.shape[-2:])
    image = image.reshape(-1, *image.shape[-3:])
    labels = labels.to(device, non_blocking=True)
    image = image.to(device, non_blocking=True)
    mask = labels_to_onehot(labels, num_classes)
    real = image.float().div_(127.5).sub_(1.0)
    if channels_last:
        mask = mask.contiguous(memory_format=torch.channels_last)
        real = real.contiguous(memory_format=torch.channels_last)
    return mask, real


def model_config(cfg, labels, tile):
    """The networks a run trains: widths, norm and dropout from the options; the label
    set (`labels`, a LabelSet) and the U-Net depth (unless --unet-depth) from the data."""
    try:
        depth = cfg.unet_depth or depth_for_tile(tile)
    except ValueError as exc:
        raise UserError(f"{cfg.data_dir}: {exc}") from None
    return dict(ngf=cfg.ngf, ndf=cfg.ndf, norm=cfg.norm, dropout=cfg.dropout, label_set=labels.name,
                unet_depth=depth)


def with_model_defaults(model_config):
    """Checkpoints from before label sets and depths were recorded are PanNuke, depth 8."""
    return {"label_set": PANNUKE.name, "unet_depth": NUM_DOWNSAMPLINGS, **model_config}


def num_classes(model_cfg):
    return get_label_set(model_cfg["label_set"]).num_classes


def build_generator(cfg):
    cfg = with_model_defaults(cfg)
    return init_weights(Generator(num_classes(cfg), 3, ngf=cfg["ngf"], norm=cfg["norm"], dropout=cfg["dropout"],
                                  num_downs=cfg["unet_depth"]))


def build_discriminator(cfg):
    return init_weights(Discriminator(num_classes(with_model_defaults(cfg)), 3, ndf=cfg["ndf"], norm=cfg["norm"]))


def read_checkpoint(path, required=GENERATOR_KEYS):
    """Load and check a pix2pix checkpoint of this project (weights_only=True)."""
    ckpt = load_checkpoint_of_kind(path, CHECKPOINT_KIND, required, CHECKPOINT_VERSION)
    ckpt["model_config"] = with_model_defaults(ckpt["model_config"])
    return ckpt


def read_resume_checkpoint(path):
    return read_checkpoint(path, RESUME_KEYS)


def load_generator(path, device):
    """Rebuild the generator a checkpoint describes and load its weights."""
    ckpt = read_checkpoint(path)
    generator = build_generator(ckpt["model_config"])
    load_model_state(generator, ckpt["generator"], path, f"generator ({ckpt['model_config']})")
    return generator.to(device), ckpt


@torch.no_grad()
def generate(generator, mask, autocast, norm_mode="eval"):
    """Run the generator with an explicit normalisation mode, restoring its state.

    eval: running BatchNorm statistics and no dropout (deterministic); train: batch
    statistics and dropout as in the pix2pix paper, without touching the running
    statistics stored in the model.
    """
    was_training = generator.training
    # Only train mode updates BatchNorm's running statistics: keep them to put back.
    saved = {k: v.clone() for k, v in generator.state_dict().items()
             if norm_mode == "train" and ("running_" in k or "num_batches" in k)}
    generator.train(norm_mode == "train")
    with autocast:
        fake = generator(mask).float()
    if saved:
        generator.load_state_dict(saved, strict=False)
    generator.train(was_training)
    return fake
