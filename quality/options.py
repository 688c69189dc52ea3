"""The study's command line, its presets, and which options make two studies the same study."""
import argparse
import json
from pathlib import Path

import config
from config import (STUDY_BUDGET_MINUTES, STUDY_C2ST_EPOCHS, STUDY_FRACTIONS, STUDY_GAN_WIDTH, STUDY_LAYOUTS_PER_TILE,
                    STUDY_OUT_DIR, STUDY_RARE_CLASS_WEIGHT, STUDY_RARE_SHARE, STUDY_SEEDS, STUDY_SEGMENTER_BATCH_SIZE,
                    STUDY_SEGMENTER_STEPS, STUDY_SEGMENTER_WIDTH)
from run_folder import RunFolder, input_paths
from utils import UserError

# Tiny networks run fastest on one thread, above all on a CPU other processes share.
SMOKE = dict(fractions=[50, 100], seeds=2, budget_minutes=0.05, segmenter_steps=4, ngf=8, ndf=8, segmenter_width=8,
             c2st_epochs=2,
             threads=1, out_dir="runs/study_smoke")
FULL = dict(budget_minutes=30.0, ngf=64, ndf=64, segmenter_width=32, segmenter_batch_size=16)
# What makes two studies the same study (S/.run.json, its manifest); device and speed options are not among them.
# Studies that differ in GAN_OPTIONS alone compare GANs at equal budget (compare_studies.py). The study
# takes every GAN option the training scripts take (config.GAN_OPTIONS), with narrower networks by default.
GAN_OPTIONS = tuple(option.name for option in config.GAN_OPTIONS)
GAN_DEFAULTS = {"ngf": STUDY_GAN_WIDTH, "ndf": STUDY_GAN_WIDTH}
STUDY_OPTIONS = ("fractions", "seeds", "seed", "gan_seed", "test_fraction", "budget_minutes", *GAN_OPTIONS,
                 "segmenter_steps",
                 "learning_curve", "segmenter_width",
                 "segmenter_batch_size", "synthetic", "layouts_per_tile", "rare_class_weight", "c2st_epochs",
                 "reference_from")
# What a reference stage depends on: a study may copy another's when these agree (--reference-from).
REFERENCE_OPTIONS = ("data_dir", "seed", "test_fraction", "segmenter_steps", "segmenter_width", "segmenter_batch_size")


def parser(doc=""):
    """The study's options; `doc` (study.py's docstring) gives --help its description and epilogue."""
    description, _, epilog = doc.partition("\n\n")
    p = argparse.ArgumentParser(description=description, epilog=epilog, formatter_class=config.HelpFormatter)
    g = p.add_argument_group("data and outputs")
    g.add_argument("--data-dir", default=config.CONIC_DIR,
                   help="CoNIC-layout folder: images.npy, labels.npy, patch_info.csv (square tiles)")
    g.add_argument("--out-dir", default=STUDY_OUT_DIR, help="the study folder S (see above)")
    g.add_argument("--overwrite", action="store_true",
                   help="delete the study already in --out-dir and start afresh (needed when its options differ)")
    g.add_argument("--reference-from", default=None, metavar="S0",
                   help="copy the reference stage of study S0 (same data, split, budget and segmenter options) "
                        "instead of training one: the same judge of realism and fidelity, and the same segmenter "
                        "step counts, so that studies differing only in the GAN compare like with like "
                        "(compare_studies.py requires it)")
    g.add_argument("--test-fraction", type=float, default=config.CONIC_TEST_FRACTION,
                   help="share of patches held out for testing, whole source images at a time")
    g = p.add_argument_group("design")
    g.add_argument("--fractions", type=float, nargs="+", default=list(STUDY_FRACTIONS),
                   help="labelled fractions k, in percent of the training split")
    g.add_argument("--seeds", type=int, default=STUDY_SEEDS,
                   help="segmenter seeds (--seed, --seed + 1, ...) per fraction and pool; mean and sd are over them")
    g.add_argument("--gan-seed", type=int, default=None,
                   help="seed of the GAN's training (its weights, data order and augmentation; default: --seed); "
                        "studies that differ only in it show how far a GAN's scores move between training runs")
    g.add_argument("--synthetic", default="ab", choices=["a", "b", "ab"],
                   help="synthetic tiles added to the real ones: (a) the labelled masks repainted, (b) new layouts")
    g.add_argument("--layouts-per-tile", type=float, default=STUDY_LAYOUTS_PER_TILE,
                   help="new layouts (b) made per labelled tile")
    g.add_argument("--rare-class-weight", type=float, default=STUDY_RARE_CLASS_WEIGHT,
                   help=f"new layouts draw the pasted nuclei of rare classes (under {STUDY_RARE_SHARE * 100:g}%% of "
                        f"the labelled nuclei) this many times as often as the others")
    g = p.add_argument_group("budget and segmenters")
    g.add_argument("--budget-minutes", type=float, default=STUDY_BUDGET_MINUTES,
                   help="training time per GAN; its epochs follow from the first epoch's time")
    g.add_argument("--segmenter-steps", type=int, default=STUDY_SEGMENTER_STEPS,
                   help="Adam steps of every segmenter (the reference and each augmentation run), whatever the GAN "
                        "budget")
    g.add_argument("--learning-curve", type=int, nargs="+", default=None, metavar="STEPS",
                   help="also train the real-only segmenter on all real training tiles for each of these step "
                        "counts (every seed) and report its test Dice against steps: the curve --segmenter-steps "
                        "is chosen from")
    g.add_argument("--segmenter-width", type=int, default=STUDY_SEGMENTER_WIDTH, help="U-Net segmenter width")
    g.add_argument("--segmenter-batch-size", type=int, default=STUDY_SEGMENTER_BATCH_SIZE, help="segmenter batch size")
    g.add_argument("--c2st-epochs", type=int, default=STUDY_C2ST_EPOCHS, help="epochs of each C2ST classifier")
    g.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0: torch's default); 1 is far faster on a CPU other jobs share")
    presets = g.add_mutually_exclusive_group()
    presets.add_argument("--smoke", action="store_true",
                         help="a tiny study for tests (given flags still win): "
                              + ", ".join(f"{k}={v}" for k, v in SMOKE.items()))
    presets.add_argument("--full", action="store_true",
                         help="GPU schedules (given flags still win): " + ", ".join(f"{k}={v}" for k, v in FULL.items()))
    config.add_gan_args(p, defaults=GAN_DEFAULTS)
    config.add_device_args(p)
    return p


def parse_args(argv, doc=""):
    """Options in rising priority: config.py's defaults, the --smoke or --full preset, the command line."""
    p = parser(doc)
    args = p.parse_args(argv)
    if args.smoke or args.full:
        p.set_defaults(**(SMOKE if args.smoke else FULL))
        args = p.parse_args(argv)
    bad = [k for k in args.fractions if not 0 < k <= 100]
    if bad:
        raise UserError(f"--fractions are percentages of the training split, in (0, 100]; got {bad[0]:g}")
    args.fractions = sorted({float(k) for k in args.fractions})
    config.check_gan_options(args)
    config.check_option_ranges(args, {"seeds": 1, "segmenter_steps": 1, "segmenter_width": 1,
                                      "segmenter_batch_size": 1, "c2st_epochs": 1, "threads": 0},
                               positive=("budget_minutes", "layouts_per_tile", "rare_class_weight"))
    if not 0 < args.test_fraction < 1:
        raise UserError(f"--test-fraction must be between 0 and 1 (exclusive), got {args.test_fraction}")
    return args


def study_options(args):
    """What S/.run.json records (paths resolved, so that a study can be found from anywhere)."""
    options = {name: getattr(args, name) for name in STUDY_OPTIONS} | {"data_dir": str(Path(args.data_dir).resolve())}
    if args.reference_from:
        options["reference_from"] = str(Path(args.reference_from).resolve())
    return options


# Study options newer than some studies, at the values those studies ran with.
STUDY_LEGACY = {"gan_seed": None}


def recorded_study_options(options):
    """A study's recorded options, with options newer than the study at the values it ran with."""
    return config.fill_legacy(STUDY_LEGACY | options, model=False)


def recorded_options(record):
    """The options in a study's manifest (S/.run.json; S/study.json before manifests), as recorded_study_options
    reads them."""
    return recorded_study_options(json.loads(record.read_text())["options"])


def check_reference_source(args, options):
    """--reference-from S0: a study whose reference stage has finished, made with the same REFERENCE_OPTIONS."""
    if not args.reference_from:
        return
    source = Path(args.reference_from)
    record, marker = source / ".run.json", source / "reference" / "done.json"
    if not record.is_file() or not marker.is_file():
        raise UserError(f"--reference-from {source}: no finished reference stage there ({marker} not found)")
    if source.resolve() == Path(args.out_dir).resolve():
        raise UserError(f"--reference-from {source} is this study's own --out-dir; give another study")
    saved = recorded_options(record)
    differ = [f"{name} {saved.get(name)} there, {options[name]} here" for name in REFERENCE_OPTIONS
              if saved.get(name) != options[name]]
    if differ:
        raise UserError(f"--reference-from {source}: its reference was made with other options ({'; '.join(differ)})")


def claim_out_dir(args, options):
    """S, claimed for this study (run_folder.RunFolder; a context manager holding its lock): a
    study made with other options is refused, and --overwrite deletes what that study wrote
    before starting afresh. The manifest, S/.run.json, records the options (--reference-from
    reads them)."""
    # A study from before manifests kept its options in S/study.json: the same options continue it.
    legacy = Path(args.out_dir) / "study.json"
    adopt = legacy.is_file() and recorded_options(legacy) == recorded_study_options(options)
    return RunFolder.claim(args.out_dir, "study.py", options, inputs=input_paths(args), overwrite=args.overwrite,
                           read_options=recorded_study_options, adopt=adopt)
