"""Compare GANs: quality studies (study.py) that differ only in the GAN, side by side.

    python compare_studies.py runs/study_combos/pix2pix runs/study_combos/spade_multiscale --out-dir runs/compare

Prints one Markdown table, a row per study: the GAN (generator, upsampling,
discriminator, and every other option that differs from its default), its parameters
and speed, realism (the two C2STs, the domain Fréchet and kernel distances, precision
and recall, each with its real-vs-real floor), mask fidelity, diversity, and at the
smallest labelled fraction the augmentation gain and the train-on-synthetic ratio. Writes the
table to OUT/compare.md and OUT/grid.png: the same held-out test masks (those with
the most nuclei), as mask | real | each study's painting, in the table's order.

The studies must share everything but the GAN and its --gan-seed (data, split,
fractions, seeds, budget, segmenters) and one reference segmenter, the judge of
realism and fidelity whose step counts every segmenter of a study follows: make the first study, then the
others with `study.py --reference-from FIRST`. Otherwise the table would not compare
like with like, and the script says what differs.
"""
import argparse
import hashlib
import json
from pathlib import Path

import numpy as np

import config
from dataset.conic import most_nuclei_first, open_conic
from dataset.masks import CONIC, labels_to_rgb
from gan import describe, parameter_counts, read_checkpoint
from quality.options import GAN_OPTIONS, STUDY_OPTIONS
from quality.options import parser as study_parser
from quality.render import pm
from report import fmt, grid
from utils import UserError, atomic_save_png, atomic_save_text, run_main

GRID_ROWS = 4
OUTPUTS = ("compare.md", "grid.png")
DEFAULTS = study_parser().parse_args([])  # for options an older study did not record


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=config.HelpFormatter)
    p.add_argument("studies", nargs="+", type=Path, help="study folders (study.py --out-dir), two or more")
    p.add_argument("--out-dir", type=Path, default=Path("runs/compare"), help="where compare.md and grid.png go")
    p.add_argument("--grid-rows", type=int, default=GRID_ROWS, help="test masks in the grid")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier comparison in --out-dir")
    return p


def read_study(folder):
    """(options with study.py's defaults for those an older study did not record, metrics.json)."""
    path = folder / "metrics.json"
    if not path.is_file():
        raise UserError(f"{path} not found: give a finished study's folder (study.py --out-dir)")
    try:
        metrics = json.loads(path.read_text())
        recorded = config.fill_legacy(metrics["options"], model=False)
        options = {name: recorded.get(name, getattr(DEFAULTS, name, None)) for name in STUDY_OPTIONS}
        options["data_dir"] = metrics["options"]["data_dir"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is not a study's metrics.json ({exc})") from None
    return options, metrics



def check_comparable(studies):
    """Only GAN_OPTIONS may differ between the studies, and one reference segmenter judged them all."""
    shared = [name for name in (*STUDY_OPTIONS, "data_dir")
              if name not in (*GAN_OPTIONS, "gan_seed", "reference_from")]
    first, (base, _) = studies[0]
    for folder, (options, _) in studies[1:]:
        differ = [f"{name} {base[name]} in {first}, {options[name]} in {folder}" for name in shared
                  if options[name] != base[name]]
        if differ:
            raise UserError(f"these studies differ in more than the GAN ({'; '.join(differ)}); compare studies "
                            f"made with the same options but for {', '.join(GAN_OPTIONS)}")
    judges = {folder: hashlib.sha256((folder / "reference" / "segmenter.pt").read_bytes()).hexdigest()
              for folder, _ in studies}
    if len(set(judges.values())) > 1:
        other = next(folder for folder, judge in judges.items() if judge != judges[first])
        raise UserError(f"{first} and {other} were judged by different reference segmenters; make the other "
                        f"studies with study.py --reference-from {first}, so that one segmenter judges them all")


def c2st_cell(side, name):
    """A C2ST accuracy, or '-' for a study made before that score existed."""
    return fmt(side.get(name) and side[name]["accuracy"])


def interval(score):
    """' [lo, hi]', a score's 95% interval, or '' where the study has none."""
    return f" [{fmt(score['ci95'][0])}, {fmt(score['ci95'][1])}]" if score and score.get("ci95") else ""


def row(folder, options, metrics):
    """The table's cells for one study."""
    realism, k_small = metrics["realism"], f"{min(options['fractions']):g}"
    gan = metrics["gan"][realism["gan"]]
    counts = parameter_counts(read_checkpoint(folder / gan["checkpoint"])["model_config"])
    synthetic, floor = realism["synthetic"], realism["real_vs_real"]
    fidelity = realism["mask_fidelity"]
    diversity = realism.get("diversity", {}).get("mean_pairwise_feature_distance")
    speed = realism.get("tiles_per_second")
    usefulness = metrics["augmentation"][k_small]["summary"]["nuclei_dice"]
    prdc, floor_prdc = synthetic.get("prdc", {}), floor.get("prdc", {})
    name = describe(options) + ("" if options["gan_seed"] is None else f", --gan-seed {options['gan_seed']}")
    return [folder.name, name, f"{counts['generator'] / 1e6:.2f}M / {counts['discriminator'] / 1e6:.2f}M",
            str(gan["steps"]), f"{gan['steps'] / gan['train_seconds']:.2f}", fmt(speed, 1),
            f"{c2st_cell(synthetic, 'feature_c2st')}{interval(synthetic.get('feature_c2st'))} "
            f"({c2st_cell(floor, 'feature_c2st')})",
            f"{fmt(synthetic['c2st']['accuracy'])} ({fmt(floor['c2st']['accuracy'])})",
            f"{fmt(synthetic['domain_frechet_distance'], 2)} ({fmt(floor['domain_frechet_distance'], 2)})",
            f"{fmt(synthetic['domain_kernel_distance']['mean'], 4)} ({fmt(floor['domain_kernel_distance']['mean'], 4)})",
            f"{fmt(prdc.get('precision'))} / {fmt(prdc.get('recall'))} "
            f"({fmt(floor_prdc.get('precision'))} / {fmt(floor_prdc.get('recall'))})",
            f"{fmt(fidelity['synthetic']['dice']['Nuclei'])} ({fmt(fidelity['ratio']['nuclei_dice'], 2)})",
            fmt(diversity), pm(usefulness["difference"], signed=True), fmt(usefulness.get("tstr_ratio"), 2)]


def markdown_table(studies):
    k_big, k_small = (f"{f(studies[0][1][0]['fractions']):g}" for f in (max, min))
    header = ["study", "GAN", "parameters G / D", f"GAN steps (k={k_big}%)", "GAN steps/s", "painted tiles/s",
              "C2ST in features (floor)", "C2ST on pixels (floor)", "domain Fréchet distance (floor)",
              "domain kernel distance (floor)", "precision / recall (floor)",
              "nucleus Dice on synthetic (ratio to real)",
              "diversity", f"nucleus Dice gain at k={k_small}%", f"TSTR ratio at k={k_small}%"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row(folder, *record)) + " |" for folder, record in studies]
    return "\n".join(lines)


def comparison_grid(studies, rows):
    """mask | real | each study's painting of the test masks with the most nuclei."""
    paintings = [open_conic(folder / "realism" / "synthetic_test") for folder, _ in studies]
    names = paintings[0][2]
    if any(p[2] != names for p in paintings[1:]):
        raise UserError("the studies painted different test tiles (realism/synthetic_test); were they split alike?")
    data_dir = studies[0][1][0]["data_dir"]
    real_images, _, real_names = open_conic(data_dir)
    where = {name: i for i, name in enumerate(real_names)}
    missing = [n for n in names if n not in where]
    if missing:
        raise UserError(f"{data_dir} lacks the test tiles the studies painted (first: {missing[0]})")
    classes = np.asarray(paintings[0][1][..., 1])
    most_nuclei = most_nuclei_first(classes)[:rows]
    return grid([[labels_to_rgb(classes[i], CONIC), np.asarray(real_images[where[names[i]]])]
                 + [np.asarray(images[i]) for images, _, _ in paintings] for i in most_nuclei])


@run_main
def main(argv=None):
    args = parser().parse_args(argv)
    if len(args.studies) < 2:
        raise UserError("give two or more study folders to compare")
    if args.grid_rows < 1:
        raise UserError(f"--grid-rows must be at least 1, got {args.grid_rows}")
    if not args.overwrite and any((args.out_dir / name).exists() for name in OUTPUTS):
        raise UserError(f"{args.out_dir} already holds a comparison; give --overwrite to replace it, or a new --out-dir")
    studies = [(folder, read_study(folder)) for folder in args.studies]
    check_comparable(studies)
    table = markdown_table(studies)
    options = studies[0][1][0]
    columns = " | ".join(["mask", "real", *(folder.name for folder, _ in studies)])
    atomic_save_png(comparison_grid(studies, args.grid_rows), args.out_dir / "grid.png")
    atomic_save_text(args.out_dir / "compare.md",
                     f"Studies of {options['data_dir']} at {options['budget_minutes']:g} min per GAN, fractions "
                     f"{', '.join(f'{k:g}%' for k in options['fractions'])}, {options['seeds']} seeds.\n\n{table}\n\n"
                     f"grid.png: {columns}\n")
    print(table)
    print(f"wrote {args.out_dir / 'compare.md'} and {args.out_dir / 'grid.png'} ({columns})")


if __name__ == "__main__":
    main()
