"""S/metrics.json: the stages' markers arranged by question, with mean and sd over seeds, the command,
the machine, the budget and the times."""
import os
import platform
import shlex

import numpy as np
import torch

import metrics
from dataset.masks import CONIC
from quality.stages import POOLS, augment_name, curve_name, ratio


def mean_sd(values):
    values = [v for v in values if v is not None]
    return {"mean": float(np.mean(values)) if values else None,
            "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None, "n": len(values)}


def compare(runs, value):
    """For value(test scores): mean and sd over seeds per pool; the paired (same seed) difference real+synthetic
    - real with its sd and 95% t-interval (metrics.paired_difference); and train-on-synthetic, test-on-real as
    the ratio of the synthetic-only mean to the real-only mean."""
    per_pool = {pool: [value(r["test"]) for r in runs[pool]] for pool in POOLS}
    real, mixed = per_pool["real"], per_pool["real+synthetic"]
    differences = [b - a for a, b in zip(real, mixed) if a is not None and b is not None]
    stats = {pool: mean_sd(v) for pool, v in per_pool.items()}
    return {**stats, "difference": {**mean_sd(differences), **metrics.paired_difference(mixed, real)},
            "tstr_ratio": ratio(stats["synthetic"]["mean"], stats["real"]["mean"])}


SUMMARY = {"nuclei_dice": lambda s: s["dice"]["Nuclei"], "mean_dice_types": lambda s: s["mean_dice_types"],
           "nuclei_pq": lambda s: s["pq"]["Nuclei"], "mpq": lambda s: s["mpq"]}


def augmentation_summary(runs):
    return {"runs": runs, "summary": {name: compare(runs, value) for name, value in SUMMARY.items()},
            "per_class_dice": {c: compare(runs, lambda s, c=c: s["dice"][c]) for c in CONIC.class_names[1:]}}


def machine(study):
    cuda = study.device.type == "cuda"
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "device": str(study.device),
            "gpu": torch.cuda.get_device_name(study.device) if cuda else None, "precision": study.precision}


def collect(study, done, argv, options):
    """metrics.json's content from `done`, the markers of run_stages."""
    args, reference = study.args, done["reference"]
    return {
        "command": shlex.join(["python", "study.py", *argv]), "options": options | {"seeds_used": study.seeds},
        "machine": machine(study),
        "budget": {"gan_minutes": args.budget_minutes, "segmenter_step_seconds": reference["step_seconds"],
                   "segmenter_steps": reference["steps"]},
        "seconds": {name: marker["seconds"] for name, marker in done.items()},
        "split": done["split"], "reference": reference,
        "gan": {f"{k:g}": done[f"k{k:g}/gan"] for k in args.fractions},
        "synthetic": {f"{k:g}": {s: done[f"k{k:g}/synthetic_{s}"] for s in "ab"} for k in args.fractions},
        "augmentation": {f"{k:g}": augmentation_summary(
            {pool: [done[augment_name(k, pool, seed)] for seed in study.seeds] for pool in POOLS})
            for k in args.fractions},
        "realism": done["realism"],
        "learning_curve": learning_curve(study, done),
    }


def learning_curve(study, done):
    """--learning-curve: nucleus Dice of the real-only segmenter per step count (mean and sd over seeds), and
    the smallest count below the largest whose mean is within the largest count's seed spread (sd) of its mean:
    where the curve has flattened (None when no smaller count is, or without the option)."""
    counts = sorted(study.args.learning_curve or ())
    if not counts:
        return None
    points = {steps: mean_sd([done[curve_name(steps, seed)]["test"]["dice"]["Nuclei"] for seed in study.seeds])
              for steps in counts}
    last = points[counts[-1]]
    flat = next((s for s in counts[:-1] if last["sd"] is not None and points[s]["mean"] is not None
                 and abs(points[s]["mean"] - last["mean"]) <= last["sd"]), None)
    return {"nuclei_dice": {str(s): p for s, p in points.items()}, "flattened_at": flat}
