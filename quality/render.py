"""A finished study for people: S/report.html, S/dice_vs_fraction.png and the table on stdout, all made
from metrics.json's content (quality.results.collect)."""
import html

import numpy as np

from config import STUDY_PAINT_BATCH
from dataset.masks import CONIC
from quality.stages import POOLS, ratio
from report import data_uri, fmt, table
from utils import atomic_save_figure, atomic_save_text

SUMMARY_NAMES = {"nuclei_dice": "nucleus Dice", "mean_dice_types": "mean Dice (types)", "nuclei_pq": "PQ", "mpq": "mPQ"}


def pm(stat, signed=False):
    """mean±sd of a results.mean_sd dict as text; a paired difference as mean [95% interval]."""
    if stat["mean"] is None:
        return "n/a"
    text = f"{stat['mean']:+.3f}" if signed else f"{stat['mean']:.3f}"
    if stat.get("ci95"):
        return text + f" [{stat['ci95'][0]:+.3f}, {stat['ci95'][1]:+.3f}]"
    return text + (f"±{stat['sd']:.3f}" if stat["sd"] is not None else "")


def verdict(difference):
    """Whether a paired difference's 95% interval settles its sign, in words."""
    if not difference.get("ci95"):
        return "too few seeds for an interval"
    if not difference["excludes_zero"]:
        return "no effect shown: the 95% interval includes 0"
    return "helps: the 95% interval lies above 0" if difference["mean"] > 0 else "hurts: the 95% interval lies below 0"


def plot_dice(path, result):
    """Nucleus Dice on the real test tiles against the labelled fraction, with and without synthetic tiles
    (error bars: sd over seeds), and the reference segmenter's as the ceiling."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = [float(k) for k in result["augmentation"]]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for pool, style in zip(POOLS, ("o-", "s--", "^:")):
        stats = [a["summary"]["nuclei_dice"][pool] for a in result["augmentation"].values()]
        ax.errorbar(fractions, [np.nan if s["mean"] is None else s["mean"] for s in stats],
                    yerr=[s["sd"] or 0 for s in stats], fmt=style, capsize=3, label=pool)
    ceiling = result["reference"]["test"]["dice"]["Nuclei"]
    if ceiling is not None:
        ax.axhline(ceiling, color="grey", linestyle=":", label="all real training tiles")
    ax.set_xscale("log")
    ax.set_xticks(fractions, [f"{k:g}%" for k in fractions])
    ax.minorticks_off()
    ax.set_xlabel("labelled fraction of the training split")
    ax.set_ylabel("nucleus Dice on real test tiles")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_save_figure(fig, path)


LADDER = ("ladder_blur", "ladder_jpeg", "ladder_stain")
LADDER_NAMES = {"ladder_blur": "real, blurred (σ 1)", "ladder_jpeg": "real, JPEG 30", "ladder_stain": "real, stain shift"}


def realism_rows(result):
    """(score, real vs synthetic, real vs each degraded rung of the ladder, real vs real) rows, as text."""
    r = result["realism"]
    sides = [r[side] for side in ("synthetic", *(rung for rung in LADDER if rung in r), "real_vs_real")]

    def prdc(key):
        return [fmt(s["prdc"] and s["prdc"][key]) for s in sides]

    return [["C2ST in the judge segmenter's features (0.5: indistinguishable)",
             *(fmt(s.get("feature_c2st") and s["feature_c2st"]["accuracy"]) for s in sides)],
            ["C2ST on pixels (sees any lost detail)", *(fmt(s["c2st"] and s["c2st"]["accuracy"]) for s in sides)],
            ["domain Fréchet distance", *(fmt(s["domain_frechet_distance"], 4) for s in sides)],
            ["domain kernel distance", *(fmt(s["domain_kernel_distance"]["mean"], 4) for s in sides)],
            ["precision (looks real)", *prdc("precision")], ["density", *prdc("density")],
            ["recall (covers real variety)", *prdc("recall")], ["coverage", *prdc("coverage")],
            [f"diversity ({r['diversity']['samples_per_mask']} paintings per mask, 0: identical)",
             fmt(r["diversity"]["mean_pairwise_feature_distance"], 4), *[fmt(None)] * (len(sides) - 1)]]


def realism_columns(result):
    return ["score", "real vs synthetic", *(LADDER_NAMES[rung] for rung in LADDER if rung in result["realism"]),
            "real vs real (floor)"]


def augmentation_section(result, folder):
    aug, ref, steps = result["augmentation"], result["reference"], result["budget"]["segmenter_steps"]
    columns = [(m, p) for m in ("nuclei_dice", "nuclei_pq", "mpq") for p in (*POOLS, "difference")]
    rows = [[f"{k}%", a["runs"]["real"][0]["tiles"], a["runs"]["real+synthetic"][0]["tiles"]]
            + [pm(a["summary"][m][p], p == "difference") for m, p in columns]
            + [fmt(a["summary"]["nuclei_dice"]["tstr_ratio"], 2), verdict(a["summary"]["nuclei_dice"]["difference"])]
            for k, a in aug.items()]
    per_class = [[f"{k}%", c, *(pm(s[p], p == "difference") for p in (*POOLS, "difference"))]
                 for k, a in aug.items() for c, s in a["per_class_dice"].items()]
    sources = html.escape(", ".join(result["options"]["synthetic"]))
    return (f"<h2>1. Does adding synthetic tiles help a nucleus segmenter?</h2><p>For each labelled fraction and "
            f"seed, one segmenter is trained for {steps['augment']} steps on the labelled real tiles, one on "
            f"their synthetic tiles alone (TSTR), and one on the real plus the synthetic tiles (sources {sources}); "
            f"all are scored on the {result['split']['test']['tiles']} real test tiles. Mean ± sd over the seeds; "
            f"the difference (real+synthetic - real) is paired by seed, with its 95% t-interval in brackets. "
            f"Ceiling, from all {ref['tiles']} real training tiles ({steps['reference']} steps): nucleus Dice "
            f"{fmt(ref['test']['dice']['Nuclei'])}, PQ {fmt(ref['test']['pq']['Nuclei'])}.</p>"
            + table(["labelled", "tiles", "tiles with synthetic"] + [f"{SUMMARY_NAMES[m]} {p}" for m, p in columns]
                    + ["TSTR: Dice synthetic-only / real-only", "nucleus Dice, real+synthetic vs real"], rows)
            + f"<img alt='nucleus Dice vs labelled fraction' src='{data_uri(path=folder / 'dice_vs_fraction.png')}'>"
            + "<h3>Dice per class</h3>" + table(["labelled", "class", *POOLS, "difference"], per_class))


def realism_section(result):
    r = result["realism"]
    return (f"<h2>2. Do synthetic tiles look real?</h2><p>The GAN of the largest fraction ({r['gan']}%) paints the "
            f"held-out test masks. Each score compares the real tiles of one half of the test masks "
            f"({r['halves'][0]} tiles) with the other half ({r['halves'][1]}), painted, or real for the floor. The "
            f"domain distances are taken in the reference segmenter's pooled encoder features; they are not "
            f"FID/KID. The ladder scores real test tiles degraded in known ways, to show where the generator sits "
            f"between real and clearly degraded.</p>" + table(realism_columns(result), realism_rows(result)))


def fidelity_section(result, folder):
    synthetic, real = result["realism"]["mask_fidelity"]["synthetic"], result["reference"]["test"]
    rows = [[f"Dice {n}", fmt(synthetic["dice"][n]), fmt(real["dice"][n]), fmt(ratio(synthetic["dice"][n], real["dice"][n]))]
            for n in ("Nuclei", *CONIC.class_names[1:])]
    rows.append(["PQ Nuclei", fmt(synthetic["pq"]["Nuclei"]), fmt(real["pq"]["Nuclei"]),
                 fmt(ratio(synthetic["pq"]["Nuclei"], real["pq"]["Nuclei"]))])
    return ("<h2>3. Do synthetic tiles follow their masks?</h2><p>The reference segmenter on the synthetic test "
            "tiles, against the masks they were painted from, and on the real ones (the ceiling).</p>"
            + table(["score", "synthetic", "real (ceiling)", "ratio"], rows)
            + "<h3>mask | real | synthetic (held-out test masks)</h3>"
            + f"<img alt='samples' src='{data_uri(path=folder / 'realism' / 'grid.png')}'>")


def training_section(result):
    gans = [[f"{k}%", g["tiles"], g["epochs"], g["steps"], f"{g['train_seconds']:.0f}",
             f"{g['parameters']['generator'] / 1e6:.2f}M / {g['parameters']['discriminator'] / 1e6:.2f}M"]
            for k, g in result["gan"].items()]
    realism = result["realism"]
    return ("<h2>Training and time</h2>"
            + table(["GAN (labelled)", "tiles", "epochs", "steps", "seconds", "parameters (G / D)"], gans)
            + f"<p>The GAN of {realism['gan']}% painted {realism['tiles_per_second']:.1f} test tiles/s "
              f"(batches of {STUDY_PAINT_BATCH}, loading included).</p>"
            + table(["stage", "seconds"], [[name, f"{s:.1f}"] for name, s in result["seconds"].items()]))


def curve_section(result):
    curve = result["learning_curve"]
    if curve is None:
        return ""
    rows = [[steps, pm(stat)] for steps, stat in curve["nuclei_dice"].items()]
    return (f"<h2>Segmenter learning curve</h2><p>The real-only segmenter on all real training tiles, scored on "
            f"the real test tiles (mean ± sd over the seeds). {flattening(curve)}; this study used "
            f"{result['options']['segmenter_steps']} steps.</p>" + table(["steps", "nucleus Dice"], rows))


def flattening(curve):
    longest = list(curve["nuclei_dice"])[-1]
    if curve["flattened_at"] is None:
        return f"Not flattened by {longest} steps: no shorter run is within the longest run's seed spread"
    return f"Flattened at {curve['flattened_at']} steps (within the seed spread of {longest} steps)"


def write_report(path, result, folder):
    m = result["machine"]
    head = (f"<h1>Synthetic H&amp;E study</h1><p><code>{html.escape(result['command'])}</code></p><p>"
            + html.escape(f"{m['platform']}, {m['cpus_usable']} CPU(s), torch {m['torch']}, {m['device']} "
                          f"({m['precision']}); {result['budget']['gan_minutes']:g} min per GAN") + ".</p>")
    body = head + augmentation_section(result, folder) + realism_section(result) + fidelity_section(result, folder) \
        + training_section(result) + curve_section(result)
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}")
    atomic_save_text(path, f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>study</title><style>{style}"
                           f"</style></head><body>{body}</body></html>")


def print_table(result):
    """The study in a few lines on stdout."""
    print(f"\n{'labelled':>8} {'tiles':>6}  {'nucleus Dice real':>17} {'real+synthetic':>15} "
          f"{'paired difference [95%]':>26}  {'TSTR ratio':>10}")
    for k, a in result["augmentation"].items():
        d = a["summary"]["nuclei_dice"]
        print(f"{k + '%':>8} {a['runs']['real'][0]['tiles']:>6}  {pm(d['real']):>17} {pm(d['real+synthetic']):>15} "
              f"{pm(d['difference'], True):>26}  {fmt(d['tstr_ratio'], 2):>10}  {verdict(d['difference'])}")
    ref, realism = result["reference"], result["realism"]
    print(f"ceiling (all {ref['tiles']} real training tiles): nucleus Dice {fmt(ref['test']['dice']['Nuclei'])}, "
          f"PQ {fmt(ref['test']['pq']['Nuclei'])}")
    print(f"realism (GAN {realism['gan']}%, {' vs '.join(map(str, realism['halves']))} test tiles; real vs real in "
          "brackets): " + ", ".join(f"{name} {syn} ({floor})" for name, syn, *_, floor in realism_rows(result)))
    fidelity = realism["mask_fidelity"]
    print(f"mask fidelity: nucleus Dice {fmt(fidelity['synthetic']['dice']['Nuclei'])} on synthetic test tiles, "
          f"{fmt(ref['test']['dice']['Nuclei'])} on real (ratio {fmt(fidelity['ratio']['nuclei_dice'])})")
    print(f"diversity: {fmt(realism['diversity']['mean_pairwise_feature_distance'])} (mean feature distance between "
          f"{realism['diversity']['samples_per_mask']} paintings of a mask)")
    if result["learning_curve"] is not None:
        curve = result["learning_curve"]
        print("segmenter learning curve (nucleus Dice, real-only, all training tiles): "
              + ", ".join(f"{steps} steps {pm(stat)}" for steps, stat in curve["nuclei_dice"].items())
              + f"; {flattening(curve)[0].lower()}{flattening(curve)[1:]}")
    gan = result["gan"][realism["gan"]]
    print(f"GAN {realism['gan']}%: {gan['steps']} steps, {gan['parameters']['generator'] / 1e6:.2f}M + "
          f"{gan['parameters']['discriminator'] / 1e6:.2f}M parameters (G + D), painting "
          f"{realism['tiles_per_second']:.1f} tiles/s")
