r"""Does synthetic H&E help? One command asks three questions of any CoNIC-layout folder: do synthetic
images look real, do they follow their masks, and does adding them help a nucleus segmenter?

    python study.py --data-dir ../shared/data/lizard_128 --out-dir runs/study
    python study.py --data-dir data/conic --out-dir runs/study_full --full --device cuda
    python study.py --data-dir ../shared/data/lizard_128 --smoke                 # a tiny end-to-end check

The patches are split into train and test by source image. For each labelled fraction k (--fractions, percent
of the training split, whole source images where possible) a GAN (the training scripts' default) learns from the k%
labelled tiles alone and paints synthetic tiles from (a) those masks and (b) new layouts made from them
(dataset/layouts.py). A nucleus segmenter is then trained three times per seed, with the same seed, schedule and
--segmenter-steps: on the k% real tiles, on those plus the synthetic ones, and on the synthetic ones alone
(TSTR); all are scored on the real test tiles (Dice and panoptic quality), and the gain of adding synthetic
tiles is a paired difference over the seeds with its 95% interval. Realism and mask fidelity use the GAN of
the largest k on the test masks: C2ST, the domain Fréchet and kernel distances and precision/recall/density/
coverage (in the pooled encoder features of a reference segmenter trained on all real training tiles; not
FID/KID), each beside its real-vs-real floor and beside real tiles degraded in known ways (blur, JPEG, stain
shift), and that segmenter's Dice on the synthetic test tiles beside its Dice on the real ones.
Nothing is downloaded.

Each stage writes its outputs and a done.json marker into its folder of S (--out-dir):
    split/                         S/split.csv (train/test), S/k<k>/split.csv (train = the k% labelled tiles)
    reference/                     segmenter.pt, trained on all real training tiles: the ceiling
    k<k>/gan/                      train_conic.py's run (checkpoints/last.pt, samples/), epochs fitted to the budget
    k<k>/synthetic_a/, _b/         CoNIC folders: the labelled masks repainted (a), new layouts painted (b)
    k<k>/augment/<pool>_s<seed>/   test scores of a segmenter trained on real, real + synthetic or synthetic tiles
    realism/                       synthetic_test/ (the test masks painted), grid.png, realism and fidelity
then S/metrics.json, S/timings.json (seconds per stage), S/report.html, S/dice_vs_fraction.png and a table on
stdout. A re-run skips finished stages and resumes an interrupted GAN or segmenter from its last save, so a killed
study continues where it stopped; SIGTERM or Ctrl-C stops it with status 143. S/.run.json (its manifest) records
the options; a re-run with other options is refused unless --overwrite, which first deletes what the earlier study
wrote.

To compare GANs (every GAN option of the training scripts: --generator, --discriminator, --ema-half-life,
--d-augment, ...) at equal budget, run one study, then the others with --reference-from <that study>: they
copy its reference stage, so one segmenter judges them all and every study trains its segmenters for the same
steps. compare_studies.py puts them in one table and one grid.
"""
import json
import sys
import time

from loop import StopRequest
from quality import render
from quality.options import check_reference_source, claim_out_dir, parse_args, study_options
from quality.results import collect
from quality.stages import Study, open_data, run_stages
from utils import atomic_save_text, run_main


@run_main
def main(argv=None):
    started = time.perf_counter()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parse_args(argv, __doc__)
    names = open_data(args.data_dir)
    options = study_options(args)
    check_reference_source(args, options)
    # SIGTERM/Ctrl-C: the running stage saves and the study exits 143.
    with StopRequest() as stop, claim_out_dir(args, options) as folder:
        study = Study(args, folder.path, names, stop)
        result = collect(study, run_stages(study), argv, options)
        render.plot_dice(study.out / "dice_vs_fraction.png", result)
        result["seconds"]["this_run_total"] = round(time.perf_counter() - started, 2)
        atomic_save_text(study.out / "metrics.json", json.dumps(result, indent=1, allow_nan=False))
        # Where the time goes, stage by stage (also in metrics.json and the report).
        atomic_save_text(study.out / "timings.json", json.dumps(result["seconds"], indent=1))
        render.write_report(study.out / "report.html", result, study.out)
    render.print_table(result)
    print(f"wrote {study.out / 'metrics.json'} and {study.out / 'report.html'}")


if __name__ == "__main__":
    main()
