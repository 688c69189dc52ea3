"""Every default in one place, and the command-line parsers built from them.

Defaults follow the original work (Adam 2e-4, betas 0.5/0.999, L1 weight 75,
batch 2, 150 epochs, smoothed labels). Any of them can be overridden on the
command line; `python train_pannuke.py --help` lists them with explanations.
"""
import argparse

# Optimisation (pix2pix / the original project)
EPOCHS = 150
BATCH_SIZE = 2
LEARNING_RATE = 2e-4
BETAS = (0.5, 0.999)
L1_LAMBDA = 75.0
REAL_LABEL_RANGE = (0.7, 1.2)   # positive labels for D drawn uniformly from this range
FAKE_LABEL_RANGE = (0.0, 0.3)   # negative labels for D drawn uniformly from this range

# Networks
NGF = 64
NDF = 64
NORM = "batch"

# Data
PANNUKE_DIR = "data/pannuke"
TRAIN_FOLDS = (1, 2)
TEST_FOLDS = (3,)
TISSUE = "Colon"
UTP_DIR = "data/unitopatho/800"
UTP_MASKS_DIR = "data/unitopatho_masks"
CROP_SIZE = 256
CROPS_PER_IMAGE = 4

# Run bookkeeping
SEED = 42
SAVE_EVERY_EPOCHS = 10
LOG_EVERY_STEPS = 10
NUM_SAMPLES = 4
WANDB_PROJECT = "he-pix2pix"
DIST_TIMEOUT_MINUTES = 30

# Options that define a run. On --resume, those not given on the command line are
# taken from the checkpoint, so the resumed run goes on training the same way.
RUN_OPTIONS = ("train_folds", "tissue", "crop_size", "crops_per_image", "crop_scheme", "grade_only",
               "ngf", "ndf", "norm", "dropout", "batch_size", "lr", "beta1", "beta2", "scale_lr", "l1_lambda",
               "smooth_real", "smooth_fake", "real_label_range", "fake_label_range", "seed")

# `--demo`: small enough to train in about two minutes on 2 CPU cores.
DEMO_OVERRIDES = dict(epochs=30, batch_size=4, ngf=16, ndf=16, out_dir="runs/demo",
                      train_folds=[1, 2], test_folds=[3], tissue="Colon", save_every=0)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def add_device_args(p):
    g = p.add_argument_group("device and speed")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto picks CUDA when available (cuda:LOCAL_RANK under torchrun), else CPU")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="mixed precision: auto = bf16 on GPUs that support it and on CPUs with native bf16 "
                        "(AVX512-BF16/AMX), fp16 with gradient scaling on older GPUs, fp32 otherwise")
    g.add_argument("--channels-last", default=None, action=argparse.BooleanOptionalAction,
                   help="NHWC memory layout for convolutions; default: on with CUDA (tensor cores), off on CPU "
                        "(measured 3-8%% slower there: weights are copied between layouts every step)")
    g.add_argument("--compile", default=False, action=argparse.BooleanOptionalAction,
                   help="torch.compile the networks (falls back to eager if compilation fails)")
    g.add_argument("--workers", type=int, default=-1,
                   help="data-loader worker processes per process; -1 chooses from the core count")
    g.add_argument("--seed", type=int, default=SEED, help="seed for weights, data order and augmentation")


def add_model_args(p):
    g = p.add_argument_group("networks")
    g.add_argument("--ngf", type=int, default=NGF, help="generator width (filters in the first layer)")
    g.add_argument("--ndf", type=int, default=NDF, help="discriminator width (filters in the first layer)")
    g.add_argument("--norm", default=NORM, choices=["batch", "instance"], help="normalisation layers")
    g.add_argument("--dropout", default=True, action=argparse.BooleanOptionalAction,
                   help="dropout in the first three decoder blocks (pix2pix's noise source)")


def training_parser(dataset):
    """Options shared by train_pannuke.py and train_utp.py (and their _ddp twins)."""
    p = argparse.ArgumentParser(
        description=f"Train a mask-conditioned Pix2pix (U-Net generator + 70x70 PatchGAN) on {dataset}. "
                    "The same script runs on one device or under torchrun (see train_*_ddp.py).",
        formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    if dataset == "PanNuke":
        g.add_argument("--data-dir", default=PANNUKE_DIR,
                       help="PanNuke root holding 'Fold 1', 'Fold 2', 'Fold 3' (official release) or "
                            "train/ and test/ (converted layout)")
        g.add_argument("--train-folds", type=int, nargs="+", default=list(TRAIN_FOLDS), help="folds to train on")
        g.add_argument("--test-folds", type=int, nargs="+", default=list(TEST_FOLDS),
                       help="folds for the sample grids (and test.py)")
        g.add_argument("--tissue", default=TISSUE, help="one of PanNuke's 19 tissues, or 'all'")
        g.add_argument("--demo", action="store_true",
                       help="build a small PanNuke-format dataset from tissue shipped with scikit-image "
                            "(no download) under OUT/demo_data and train a small model on it: "
                            + ", ".join(f"{k}={v}" for k, v in DEMO_OVERRIDES.items()))
    else:
        g.add_argument("--data-dir", default=UTP_DIR, help="UniToPatho '800' folder (train.csv, test.csv, class folders)")
        g.add_argument("--masks-dir", default=UTP_MASKS_DIR,
                       help="masks root holding training/masks/ and test/masks/ (palette PNGs, same file names)")
        g.add_argument("--crop-size", type=int, default=CROP_SIZE, help="training crop size (a multiple of 256)")
        g.add_argument("--crops-per-image", type=int, default=CROPS_PER_IMAGE,
                       help="random crops taken from each decoded image per visit")
        g.add_argument("--crop-scheme", default="random", choices=["random", "fivecrop"],
                       help="random crops, or the original's FiveCrop (four corners + centre)")
        g.add_argument("--grade-only", default=False, action=argparse.BooleanOptionalAction,
                       help="train only on images with a dysplasia grade (grade >= 0), as the original did")
        g.add_argument("--cache-dir", default=None,
                       help="cache decoded images and masks as .npy here (memory-mapped on later epochs)")
    add_model_args(p)

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=EPOCHS, help="total epochs to reach (also when resuming)")
    g.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="batch size per process")
    g.add_argument("--lr", type=float, default=LEARNING_RATE, help="Adam learning rate for G and D")
    g.add_argument("--beta1", type=float, default=BETAS[0], help="Adam beta1")
    g.add_argument("--beta2", type=float, default=BETAS[1], help="Adam beta2")
    g.add_argument("--scale-lr", default=False, action=argparse.BooleanOptionalAction,
                   help="multiply the learning rate by the world size (linear scaling under DDP)")
    g.add_argument("--l1-lambda", type=float, default=L1_LAMBDA, help="weight of the L1 reconstruction loss")
    g.add_argument("--smooth-real", default=True, action=argparse.BooleanOptionalAction,
                   help="draw D's positive labels from --real-label-range instead of 1")
    g.add_argument("--smooth-fake", default=True, action=argparse.BooleanOptionalAction,
                   help="draw D's negative labels from --fake-label-range instead of 0")
    g.add_argument("--real-label-range", type=float, nargs=2, default=list(REAL_LABEL_RANGE), metavar=("LO", "HI"))
    g.add_argument("--fake-label-range", type=float, nargs=2, default=list(FAKE_LABEL_RANGE), metavar=("LO", "HI"))

    g = p.add_argument_group("outputs and resuming")
    g.add_argument("--out-dir", default=f"runs/{'pannuke' if dataset == 'PanNuke' else 'unitopatho'}",
                   help="run folder: checkpoints/, samples/, loss_curves.png, wandb/")
    g.add_argument("--resume", default=None, metavar="CKPT",
                   help="continue from a checkpoint (e.g. OUT/checkpoints/last.pt), same wandb run if any")
    g.add_argument("--save-every", type=int, default=SAVE_EVERY_EPOCHS,
                   help="also keep checkpoints/epoch_NNNN.pt every N epochs (0: only last.pt)")
    g.add_argument("--save-every-steps", type=int, default=0,
                   help="also refresh last.pt every N steps inside an epoch (0: at epoch ends only)")
    g.add_argument("--log-every", type=int, default=LOG_EVERY_STEPS,
                   help="steps between progress-bar/wandb loss updates (each one syncs the device)")
    g.add_argument("--num-samples", type=int, default=NUM_SAMPLES, help="rows in each epoch's sample grid")
    g.add_argument("--wandb", default="auto", choices=["auto", "online", "offline", "disabled"],
                   help="auto = online when WANDB_API_KEY or `wandb login` is configured, else offline")
    g.add_argument("--wandb-project", default=WANDB_PROJECT)
    g.add_argument("--wandb-entity", default=None)
    g.add_argument("--run-name", default=None, help="wandb run name")
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


def parse_training_args(dataset, argv=None):
    """Values come from, in rising priority: this file, --demo, the --resume checkpoint
    (RUN_OPTIONS, applied by train_utils when it reads the checkpoint), the command line."""
    parser = training_parser(dataset)
    args, _ = parser.parse_known_args(argv)
    if getattr(args, "demo", False):
        parser.set_defaults(**DEMO_OVERRIDES)
    args = parser.parse_args(argv)
    args.options_given = options_given(parser, argv)
    return args


def test_parser():
    p = argparse.ArgumentParser(
        description="Write synthetic H&E images for a test set from a trained generator checkpoint.",
        formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint file, or wandb:ENTITY/PROJECT/ARTIFACT:VERSION (needs an online account)")
    p.add_argument("--dataset", default="pannuke", choices=["pannuke", "unitopatho"])
    p.add_argument("--data-dir", default=None, help="dataset root (as for training)")
    p.add_argument("--test-folds", type=int, nargs="+", default=list(TEST_FOLDS), help="PanNuke folds to generate")
    p.add_argument("--tissue", default=TISSUE, help="PanNuke tissue, or 'all'")
    p.add_argument("--masks-dir", default=UTP_MASKS_DIR, help="UniToPatho masks root")
    p.add_argument("--split", default="test", choices=["test", "train"],
                   help="UniToPatho split to synthesise (train: extra training data for classify_utp.py)")
    p.add_argument("--out-dir", required=True, help="where synthetic images go")
    p.add_argument("--norm-mode", default="eval", choices=["eval", "train"],
                   help="eval: running BatchNorm statistics, no dropout (deterministic, independent of tiling "
                        "and batch); train: per-image statistics and dropout, as in the pix2pix paper")
    p.add_argument("--tile", action="store_true",
                   help="UniToPatho: generate in overlapping 256-px tiles blended with a smooth window "
                        "(bounded memory) instead of the whole padded image")
    p.add_argument("--tile-overlap", type=int, default=64, help="pixels shared by neighbouring tiles")
    p.add_argument("--batch-size", type=int, default=8, help="patches or tiles per forward pass")
    p.add_argument("--grids", type=int, default=16, help="mask | real | fake grid PNGs to write (0: none)")
    p.add_argument("--overwrite", action="store_true", help="regenerate images that already exist")
    add_device_args(p)
    return p
