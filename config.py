"""Every default in one place, and the command-line parsers built from them.

Defaults follow the original work (Adam 2e-4, betas 0.5/0.999, L1 weight 75,
batch 2, 150 epochs, smoothed labels). Any of them can be overridden on the
command line; `python train_pannuke.py --help` lists them with explanations.
"""
import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from utils import UserError

# Optimisation (pix2pix / the original project)
EPOCHS = 150
BATCH_SIZE = 2
LEARNING_RATE = 2e-4
BETAS = (0.5, 0.999)
L1_LAMBDA = 75.0
REAL_LABEL_RANGE = (0.7, 1.2)   # positive labels for D drawn uniformly from this range
FAKE_LABEL_RANGE = (0.0, 0.3)   # negative labels for D drawn uniformly from this range
# Painting with a moving average of G's weights: on lizard_128 at 15 CPU minutes it turned a collapsed
# default (feature C2ST 0.996, domain Frechet distance 69.6) into 0.804 and 10.3 (docs/results.md,
# "The realism recipe").
EMA_HALF_LIFE = 10_000          # training images (stylegan2's ema_kimg 10)

# Networks: pix2pix's U-Net, with the resize upsampling and multiscale discriminator that the equal-budget
# study chose (docs/results.md "Which GAN?"); --upsample transpose --discriminator patch is the original pix2pix.
GENERATOR, GENERATORS = "unet", ("unet", "spade")
UPSAMPLE, UPSAMPLES = "resize", ("transpose", "resize")
DISCRIMINATOR, DISCRIMINATORS = "multiscale", ("patch", "multiscale", "oasis")
NGF = 64
NDF = 64
NORM = "batch"
# What checkpoints from before these were recorded trained with (config.fill_legacy).
UNET_DEPTH_BEFORE_RECORDED = 8
LABEL_SET_BEFORE_RECORDED = "pannuke"

# Data
PANNUKE_DIR = "data/pannuke"
TRAIN_FOLDS = (1, 2)
TEST_FOLDS = (3,)
TISSUE = "Colon"
UTP_DIR = "data/unitopatho/800"
UTP_MASKS_DIR = "data/unitopatho_masks"
CONIC_DIR = "data/conic"
CONIC_TEST_FRACTION = 0.2
CROP_SIZE = 256
CROPS_PER_IMAGE = 4
FOLDER_DIR = "data/folder"
FOLDER_TEST_FRACTION = 0.2

# Resolutions (um per pixel)
PANNUKE_MPP = 0.25       # 40x
UNITOPATHO_MPP = 0.4415  # 20x (NanoZoomer S210)
CONIC_MPP = 0.5          # 20x (Lizard / CoNIC)

# Nucleus segmenter (train_segmenter.py)
SEGMENTER_EPOCHS = 50
SEGMENTER_BATCH_SIZE = 16
SEGMENTER_LR = 1e-3
SEGMENTER_WIDTH = 32
SEGMENTER_RUN_OPTIONS = ("dataset", "train_folds", "tissue", "test_fraction", "split_file", "allow_overlap", "label_set",
                         "encoder", "width", "batch_size", "lr", "seed")
SEGMENTATION_TILE = 512        # segmenter tile side at the model's resolution (make_masks.py, evaluate.py)
SEGMENTATION_OVERLAP = 64
SEGMENTATION_BATCH_SIZE = 8

# UniToPatho classifier (classify_utp.py), on ImageNet-normalised inputs
CLASSIFIER_EPOCHS = 20
CLASSIFIER_BATCH_SIZE = 32
CLASSIFIER_LR = 1e-3
CLASSIFIER_IMAGE_SIZE = 224
CLASSIFIER_RUN_OPTIONS = ("synthetic_dir", "target", "epochs", "batch_size", "lr", "image_size", "weights", "seed")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Realism metrics (metrics.py)
PRDC_K = 5   # neighbours per ball in precision/recall/density/coverage (Naeem et al. 2020's default)
# The whole-tile C2ST (metrics.tile_c2st), one configuration for the calibration ladder and every generator.
# On 104 + 104 lizard_128 tiles, one thread: two real halves 0.48; sigma = 1 blurred tiles 0.99 at these
# settings, 0.97 at 10 epochs, 0.98 at widths (4, 8, 8, 8) and 10 epochs. Less training alone gives no range there.
C2ST_WIDTHS = (8, 16, 32, 32)   # channels of its four stride-2 conv layers (metrics.C2STNet)
C2ST_EPOCHS = 40
C2ST_FOLDS = 4
C2ST_BATCH_SIZE = 32
C2ST_LR = 1e-2                  # peak of the one-cycle schedule
# The C2ST with range (metrics.feature_c2st): logistic regression on the reference segmenter's pooled
# features. On lizard_128's ladder it put blurred tiles at 0.76 and JPEG 30 at 0.54 against a floor of 0.50,
# where the pixel C2ST gave 0.97 and 0.99 (docs/results.md).
FEATURE_C2ST_FOLDS = 5
FEATURE_C2ST_WEIGHT_DECAY = 1e-2  # L2 on the weights, over standardised features
# The calibration ladder (degradations.py): real tiles degraded in known ways, scored beside each generator.
LADDER_BLUR_SIGMA = 1.0                 # Gaussian blur, pixels
LADDER_JPEG_QUALITY = 30                # PIL JPEG quality (4:2:0 chroma subsampling, PIL's default)
LADDER_HED_SHIFT = (0.01, -0.01, 0.0)   # added to skimage's rgb2hed (haematoxylin, eosin, DAB): bluer, less pink;
                                        # about 10 grey levels of mean change on lizard_128

# Steps between lazy R1 penalties (stylegan2's 16), each weighted by the interval.
R1_INTERVAL = 16

# The G average's BatchNorm statistics are re-estimated from this many batches of training masks
# (ema.recompute_batchnorm_stats) before it paints or is saved.
EMA_BATCHNORM_BATCHES = 8
EMA_BATCHNORM_BATCH_SIZE = 8

# Run bookkeeping
SEED = 42
SAVE_EVERY_EPOCHS = 10
LOG_EVERY_STEPS = 10
NUM_SAMPLES = 4
# --eval-every's realism score (train_utils.RealismProbe): up to this many held-out tiles, painted this many at a
# time, in the pooled features of an untrained segmenter of this width built from this seed.
EVAL_TILES = 64
EVAL_BATCH_SIZE = 16
EVAL_FEATURE_WIDTH = 8
EVAL_SEED = 0
WANDB_PROJECT = "he-pix2pix"
DIST_TIMEOUT_MINUTES = 30

# `--demo`: small enough to train in about three minutes on 2 CPU cores.
DEMO_OVERRIDES = dict(epochs=30, batch_size=4, ngf=16, ndf=16, out_dir="runs/demo",
                      train_folds=[1, 2], test_folds=[3], tissue="Colon", save_every=0)


# The quality study (study.py, quality/). Its segmenters are smaller than train_segmenter.py's, to fit a CPU
# budget; the training scripts' defaults apply to its GANs except where these say otherwise.
STUDY_OUT_DIR = "runs/study"
STUDY_FRACTIONS = (10, 25, 100)         # labelled percent of the training split
STUDY_SEEDS = 5                         # segmenter seeds per labelled fraction and pool (paired intervals)
STUDY_MIN_LABELLED_TILES = 4
STUDY_LAYOUTS_PER_TILE = 1.0            # new layouts (source b) per labelled tile
STUDY_NUCLEI_COPIED = 5                 # nuclei pasted into each new layout (dataset.layouts.copy_nuclei)
STUDY_RARE_CLASS_WEIGHT = 1.0           # how much more often copy_nuclei draws a rare class's nuclei (1: as often)
STUDY_RARE_SHARE = 0.05                 # a class with under this share of the labelled nuclei is rare
STUDY_DIVERSITY_SAMPLES = 3             # paintings per test mask for the diversity score
STUDY_DIVERSITY_MASKS = 32              # test masks (those with most nuclei) it is measured on
STUDY_DIVERSITY_SEED_STEP = 1_000_003   # seed offset between a mask's paintings
STUDY_BUDGET_MINUTES = 12.0             # training time per GAN
STUDY_SAVE_EVERY_STEPS = 250            # a killed study resumes its segmenter runs from these saves
# Steps of every segmenter in a study (the reference and each augmentation run), whatever the GAN budget.
# Provisional: docs/results.md says which learning curve on lizard_128 chooses it, and what it showed.
STUDY_SEGMENTER_STEPS = 1000
STUDY_GAN_WIDTH = 32                    # --ngf and --ndf
STUDY_GAN_SAMPLES = 4                   # rows of the GAN runs' sample grids (held-out test tiles)
STUDY_SEGMENTER_WIDTH = 16
STUDY_SEGMENTER_BATCH_SIZE = 8
STUDY_C2ST_EPOCHS = 15
STUDY_C2ST_FOLDS = 5
STUDY_PAINT_BATCH = 16                  # tiles per generator forward pass
STUDY_GRID_ROWS = 4

# --------------------------------------------------------------------------- the GAN's options
# Every option of the GAN (its networks, losses and optimiser) is declared once here. The training
# scripts' flags and their checks, RUN_OPTIONS, the checkpoint's model config, the losses' step
# config, bench.py's networks and the quality study's GAN options are all derived from this table.
# Adding an option means one GanOption below and the code that uses it (docs/design.md).

class NotRecorded:
    """`legacy` of an option that every checkpoint records: there is nothing to fill in."""

    def __repr__(self):
        return "NOT_RECORDED"


NOT_RECORDED = NotRecorded()


@dataclass(frozen=True)
class GanOption:
    """One GAN option.

    group: "networks" (what G and D are), "losses" (the training step's losses) or "optimisation".
    model: the option shapes the networks, so the checkpoint's model config records it (and a
        resume must not change it); `when=(option, value)` records it only for that choice.
    minimum / positive / below: the allowed range, checked before any work (with finiteness).
    legacy: the value that reproduces what a run did before the option existed; checkpoints
        and studies that do not record the option are read with it (config.fill_legacy)."""
    name: str
    default: object
    help: str
    group: str
    choices: tuple = None
    minimum: float = None
    positive: bool = False
    below: float = None
    model: bool = False
    when: tuple = None
    legacy: object = NOT_RECORDED
    metavar: tuple = None
    type: type = None  # the value's type where the default (None) does not tell

    @property
    def flag(self):
        return "--" + self.name.replace("_", "-")

    def applies(self, values):
        """Whether the option means anything for these values of the other options (a mapping)."""
        return self.when is None or values.get(self.when[0]) == self.when[1]


INSTANCE_DATASETS = ("conic", "pannuke")  # the data with instance maps, whose loaders mark edges (--instance-edges)

GAN_OPTIONS = (
    # networks
    GanOption("generator", GENERATOR, group="networks", model=True, choices=GENERATORS, legacy="unet",
              help="unet: pix2pix's U-Net on the one-hot mask; spade: a SPADE residual generator (the mask, "
                   "resized to each block, predicts per-pixel scale and bias of a parameter-free --norm), "
                   "upsampled 5 times from a grid of the input's size / 32"),
    GanOption("upsample", UPSAMPLE, group="networks", model=True, when=("generator", "unet"), choices=UPSAMPLES,
              legacy="transpose",
              help="unet: how the decoder doubles the resolution: transpose = pix2pix's 4x4 stride-2 transposed "
                   "convolutions; resize = nearest-neighbour x2 then a 3x3 convolution, free of the checkerboard "
                   "(grid of dots) transposed convolutions leave"),
    GanOption("discriminator", DISCRIMINATOR, group="networks", model=True, choices=DISCRIMINATORS, legacy="patch",
              help="patch: pix2pix's 70x70 PatchGAN (BCE, smoothed labels); multiscale: PatchGANs at "
                   "--num-d-scales scales (pix2pixHD; --gan-loss, --feat-match-lambda); oasis: a U-Net "
                   "segmenter on the image with N classes + 'fake' per pixel (class-balanced cross-entropy, "
                   "--labelmix-lambda; OASIS trains with --l1-lambda 0)"),
    GanOption("ngf", NGF, group="networks", model=True, minimum=1, help="generator width (filters in the first layer)"),
    GanOption("ndf", NDF, group="networks", model=True, minimum=1,
              help="discriminator width (filters in the first layer)"),
    GanOption("norm", NORM, group="networks", model=True, choices=("batch", "instance"), help="normalisation layers"),
    GanOption("dropout", True, group="networks", model=True, when=("generator", "unet"),
              help="dropout in the first three decoder blocks (pix2pix's noise source)"),
    GanOption("noise_inject", False, group="networks", model=True, when=("generator", "unet"), legacy=False,
              help="unet: per-pixel Gaussian noise added after each decoder block's upsampling, times a learned "
                   "per-channel scale that starts at 0 (StyleGAN's noise inputs), for stochastic texture; drawn "
                   "fresh every training step, seeded per image in test.py"),
    GanOption("instance_edges", False, group="networks", model=True, legacy=False,
              help="give G (and a conditional D) one more input channel marking the edges of nucleus instances "
                   "(pix2pixHD's edge map), so touching nuclei of one class reach G as separate nuclei; needs "
                   "instance maps (CoNIC and PanNuke data, the study), so not UniToPatho or folder data"),
    GanOption("unet_depth", None, group="networks", model=True, minimum=1, legacy=UNET_DEPTH_BEFORE_RECORDED, type=int,
              help="U-Net downsamplings; default: from the training tile, down to 1 x 1 (7 for 128 px, "
                   "8 for 256 px and larger), as pix2pix's unet_128 / unet_256; with --generator spade it "
                   "sets only the tile test.py generates in (2**depth px)"),
    GanOption("noise_dim", 0, group="networks", model=True, minimum=0, legacy=0,
              help="spade: length of a per-image noise vector broadcast over the image and concatenated to "
                   "the mask (OASIS's 3D noise), for varied images per mask; 0 = no noise"),
    GanOption("d_spectral_norm", False, group="networks", model=True, legacy=False,
              help="spectral normalisation of every convolution and linear layer of D (Miyato et al. 2018; SPADE's "
                   "and OASIS's D use it), which bounds how sharply D can change between nearby images"),
    GanOption("num_d_scales", 2, group="networks", model=True, when=("discriminator", "multiscale"),
              choices=(1, 2, 3), help="multiscale: PatchGANs, each on the input average-pooled by 2 once more"),
    # losses
    GanOption("gan_loss", "hinge", group="losses", choices=("hinge", "bce"),
              help="multiscale: hinge (SPADE) or BCE with the --smooth-* labels"),
    GanOption("feat_match_lambda", 10.0, group="losses", minimum=0,
              help="multiscale: weight of feature matching (L1 between D's features on real and fake "
                   "images), added to G's adversarial loss; 0 = off"),
    GanOption("labelmix_lambda", 10.0, group="losses", minimum=0,
              help="oasis: weight of LabelMix (D's output on real and fake mixed by mask class must be the "
                   "same mix of its outputs), added to D's loss; 0 = off"),
    GanOption("l1_lambda", L1_LAMBDA, group="losses", minimum=0, help="weight of the L1 reconstruction loss"),
    GanOption("l1_lowpass", 1, group="losses", minimum=1, legacy=1,
              help="take the L1 loss between the images average-pooled by this factor, so that L1 anchors colour "
                   "and layout and leaves fine texture to D; 1 = plain L1 (pix2pix)"),
    GanOption("d_augment", "none", group="losses", choices=("none", "diffaug", "ada"), legacy="none",
              help="augment D's inputs, real and fake alike, in D's and G's steps (augment.py): diffaug = "
                   "DiffAugment's colour, translation and cutout on every image; ada = flips, 90-degree rotations, "
                   "translation, cutout and colour incl. an H&E stain jitter, each with a probability p that ADA "
                   "adapts to D's overfitting (target 0.6); geometric transforms move the mask with the image"),
    GanOption("r1_gamma", 0.0, group="losses", minimum=0, legacy=0.0,
              help="weight of the R1 penalty on D's gradient at real images, applied lazily every "
                   "R1_INTERVAL steps (config.py); 0 = off"),
    GanOption("smooth_real", True, group="losses", help="draw D's positive labels from --real-label-range instead of 1"),
    GanOption("smooth_fake", True, group="losses", help="draw D's negative labels from --fake-label-range instead of 0"),
    GanOption("real_label_range", REAL_LABEL_RANGE, group="losses", metavar=("LO", "HI"),
              help="range of D's smoothed positive labels"),
    GanOption("fake_label_range", FAKE_LABEL_RANGE, group="losses", metavar=("LO", "HI"),
              help="range of D's smoothed negative labels"),
    # optimisation
    GanOption("batch_size", BATCH_SIZE, group="optimisation", minimum=1, help="batch size per process"),
    GanOption("lr", LEARNING_RATE, group="optimisation", positive=True, help="Adam learning rate for G and D"),
    GanOption("beta1", BETAS[0], group="optimisation", minimum=0, below=1, help="Adam beta1"),
    GanOption("beta2", BETAS[1], group="optimisation", minimum=0, below=1, help="Adam beta2"),
    GanOption("scale_lr", False, group="optimisation",
              help="multiply the learning rate by the world size (linear scaling under DDP)"),
    GanOption("ema_half_life", EMA_HALF_LIFE, group="optimisation", minimum=0, legacy=0,
              help="paint with an exponential moving average of G's weights whose half-life is this many training "
                   "images (stylegan2's ema_kimg x 1000): sample grids, test.py and study.py then use it "
                   "(test.py --no-ema: the raw G); 0 = off"),
    GanOption("ema_rampup", 0.05, group="optimisation", minimum=0,
              help="with --ema-half-life: cap the half-life at this fraction of the images seen so far, so a "
                   "short run's average does not stay near the initial weights; 0 = no cap"),
)
GAN_OPTION = {option.name: option for option in GAN_OPTIONS}
GAN_GROUPS = ("networks", "losses", "optimisation")


def add_gan_args(p, groups=GAN_GROUPS, defaults=None, exclude=()):
    """The flags of GAN_OPTIONS in `groups`, one argument group each; `defaults` overrides some defaults
    (the study's narrower networks), `exclude` leaves out options a caller declares itself."""
    defaults = defaults or {}
    for group_name in groups:
        g = p.add_argument_group(group_name)
        for option in GAN_OPTIONS:
            if option.group != group_name or option.name in exclude:
                continue
            default = defaults.get(option.name, option.default)
            kwargs = dict(default=list(default) if isinstance(default, tuple) else default, help=option.help)
            if isinstance(option.default, bool):
                kwargs["action"] = argparse.BooleanOptionalAction
            elif isinstance(option.default, tuple):
                kwargs.update(type=type(option.default[0]), nargs=len(option.default), metavar=option.metavar)
            else:
                kwargs.update(type=option.type or type(option.default), choices=option.choices)
            g.add_argument(option.flag, **kwargs)
    return p


def as_value(value):
    """An option's value as GAN_OPTIONS' defaults hold it: argparse's lists as tuples."""
    return tuple(value) if isinstance(value, list) else value


def gan_values(cfg, groups=GAN_GROUPS):
    """The GAN options of `cfg` (a namespace) in `groups`, by name."""
    return {o.name: as_value(getattr(cfg, o.name)) for o in GAN_OPTIONS if o.group in groups and hasattr(cfg, o.name)}


def flag_text(name, value):
    """An option's value as the command-line flag that sets it."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    if isinstance(value, (list, tuple)):
        return f"{flag} {' '.join(f'{v:g}' if isinstance(v, float) else str(v) for v in value)}"
    return f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}"


def check_gan_options(cfg):
    """One line for the first GAN option out of range or not finite, before any work."""
    for option in GAN_OPTIONS:
        if not hasattr(cfg, option.name):
            continue
        value = getattr(cfg, option.name)
        if value is None or isinstance(value, (bool, str)):
            continue
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(v, float) and not math.isfinite(v):
                raise UserError(f"{option.flag} must be a finite number, got {v}")
            if option.minimum is not None and v < option.minimum:
                raise UserError(f"{option.flag} must be at least {option.minimum}, got {v}")
            if option.positive and not v > 0:
                raise UserError(f"{option.flag} must be positive, got {v}")
            if option.below is not None and not v < option.below:
                raise UserError(f"{option.flag} must be below {option.below}, got {v}")
        if isinstance(value, (list, tuple)) and list(value) != sorted(value):
            raise UserError(f"{option.flag} takes LO HI with LO <= HI, got {' '.join(map(str, value))}")


def fill_legacy(record, model=True):
    """A model config (model=True) or a run's options recorded before some GAN options existed, with
    those options at the values that reproduce what that run did. The label set, recorded since
    CoNIC runs exist, was PanNuke's before."""
    filled = dict(record)
    if model:
        filled.setdefault("label_set", LABEL_SET_BEFORE_RECORDED)
    for option in GAN_OPTIONS:  # in table order, so `when` sees the generator/discriminator filled in
        if (model and not option.model) or option.legacy is NOT_RECORDED or not option.applies(filled):
            continue
        filled.setdefault(option.name, option.legacy)
    return filled


# Options that define a run. On --resume, those not given on the command line are
# taken from the checkpoint, so the resumed run goes on training the same way.
DATA_RUN_OPTIONS = ("train_folds", "tissue", "crop_size", "crops_per_image", "crop_scheme", "grade_only",
                    "split_file", "allow_overlap", "test_fraction", "label_set", "seed")
SCHEDULE_RUN_OPTIONS = ("budget_minutes", "eval_every")
RUN_OPTIONS = DATA_RUN_OPTIONS + SCHEDULE_RUN_OPTIONS + tuple(option.name for option in GAN_OPTIONS)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def add_device_args(p):
    g = p.add_argument_group("device and speed")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto picks CUDA when available (cuda:LOCAL_RANK under torchrun), else CPU")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="mixed precision: auto = bf16 on GPUs that support it and on CPUs with AMX tiles (AVX512-BF16 "
                        "alone measured slower than fp32), fp16 with gradient scaling on older GPUs, fp32 otherwise")
    g.add_argument("--channels-last", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                   help="NHWC memory layout for convolutions (--channels-last alone: on). auto: on with CUDA (tensor "
                        "cores) and on CPUs with AVX-512, where bench.py --ablations measured it 7-24%% faster; off on "
                        "AVX2-only CPUs, where NCHW measured 3-8%% faster")
    g.add_argument("--no-channels-last", dest="channels_last", action="store_const", const="off",
                   help="same as --channels-last off")
    g.add_argument("--compile", default=False, action=argparse.BooleanOptionalAction,
                   help="torch.compile the networks (falls back to eager if compilation fails)")
    g.add_argument("--workers", type=int, default=-1,
                   help="data-loader worker processes per process; -1 chooses from the core count")
    g.add_argument("--seed", type=int, default=SEED, help="seed for weights, data order and augmentation")


def add_wandb_args(g, project=WANDB_PROJECT):
    g.add_argument("--wandb", default="auto", choices=["auto", "online", "offline", "disabled"],
                   help="auto = online when WANDB_API_KEY or `wandb login` is configured and the server answers, "
                        "else offline (a run under OUT/wandb, for `wandb sync` later)")
    g.add_argument("--wandb-project", default=project)
    g.add_argument("--wandb-entity", default=None)
    g.add_argument("--run-name", default=None, help="wandb run name")


def add_allow_overlap_arg(g):
    g.add_argument("--allow-overlap", action="store_true",
                   help="accept training and test data that share a PanNuke fold or, in a split file, a source "
                        "image (a warning instead of an error); test scores then flatter the model")


def add_pannuke_data_args(p, test_folds_help):
    g = p.add_argument_group("data (PanNuke)")
    g.add_argument("--data-dir", default=PANNUKE_DIR,
                   help="PanNuke root holding 'Fold 1', 'Fold 2', 'Fold 3' (official release) or "
                        "train/ and test/ (converted layout)")
    g.add_argument("--train-folds", type=int, nargs="+", default=list(TRAIN_FOLDS), help="folds to train on")
    g.add_argument("--test-folds", type=int, nargs="+", default=list(TEST_FOLDS), help=test_folds_help)
    g.add_argument("--tissue", default=TISSUE, help="one of PanNuke's 19 tissues, or 'all'")
    return g


def add_utp_data_args(p, data_help="UniToPatho '800' folder (train.csv, test.csv, class folders)", masks=True):
    g = p.add_argument_group("data (UniToPatho)")
    g.add_argument("--data-dir", default=UTP_DIR, help=data_help)
    if masks:
        g.add_argument("--masks-dir", default=UTP_MASKS_DIR,
                       help="masks root holding training/masks/ and test/masks/ (palette PNGs, same file names)")
    return g


def add_utp_training_data_args(p):
    p.set_defaults(dataset="unitopatho")  # recorded in the checkpoint, for test.py
    g = add_utp_data_args(p)
    g.add_argument("--crop-size", type=int, default=CROP_SIZE, help="training crop size (a multiple of 256)")
    g.add_argument("--crops-per-image", type=int, default=CROPS_PER_IMAGE,
                   help="random crops taken from each decoded image per visit")
    g.add_argument("--crop-scheme", default="random", choices=["random", "fivecrop"],
                   help="random crops, or the original's FiveCrop (four corners + centre)")
    g.add_argument("--grade-only", default=False, action=argparse.BooleanOptionalAction,
                   help="train only on images with a dysplasia grade (grade >= 0), as the original did")
    g.add_argument("--cache-dir", default=None,
                   help="cache decoded images and masks as .npy here (memory-mapped on later epochs)")


def add_pannuke_training_data_args(p):
    p.set_defaults(dataset="pannuke")  # recorded in the checkpoint, for test.py
    g = add_pannuke_data_args(p, "folds for the sample grids (and test.py)")
    add_allow_overlap_arg(g)
    g.add_argument("--check-data", action="store_true",
                   help="check every patch's pixel and mask values at start-up (default: a sample of each fold)")
    g.add_argument("--demo", action="store_true",
                   help="build a small PanNuke-format dataset from the real H&E in demo_assets/ (no download) "
                        "under OUT/demo_data and train a small model on it: "
                        + ", ".join(f"{k}={v}" for k, v in DEMO_OVERRIDES.items()))


def add_segmentation_args(g, batch_flag="--batch-size"):
    """Running a trained segmenter over whole images (make_masks.py, evaluate.py)."""
    g.add_argument("--source-mpp", type=float, default=UNITOPATHO_MPP, help="um per pixel of the images")
    g.add_argument("--model-mpp", type=float, default=None,
                   help="um per pixel the segmenter was trained at (default: as its checkpoint records, "
                        f"{PANNUKE_MPP} for PanNuke, {CONIC_MPP} for CoNIC)")
    g.add_argument("--tile", type=int, default=SEGMENTATION_TILE,
                   help="segmenter tile side in pixels at the model's resolution")
    g.add_argument("--overlap", type=int, default=SEGMENTATION_OVERLAP, help="pixels shared by neighbouring tiles")
    g.add_argument(batch_flag, type=int, default=SEGMENTATION_BATCH_SIZE, help="tiles per segmenter forward pass")
    g.add_argument("--stain-normalize", action="store_true",
                   help="Macenko-normalise each image before segmenting (use it when the masks were made that way)")
    g.add_argument("--reference", default=None, metavar="IMG",
                   help="H&E image whose stains --stain-normalize matches; without it, torchstain's built-in "
                        "reference stain vectors")


def check_segmentation_args(args):
    """make_masks.py's and evaluate.py's segmentation options and --seed, before any work."""
    if args.reference and not args.stain_normalize:
        raise UserError("--reference is the stain-normalisation target: add --stain-normalize")
    batch = "tile_batch_size" if hasattr(args, "tile_batch_size") else "batch_size"  # evaluate.py's flag, or make_masks.py's
    check_option_ranges(args, {"tile": 1, "overlap": 0, batch: 1, "seed": 0},
                        positive=("source_mpp",) + (() if args.model_mpp is None else ("model_mpp",)))


def add_conic_split_args(g):
    g.add_argument("--test-fraction", type=float, default=CONIC_TEST_FRACTION,
                   help="share of patches held out for testing, whole source images at a time")
    g.add_argument("--split-file", default=None,
                   help="a CSV with columns patch_info,split (train/test) to use instead of a seeded split by "
                        "source image")


def add_conic_training_data_args(p):
    p.set_defaults(dataset="conic")  # recorded in the checkpoint, for test.py
    g = p.add_argument_group("data (CoNIC / Lizard)")
    g.add_argument("--data-dir", default=CONIC_DIR,
                   help="CoNIC release folder: images.npy, labels.npy, patch_info.csv (counts.csv optional)")
    add_conic_split_args(g)
    add_allow_overlap_arg(g)
    g.add_argument("--label-set", default="conic", choices=["conic", "pannuke"],
                   help="classes the generator is conditioned on: CoNIC's 6 nucleus types, or mapped to "
                        "PanNuke's (to paint UniToPatho masks drawn in the PanNuke palette)")
    g.add_argument("--check-data", action="store_true",
                   help="check every patch's values at start-up (default: a sample; each patch is also checked "
                        "when read)")


def add_folder_training_data_args(p):
    p.set_defaults(dataset="folder")  # recorded in the checkpoint, for test.py
    g = p.add_argument_group("data (a folder of image and mask files)")
    g.add_argument("--data-dir", default=FOLDER_DIR,
                   help="folder holding images/NAME.png|.jpg|.tif and masks/NAME.png (index or palette PNGs), "
                        "optionally classes.json and split.csv (see dataset/folder.py)")
    g.add_argument("--crop-size", type=int, default=CROP_SIZE,
                   help="side of the random square crop each visit of a tile trains on; smaller tiles are refused")
    g.add_argument("--test-fraction", type=float, default=FOLDER_TEST_FRACTION,
                   help="share of tiles held out for testing, whole sources (name prefixes) at a time")
    g.add_argument("--split-file", default=None,
                   help="a CSV with columns name,split (train/test) to use instead of DATA_DIR/split.csv or a "
                        "seeded split by source")
    add_allow_overlap_arg(g)
    g.add_argument("--check-data", action="store_true",
                   help="check every mask's values at start-up (default: a sample; each mask is also checked "
                        "when read)")


def training_parser(dataset, add_data_args, out_dir):
    """Options shared by the GAN training scripts (and their _ddp twins): the data
    options `add_data_args(parser)` adds, then networks, optimisation, outputs and
    device. `dataset` names the data in --help; `out_dir` is the default run folder."""
    p = argparse.ArgumentParser(
        description=f"Train a mask-conditioned GAN on {dataset}: by default pix2pix's U-Net (resize upsampling) "
                    "against PatchGANs at two scales (pix2pixHD); --upsample transpose --discriminator patch is "
                    "the original pix2pix. "
                    "The same script runs on one device or under torchrun (see train_*_ddp.py).",
        formatter_class=HelpFormatter)
    add_data_args(p)
    add_gan_args(p)
    g = p.add_argument_group("schedule")
    g.add_argument("--epochs", type=int, default=EPOCHS,
                   help="total epochs to reach (also when resuming); with --budget-minutes an upper bound: give a "
                        "large value to let the budget decide")
    g.add_argument("--budget-minutes", type=float, default=0,
                   help="train for this many minutes of training time (loading and steps, counted across resumes; "
                        "not start-up, saves or --eval-every), the learning rate of G and D decaying linearly to 0 "
                        "over the second half (pix2pix's decay, in time), then save last.pt and stop; 0 = no budget")

    g = p.add_argument_group("outputs and resuming")
    g.add_argument("--out-dir", default=out_dir,
                   help="run folder: checkpoints/, samples/, loss_curves.png, wandb/")
    g.add_argument("--resume", default=None, metavar="CKPT",
                   help="continue from a checkpoint (e.g. OUT/checkpoints/last.pt), same wandb run if any")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out-dir that already holds a run, deleting its checkpoints and "
                        "samples (without it, such a run is refused)")
    g.add_argument("--save-every", type=int, default=SAVE_EVERY_EPOCHS,
                   help="also keep checkpoints/epoch_NNNN.pt every N epochs (0: only last.pt)")
    g.add_argument("--save-every-steps", type=int, default=0,
                   help="also refresh last.pt every N steps inside an epoch (0: at epoch ends only)")
    g.add_argument("--log-every", type=int, default=LOG_EVERY_STEPS,
                   help="steps between progress-bar/wandb loss updates (each one syncs the device)")
    g.add_argument("--num-samples", type=int, default=NUM_SAMPLES, help="rows in each epoch's sample grid")
    g.add_argument("--eval-every", type=int, default=0,
                   help=f"every N steps and at the end, score the generator that paints (the average with "
                        f"--ema-half-life) on up to {EVAL_TILES} held-out tiles: the Frechet distance to the real "
                        f"tiles in the pooled features of a fixed, untrained network (lower is better); keep "
                        f"checkpoints/best.pt whenever it improves; 0 = off")
    add_wandb_args(g)
    g.add_argument("--dist-timeout", type=float, default=DIST_TIMEOUT_MINUTES,
                   help="minutes a process waits for the others under torchrun before failing")
    add_device_args(p)
    return p


def options_given(parser, argv=None):
    """Names (dests) of the options given on the command line, as opposed to defaults."""
    unset = object()
    namespace = argparse.Namespace(**{action.dest: unset for action in parser._actions})
    parser.parse_args(argv, namespace=namespace)
    return sorted(dest for dest, value in vars(namespace).items() if value is not unset)


class RunConfig(argparse.Namespace):
    """A run's settled options: read-only once made, so no later code can change
    what the checkpoint will record."""

    def __init__(self, **values):
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError(f"the run's configuration is settled; {name!r} cannot change now")


def settle_config(parser, argv=None, read_checkpoint=None, run_options=RUN_OPTIONS, log=print):
    """Settle a run's options once, in rising priority: the parser's defaults (this
    file), DEMO_OVERRIDES when --demo is given, the --resume checkpoint's recorded
    options (`run_options` only), then the command line. Returns (RunConfig, the
    checkpoint read for --resume or None)."""
    given = options_given(parser, argv)
    args = parser.parse_args(argv)
    if getattr(args, "demo", False):
        parser.set_defaults(**DEMO_OVERRIDES)
        args = parser.parse_args(argv)
        args.data_dir = str(Path(args.out_dir) / "demo_data")  # the demo writes its data inside its run
    values = vars(args)
    resume = read_checkpoint(args.resume) if args.resume else None
    if resume is not None:
        taken = {name: resume["config"][name] for name in run_options
                 if name in resume["config"] and name in values and name not in given
                 and values[name] != resume["config"][name]}
        values.update(taken)
        if taken:
            log("resume: as the checkpoint's run: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in taken.items())
                + " (flags given on the command line win)")
    return RunConfig(**values), resume


def check_option_ranges(cfg, at_least=None, positive=()):
    """One line for the first option out of range: `at_least` maps option names to
    their lowest value; `positive` names options that must be above 0."""
    for name in (*(at_least or {}), *positive):
        value = getattr(cfg, name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    for name, low in (at_least or {}).items():
        if getattr(cfg, name) < low:
            raise UserError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(cfg, name)}")
    for name in positive:
        if not getattr(cfg, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")


def check_epochs_left(cfg, resume):
    if resume is not None and resume["epoch"] >= cfg.epochs:
        raise UserError(f"{cfg.resume} has already trained {resume['epoch']} epoch(s); give --epochs above "
                        f"{resume['epoch']} to train further")


def check_budget_left(cfg, resume):
    if resume is not None and cfg.budget_minutes and resume.get("train_seconds", 0) >= cfg.budget_minutes * 60:
        raise UserError(f"{cfg.resume} has already trained {resume['train_seconds'] / 60:.2f} minute(s), its "
                        f"--budget-minutes {cfg.budget_minutes:g}; give a larger --budget-minutes (or 0 for none) to "
                        f"train further")


def check_training_config(cfg):
    """The GAN scripts' options, before any work starts."""
    check_gan_options(cfg)
    at_least = {"epochs": 1, "log_every": 1, "save_every": 0, "save_every_steps": 0, "num_samples": 0, "seed": 0,
                "budget_minutes": 0, "eval_every": 0}
    check_option_ranges(cfg, {**at_least, **({"crops_per_image": 1} if hasattr(cfg, "crops_per_image") else {})},
                        positive=("dist_timeout",))


def test_parser():
    p = argparse.ArgumentParser(
        description="Write synthetic H&E images for a test set from a trained generator checkpoint.",
        formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint file, or wandb:ENTITY/PROJECT/ARTIFACT:VERSION (needs an online account)")
    p.add_argument("--dataset", default=None, choices=["pannuke", "unitopatho", "conic", "folder"],
                   help="what the masks are (default: the data the checkpoint trained on; pannuke for a "
                        "checkpoint that does not record it)")
    p.add_argument("--masks-only", action="store_true",
                   help="folder: paint every mask of --data-dir (DATA_DIR/masks/*.png, or DATA_DIR/*.png), any "
                        "size, without images or split; the output is again a folder dataset")
    p.add_argument("--data-dir", default=None, help="dataset root (default: the one the checkpoint trained on)")
    p.add_argument("--test-folds", type=int, nargs="+", default=list(TEST_FOLDS), help="PanNuke folds to generate")
    p.add_argument("--tissue", default=TISSUE, help="PanNuke tissue, or 'all'")
    p.add_argument("--masks-dir", default=UTP_MASKS_DIR, help="UniToPatho masks root")
    p.add_argument("--split", default="test", choices=["test", "train"],
                   help="UniToPatho, CoNIC or folder split to synthesise (train: extra training data); CoNIC's "
                        "and a folder's split is the training run's (its split file, or --split-file)")
    p.add_argument("--split-file", default=None,
                   help="CoNIC or folder: a split CSV (patch_info,split or name,split) instead of the run's")
    p.add_argument("--label-set", default=None, choices=["conic", "pannuke"],
                   help="CoNIC: read the masks in CoNIC's classes or mapped to PanNuke's (default: as the "
                        "checkpoint's run did; conic for a run on other data)")
    p.add_argument("--out-dir", required=True, help="where synthetic images go")
    p.add_argument("--grids-dir", default=None,
                   help="folder for the mask | real | fake grids (default: OUT.grids, beside --out-dir, so the "
                        "synthetic tree holds only what a loader of the real data expects)")
    p.add_argument("--tiles-dir", default=None,
                   help="CoNIC: folder for the per-patch PNGs the drop-in folder is assembled from (default: "
                        "OUT.tiles, beside --out-dir)")
    p.add_argument("--samples-per-mask", type=int, default=1,
                   help="K > 1: K images per mask, seeded from (--seed, image, k), in K drop-in trees "
                        "OUT/sample_1 ... OUT/sample_K (grids and CoNIC tiles in sample_k folders beside them); "
                        "needs noise (--noise-dim) or a U-Net with dropout and --norm-mode train")
    p.add_argument("--norm-mode", default="eval", choices=["eval", "train"],
                   help="eval: running BatchNorm statistics, no dropout (deterministic, independent of tiling "
                        "and batch); train: per-image statistics and dropout, as in the pix2pix paper")
    p.add_argument("--tile", action="store_true",
                   help="UniToPatho and folder: generate in overlapping tiles of the generator's training size, "
                        "blended with a smooth window (bounded memory), instead of the whole padded image")
    p.add_argument("--tile-overlap", type=int, default=64, help="pixels shared by neighbouring tiles")
    p.add_argument("--batch-size", type=int, default=8, help="patches or tiles per forward pass")
    p.add_argument("--grids", type=int, default=16, help="mask | real | fake grid PNGs to write (0: none)")
    p.add_argument("--overwrite", action="store_true", help="regenerate images that already exist")
    p.add_argument("--ema", default=True, action=argparse.BooleanOptionalAction,
                   help="paint with the checkpoint's moving average of G's weights (trained with --ema-half-life) "
                        "when it has one; --no-ema paints with the raw G")
    add_device_args(p)
    return p
