"""study.py: the --smoke study end to end on tiny CoNIC data (every field of metrics.json and
report.html, in under two minutes), a re-run that skips finished stages, a study killed while a
GAN trains that resumes it from its last.pt, the labelled k% split inside the training split and
apart from the test split, refusals as one line; metrics.panoptic_quality by hand; and the smoke
on real lizard_128 tiles when they are present."""
import contextlib
import json
import re
import shutil
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import vivid_checkpoint
from conic_fixtures import make_conic

import compare_studies
import config
import metrics
import study
from dataset.conic import CoNIC, open_conic, patch_source, read_split_file
from quality import options, stages
from segmenter import load_segmenter
from utils import UserError, atomic_save_text

LIZARD = Path(__file__).resolve().parents[2] / "shared" / "data" / "lizard_128"
NAMES = [f"src{s}-{i:04d}" for s in range(8) for i in range(3)]   # 8 source images of 3 tiles each
SMOKE_SECONDS = 120


@pytest.fixture(scope="module")
def tiny_conic(tmp_path_factory):
    """24 consistent 64-px patches from 8 source images."""
    root, _, _ = make_conic(tmp_path_factory.mktemp("conic") / "data", names=NAMES, size=64, n_nuclei=8)
    return root


def smoke_argv(data_dir, out_dir, *extra):
    return ["--data-dir", data_dir, "--out-dir", out_dir, "--smoke", "--device", "cpu", "--precision", "fp32",
            "--workers", "0", *extra]


# Rare classes oversampled; GAN options that must reach the GAN's run (the original pix2pix, not the default).
SMOKE_EXTRA = ("--rare-class-weight", "4", "--upsample", "transpose", "--discriminator", "patch", "--l1-lambda", "50",
               "--learning-curve", "2", "4")


@pytest.fixture(scope="module")
def smoke(tiny_conic, tmp_path_factory, run_script):
    """One --smoke study, with its stdout and wall time."""
    out = tmp_path_factory.mktemp("study") / "S"
    started = time.perf_counter()
    result = run_script("study.py", *smoke_argv(tiny_conic, out, *SMOKE_EXTRA), timeout=600)
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-4000:]
    return SimpleNamespace(out=out, stdout=result.stdout, seconds=seconds,
                           metrics=json.loads((out / "metrics.json").read_text()))


def lookup(tree, dotted):
    for key in dotted.split("."):
        assert isinstance(tree, dict) and key in tree, f"metrics.json lacks {dotted!r} (at {key!r})"
        tree = tree[key]
    return tree


# Fields of metrics.json that must hold a value (not None) after the smoke study.
FIELDS = ["command", "options.fractions", "options.seeds_used", "options.data_dir", "machine.platform",
          "machine.cpu_count", "machine.torch", "machine.device", "machine.precision", "budget.gan_minutes",
          "budget.segmenter_step_seconds", "budget.segmenter_steps.reference", "budget.segmenter_steps.augment",
          "seconds.split", "seconds.reference", "seconds.k50/gan", "seconds.k100/synthetic_b", "seconds.realism",
          "seconds.k50/augment/real_synthetic_s43", "seconds.this_run_total",
          "split.train.tiles", "split.test.tiles", "split.test.sources", "split.labelled.50.tiles",
          "reference.tiles", "reference.steps.reference", "reference.test.dice.Nuclei", "reference.test.iou.Nuclei",
          "reference.test.mean_dice_types", "reference.test.pq.Nuclei", "reference.test.mpq",
          "gan.50.tiles", "gan.50.epochs", "gan.50.steps", "gan.50.epoch_seconds", "gan.50.train_seconds",
          "gan.100.checkpoint", "synthetic.50.a.tiles", "synthetic.50.b.tiles", "synthetic.50.b.nuclei.Neutrophil",
          "synthetic.100.b.rare_classes", "realism.gan", "realism.tiles", "realism.halves",
          "realism.synthetic.c2st.accuracy", "realism.synthetic.c2st.ci95", "realism.real_vs_real.c2st.accuracy",
          "realism.synthetic.domain_frechet_distance", "realism.real_vs_real.domain_frechet_distance",
          "realism.synthetic.domain_kernel_distance.mean", "realism.real_vs_real.domain_kernel_distance.std",
          "realism.mask_fidelity.synthetic.dice.Nuclei", "realism.mask_fidelity.synthetic.pq.Nuclei",
          "realism.mask_fidelity.ratio.nuclei_dice",
          "realism.diversity.mean_pairwise_feature_distance", "realism.tiles_per_second",
          "gan.50.parameters.generator", "gan.100.parameters.discriminator", "gan.50.model_config.upsample"]
FIELDS += [f"augmentation.{k}.summary.{m}.{pool}.{s}" for k in ("50", "100")
           for m in ("nuclei_dice", "mean_dice_types", "nuclei_pq", "mpq")
           for pool in ("real", "real+synthetic", "difference") for s in ("mean", "sd")]
FIELDS += [f"augmentation.100.per_class_dice.Epithelial.{pool}.mean" for pool in ("real", "real+synthetic")]
# Issue "a judge we can trust": TSTR, paired intervals, PRDC, the calibration ladder, CoNIC's PQ statistics.
FIELDS += [f"augmentation.{k}.summary.nuclei_dice.{s}" for k in ("50", "100")
           for s in ("synthetic.mean", "difference.ci95", "difference.n", "difference.excludes_zero", "tstr_ratio")]
FIELDS += [f"realism.{side}.{score}" for side in ("synthetic", "real_vs_real", "ladder_blur", "ladder_jpeg",
                                                 "ladder_stain")
           for score in ("prdc.precision", "prdc.recall", "prdc.density", "prdc.coverage", "c2st.accuracy",
                         "domain_frechet_distance")]
FIELDS += ["reference.test.conic.pq", "reference.test.conic.mpq+", "options.segmenter_steps",
           "learning_curve.nuclei_dice.2.mean", "learning_curve.nuclei_dice.4.sd"]


def test_smoke_study_writes_every_field_in_time(smoke):
    assert smoke.seconds < SMOKE_SECONDS, f"the smoke study took {smoke.seconds:.0f} s"
    m = smoke.metrics
    missing = [f for f in FIELDS if lookup(m, f) is None]
    assert not missing, f"metrics.json fields without a value: {missing}"
    assert m["options"]["fractions"] == [50, 100] and m["options"]["seeds_used"] == [42, 43]
    assert "--smoke" in m["command"] and m["budget"]["gan_minutes"] == options.SMOKE["budget_minutes"]
    assert 0 <= m["realism"]["synthetic"]["c2st"]["accuracy"] <= 1
    # A ratio to a real score of 0 (a smoke reference may find no whole nucleus) has no value.
    real_pq, fidelity = m["reference"]["test"]["pq"]["Nuclei"], m["realism"]["mask_fidelity"]
    expected = fidelity["synthetic"]["pq"]["Nuclei"] / real_pq if real_pq else None
    assert fidelity["ratio"]["nuclei_pq"] == (pytest.approx(expected) if real_pq else None)
    gan = torch.load(smoke.out / "k50" / "gan" / "checkpoints" / "last.pt", weights_only=True)
    assert gan["model_config"]["upsample"] == m["gan"]["50"]["model_config"]["upsample"] == "transpose"
    assert gan["model_config"]["discriminator"] == "patch"
    assert gan["config"]["l1_lambda"] == 50
    assert m["gan"]["50"]["parameters"]["generator"] == sum(v.numel() for k, v in gan["generator"].items()
                                                            if not k.endswith(("running_mean", "running_var",
                                                                               "num_batches_tracked")))
    # The pair of a seed: same seed and steps, and the synthetic pool is larger by sources a + b.
    for k, aug in m["augmentation"].items():
        real, mixed, alone = aug["runs"]["real"], aug["runs"]["real+synthetic"], aug["runs"]["synthetic"]
        assert [r["seed"] for r in real] == [r["seed"] for r in mixed] == [r["seed"] for r in alone] == [42, 43]
        assert {r["steps"] for r in real + mixed + alone} == {options.SMOKE["segmenter_steps"]}
        synthetic = m["synthetic"][k]["a"]["tiles"] + m["synthetic"][k]["b"]["tiles"]
        assert all(b["tiles"] == a["tiles"] + synthetic for a, b in zip(real, mixed))
        assert all(s["tiles"] == synthetic for s in alone)
        difference = aug["summary"]["nuclei_dice"]["difference"]["mean"]
        means = [aug["summary"]["nuclei_dice"][p]["mean"] for p in ("real", "real+synthetic")]
        assert difference == pytest.approx(means[1] - means[0])
    # Outputs on disk, each CoNIC folder readable as one.
    out = smoke.out
    for path in ("split.csv", "k50/split.csv", "reference/segmenter.pt", "k50/gan/checkpoints/last.pt",
                 "realism/grid.png", "dice_vs_fraction.png", ".run.json", "timings.json"):
        assert (out / path).is_file(), path
    timings = json.loads((out / "timings.json").read_text())
    assert {"split", "reference", "realism", "this_run_total"} <= timings.keys() and all(s >= 0 for s in timings.values())
    for folder in ("k50/synthetic_a", "k50/synthetic_b", "k100/synthetic_b", "realism/synthetic_test"):
        images, labels, names = open_conic(out / folder, check_data=True)
        assert images.shape[1:] == (64, 64, 3) and len(names) == len(images) > 0
    assert len(open_conic(out / "k50" / "synthetic_a")[2]) == m["split"]["labelled"]["50"]["tiles"]


def test_smoke_report_and_table(smoke):
    page = (smoke.out / "report.html").read_text()
    for text in ("Does adding synthetic tiles help", "Do synthetic tiles look real", "follow their masks",
                 "domain Fréchet distance", "domain kernel distance", "C2ST in the judge segmenter", "C2ST on pixels",
                 "real vs real (floor)",
                 "Dice per class", "mask | real | synthetic", "data:image/png;base64,", "Training and time",
                 "python study.py"):
        assert text in page, text
    text = re.sub(r"src='data:[^']*'", "", page)
    assert "FID" not in text.replace("not FID/KID", ""), "the domain distances must not be called FID"
    lines = smoke.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if "nucleus Dice real" in line)
    assert lines[header + 1].split()[0] == "50%" and lines[header + 2].split()[0] == "100%"
    assert "±" in lines[header + 1]
    for text in ("ceiling (all", "realism (GAN 100%", "mask fidelity:", "diversity:", "GAN 100%:", "wrote "):
        assert any(line.startswith(text) for line in lines), text


def test_labelled_split_is_inside_train_and_apart_from_test(smoke):
    names = NAMES
    train, test = read_split_file(smoke.out / "split.csv", names)
    assert len(train) + len(test) == len(names) and not set(train) & set(test)
    assert not {patch_source(names[i]) for i in train} & {patch_source(names[i]) for i in test}
    previous = set()
    for k in (50, 100):
        labelled, held_out = read_split_file(smoke.out / f"k{k}" / "split.csv", names)
        assert set(labelled) <= set(train) and not set(labelled) & set(test)
        assert np.array_equal(held_out, test)
        assert previous <= set(labelled), "a smaller fraction's tiles are all in the larger fraction's"
        previous = set(labelled)
    assert len(read_split_file(smoke.out / "k50" / "split.csv", names)[0]) == round(0.5 * len(train))
    assert previous == set(train)


def test_labelled_subsets_take_whole_sources_nested_and_seeded():
    sizes = [7, 5, 4, 3, 3, 2, 1]
    names = [f"s{s}-{i:03d}" for s, n in enumerate(sizes) for i in range(n)]
    train = np.arange(len(names))
    subsets = stages.labelled_subsets(names, train, [10, 40, 100], seed=1)
    assert [len(subsets[k]) for k in (10, 40, 100)] == [config.STUDY_MIN_LABELLED_TILES, 10, 25]
    assert set(subsets[10]) <= set(subsets[40]) <= set(subsets[100]) == set(train)
    for k in (10, 40):
        taken = {}
        for i in subsets[k]:
            taken[patch_source(names[i])] = taken.get(patch_source(names[i]), 0) + 1
        partial = [s for s, n in taken.items() if n < sizes[int(s[1:])]]
        assert len(partial) <= 1, f"{k}%: more than one source cut: {taken}"
    again = stages.labelled_subsets(names, train, [10, 40, 100], seed=1)
    assert all(np.array_equal(subsets[k], again[k]) for k in subsets)
    others = [stages.labelled_subsets(names, train, [40], seed=s)[40] for s in range(2, 6)]
    assert any(not np.array_equal(subsets[40], o) for o in others)


def marker_times(out):
    return {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in out.rglob("done.json")}


def test_rerun_skips_finished_stages(smoke, tiny_conic, run_script, tmp_path):
    out = tmp_path / "S"
    shutil.copytree(smoke.out, out)
    before = marker_times(out)
    assert len(before) == 25  # split, reference, 2 x 2 curve points, 2 x (gan, 2 synthetic), 2 x 2 x 3 pools, realism
    for late in ("realism/done.json", "k100/augment/real_synthetic_s43/done.json"):
        (out / late).unlink()
    time.sleep(0.05)
    result = run_script("study.py", *smoke_argv(tiny_conic, out, *SMOKE_EXTRA), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    after = marker_times(out)
    assert after.keys() == before.keys()
    rerun = {name for name in before if after[name] != before[name]}
    assert rerun == {"realism/done.json", "k100/augment/real_synthetic_s43/done.json"}
    assert result.stdout.count("done already, skipped") == 23
    assert "[realism] running" in result.stdout and "[k100/augment/real_synthetic_s43] running" in result.stdout
    redone = json.loads((out / "metrics.json").read_text())
    assert redone["seconds"]["k50/gan"] == smoke.metrics["seconds"]["k50/gan"]
    assert redone["augmentation"]["50"] == smoke.metrics["augmentation"]["50"]


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_killed_study_resumes_its_gan_from_last_pt(stop, tiny_conic, run_script, tmp_path):
    out = tmp_path / "S"
    argv = smoke_argv(tiny_conic, out, "--fractions", "100", "--seeds", "1", "--budget-minutes", "0.3")
    proc = run_script.start("study.py", *argv)
    plan = out / "k100" / "gan" / "plan.json"
    deadline = time.monotonic() + 300
    while not plan.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # into the epochs after the timed first one
    proc.send_signal(stop)
    stdout, stderr = proc.communicate(timeout=300)
    if stop == signal.SIGTERM:
        assert proc.returncode == 143, stderr[-3000:]
        assert "Traceback" not in stderr and "stopped by signal" in stdout + stderr
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not (out / "k100" / "gan" / "done.json").exists() and (out / "k100" / "gan" / "checkpoints" / "last.pt").is_file()
    epochs = json.loads(plan.read_text())["epochs"]
    assert epochs >= 2

    result = run_script("study.py", *argv, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "[split] done already, skipped" in result.stdout and "[reference] done already, skipped" in result.stdout
    assert "resumed from" in result.stdout + result.stderr
    gan = json.loads((out / "metrics.json").read_text())["gan"]["100"]
    # 18 training tiles at batch 2: 9 steps an epoch, whatever the interruption.
    assert gan["epochs"] == epochs and gan["steps"] == 9 * epochs


class StopAtStep:
    """A StopRequest stand-in whose flag rises at the n-th time the loop reads it (once a step)."""

    def __init__(self, n):
        self.reads, self.n = 0, n

    @property
    def requested(self):
        self.reads += 1
        return self.reads >= self.n


def test_a_stopped_segmenter_run_resumes_as_if_uninterrupted(tiny_conic, tmp_path, one_thread):
    """The study's segmenters run on loop.Loop: stopped mid-run they save, and the next run continues."""
    from dataset.conic import CoNIC
    from quality.options import parse_args
    from quality.stages import Study, fit_segmenter
    args = parse_args([str(a) for a in smoke_argv(tiny_conic, tmp_path / "S")])
    dataset = CoNIC(tiny_conic, augment=True)

    def fit(stop, run_dir):
        return fit_segmenter(Study(args, tmp_path / "S", None, stop), dataset, 9, seed=3, run_dir=run_dir)

    straight = fit(StopAtStep(10 ** 6), None)
    run_dir = tmp_path / "S" / "run"
    with pytest.raises(SystemExit) as stopped:
        fit(StopAtStep(5), run_dir)
    assert stopped.value.code == 143
    saved = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert saved["step"] == 5
    resumed = fit(StopAtStep(10 ** 6), run_dir)
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), straight.state_dict().values()))
    assert not (run_dir / "checkpoints" / "last.pt").exists()  # removed once the run is done


def test_segmenter_steps_do_not_depend_on_the_gan_budget(tiny_conic, tmp_path):
    from quality.options import parse_args
    base = [str(a) for a in smoke_argv(tiny_conic, tmp_path / "S")]
    steps = {parse_args(base + ["--budget-minutes", str(b)]).segmenter_steps for b in (0.05, 4, 30)}
    assert steps == {options.SMOKE["segmenter_steps"]}
    assert parse_args(base + ["--segmenter-steps", "7"]).segmenter_steps == 7
    assert "budget_minutes" not in options.REFERENCE_OPTIONS and "segmenter_steps" in options.REFERENCE_OPTIONS


def test_help_lists_the_options_and_presets(capsys):
    with pytest.raises(SystemExit) as exit_info:
        study.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for flag in ("--data-dir", "--out-dir", "--fractions", "--seeds", "--seed", "--budget-minutes", "--full", "--smoke",
                 "--device", "--precision", "--rare-class-weight", "--overwrite", "split/", "realism/"):
        assert flag in out, flag


@pytest.mark.parametrize("extra, message", [
    (["--fractions", "0"], "--fractions are percentages"),
    (["--fractions", "10", "150"], "in (0, 100]; got 150"),
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--budget-minutes", "0"], "--budget-minutes must be positive"),
])
def test_bad_options_are_one_line(extra, message, tiny_conic, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        study.main(smoke_argv(tiny_conic, tmp_path / "S", *extra))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "S").exists()


def test_bad_data_and_out_dirs_are_one_line(smoke, tiny_conic, tmp_path, capsys):
    def refused(argv):
        with pytest.raises(SystemExit) as exit_info:
            study.main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1, err
        return err

    assert "CoNIC data directory not found" in refused(smoke_argv(tmp_path / "nowhere", tmp_path / "S"))
    (tmp_path / "partial").mkdir()
    np.save(tmp_path / "partial" / "images.npy", np.zeros((2, 64, 64, 3), np.uint8))
    assert "missing labels.npy, patch_info.csv" in refused(smoke_argv(tmp_path / "partial", tmp_path / "S"))
    before = marker_times(smoke.out)
    err = refused(smoke_argv(tiny_conic, smoke.out, "--fractions", "25", "100"))
    assert "holds the output of another study.py run" in err and "fractions [50.0, 100.0] there, [25.0, 100.0] here" in err
    assert marker_times(smoke.out) == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert "did not write" in refused(smoke_argv(tiny_conic, tmp_path / "other"))
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_case_1_a_data_folder_inside_the_study_folder_is_refused_and_kept(tiny_conic, tmp_path, capsys):
    out = tmp_path / "S"
    shutil.copytree(tiny_conic, out / "conic")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    for extra in ([], ["--overwrite"]):
        with pytest.raises(SystemExit) as exit_info:
            study.main(smoke_argv(out / "conic", out, *extra))
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "inside --out-dir" in err and err.count("\n") == 1, err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_overwrite_replaces_a_study_but_never_other_files(tmp_path):
    old, data = tmp_path / "S", tmp_path / "data"
    args = SimpleNamespace(out_dir=str(old), data_dir=str(data), overwrite=False)
    with options.claim_out_dir(args, {"fractions": [10.0]}):
        atomic_save_text(old / "k10" / "done.json", "{}")
    (old / "k10" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="fractions \\[10.0\\] there, \\[50.0\\] here"):
        options.claim_out_dir(args, {"fractions": [50.0]})
    args.overwrite = True
    with options.claim_out_dir(args, {"fractions": [50.0]}) as folder:
        assert folder.path == old
    assert sorted(p.relative_to(old).as_posix() for p in old.rglob("*") if not p.name.startswith(".run.")) == \
        ["k10", "k10/notes.txt"]
    assert json.loads((old / ".run.json").read_text())["options"] == {"fractions": [50.0]}
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="did not write"):
        options.claim_out_dir(SimpleNamespace(out_dir=str(other), data_dir=str(data), overwrite=True), {})
    assert (other / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------- panoptic quality

def instance_map(*boxes, shape=(12, 12)):
    """An instance map with box k (y0, y1, x0, x1) holding id k + 1."""
    out = np.zeros(shape, dtype=np.int32)
    for k, (y0, y1, x0, x1) in enumerate(boxes):
        out[y0:y1, x0:x1] = k + 1
    return out


TRUE = instance_map((0, 2, 0, 2), (4, 6, 0, 3), (8, 10, 8, 10))   # A 4 px, B 6 px, D 4 px


def test_panoptic_quality_perfect_and_disjoint():
    perfect = metrics.panoptic_quality(TRUE * 7, TRUE)  # ids need not agree
    assert perfect == {"pq": 1.0, "sq": 1.0, "dq": 1.0, "tp": 3, "fp": 0, "fn": 0}
    disjoint = metrics.panoptic_quality(instance_map((0, 2, 6, 8), (10, 12, 0, 2)), TRUE)
    assert disjoint == {"pq": 0.0, "sq": None, "dq": 0.0, "tp": 0, "fp": 2, "fn": 3}
    empty = np.zeros_like(TRUE)
    assert metrics.panoptic_quality(empty, empty)["pq"] is None
    assert metrics.panoptic_quality(empty, TRUE)["pq"] == 0.0


def test_panoptic_quality_partial_case_by_hand():
    # A exactly (IoU 1); 5 of B's 6 px (IoU 5/6); C, 3 px where nothing is (FP); D missed (FN).
    pred = instance_map((0, 2, 0, 2), (4, 6, 0, 3), (0, 1, 6, 9))
    pred[5, 2] = 0
    result = metrics.panoptic_quality(pred, TRUE)
    assert (result["tp"], result["fp"], result["fn"]) == (2, 1, 1)
    assert result["sq"] == pytest.approx((1 + 5 / 6) / 2)
    assert result["dq"] == pytest.approx(2 / 3)
    assert result["pq"] == pytest.approx((1 + 5 / 6) / 3)
    # IoU of exactly 0.5 is no match: half of A predicted.
    half = metrics.panoptic_quality(instance_map((0, 1, 0, 2)), instance_map((0, 2, 0, 2)))
    assert (half["tp"], half["fp"], half["fn"], half["pq"]) == (0, 1, 1, 0.0)
    # Stacks pool their matches, ids are local to each map.
    stacked = metrics.panoptic_quality(np.stack([pred, TRUE]), np.stack([TRUE, TRUE]))
    assert (stacked["tp"], stacked["fp"], stacked["fn"]) == (5, 1, 1)
    assert stacked["pq"] == pytest.approx((1 + 5 / 6 + 3) / 6)
    with pytest.raises(ValueError, match="one shape"):
        metrics.panoptic_quality(pred[:5], TRUE)


def test_segmentation_scores_of_a_perfect_prediction():
    classes = np.zeros((1, 12, 12), np.uint8)
    instances = TRUE[None].copy()
    classes[instances > 0] = 2
    classes[0][TRUE == 3] = 5   # D is an eosinophil
    scores = stages.segmentation_scores(classes, stages.Tiles(None, classes, instances, ["t"]))
    assert scores["dice"]["Nuclei"] == 1.0 and scores["dice"]["Epithelial"] == 1.0
    assert scores["pq"] == {"Nuclei": 1.0, "Neutrophil": None, "Epithelial": 1.0, "Lymphocyte": None, "Plasma": None,
                            "Eosinophil": 1.0, "Connective": None}
    assert scores["mpq"] == 1.0
    # Predicted instances are the connected pieces of each class: two touching nuclei of one class merge.
    merged = classes.copy()
    merged[0, 2:4, 0:2] = 2   # joins A to B
    assert stages.segmentation_scores(merged, stages.Tiles(None, classes, instances, ["t"]))["pq"]["Nuclei"] < 0.5


# --------------------------------------------------------------------------- real tiles

@pytest.mark.skipif(not (LIZARD / "images.npy").is_file(), reason=f"lizard_128 not found under {LIZARD}")
def test_smoke_study_on_lizard_128(run_script, tmp_path):
    out = tmp_path / "S"
    result = run_script("study.py", *smoke_argv(LIZARD, out, "--fractions", "5", "10", "--seeds", "1"), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["split"]["train"]["tiles"] + m["split"]["test"]["tiles"] == 1045
    assert m["split"]["labelled"]["5"]["tiles"] == round(0.05 * m["split"]["train"]["tiles"])
    assert m["realism"]["tiles"] == m["split"]["test"]["tiles"]
    assert m["synthetic"]["10"]["b"]["nuclei"]["Epithelial"] > 0
    assert "mask fidelity:" in result.stdout


@pytest.fixture(scope="module")
def spade_smoke(smoke, tiny_conic, tmp_path_factory, run_script):
    """The smoke study with another GAN (SPADE + noise + OASIS) trained from another seed, otherwise the
    same options and its reference."""
    out = tmp_path_factory.mktemp("study") / "spade"
    argv = smoke_argv(tiny_conic, out, *SMOKE_EXTRA, "--generator", "spade", "--discriminator", "oasis",
                      "--noise-dim", "4", "--gan-seed", "7", "--reference-from", smoke.out)
    result = run_script("study.py", *argv, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_study_trains_the_chosen_generator_and_discriminator(smoke, spade_smoke, tiny_conic, tmp_path):
    """--generator/--discriminator/--noise-dim reach the GANs the study trains, so
    the study can compare combinations at equal budget; --gan-seed seeds the GAN alone."""
    out = spade_smoke
    ckpt = torch.load(out / "k100" / "gan" / "checkpoints" / "last.pt", weights_only=True)
    model = ckpt["model_config"]
    assert (model["generator"], model["discriminator"], model["noise_dim"]) == ("spade", "oasis", 4)
    assert ckpt["config"]["seed"] == 7 and smoke.metrics["options"]["seed"] == 42
    assert (out / "split.csv").read_text() == (smoke.out / "split.csv").read_text()
    assert json.loads((out / ".run.json").read_text())["options"]["generator"] == "spade"
    assert json.loads((out / "metrics.json").read_text())["realism"]["diversity"]["samples_per_mask"] == 3
    # A smoke GAN paints every tile the same grey in uint8; with PyTorch's default init
    # instead, noise makes a mask's paintings differ, and pix2pix in eval mode does not.
    s = SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext())
    reference, _ = load_segmenter(out / "reference" / "segmenter.pt", s.device)
    data = CoNIC(tiny_conic)
    classes = np.stack([data.classes(i) for i in range(4)])
    instances = np.stack([data.instances(i) for i in range(4)])
    noisy = vivid_checkpoint(out / "k100" / "gan" / "checkpoints" / "last.pt", tmp_path / "spade.pt")
    assert stages.sample_diversity(s, noisy, classes, instances, reference)["mean_pairwise_feature_distance"] > 0


def test_reference_from_copies_the_judge_and_the_step_counts(smoke, spade_smoke):
    judge = ("reference", "segmenter.pt")
    assert spade_smoke.joinpath(*judge).read_bytes() == smoke.out.joinpath(*judge).read_bytes()
    spade = json.loads((spade_smoke / "metrics.json").read_text())
    assert spade["reference"]["copied_from"] == str(smoke.out.resolve())
    assert spade["budget"]["segmenter_steps"] == smoke.metrics["budget"]["segmenter_steps"]
    assert spade["reference"]["test"] == smoke.metrics["reference"]["test"]
    steps = {run["steps"] for k in spade["augmentation"].values() for runs in k["runs"].values() for run in runs}
    assert steps == {smoke.metrics["budget"]["segmenter_steps"]["augment"]}


@pytest.mark.parametrize("extra,message", [(("--segmenter-steps", "5"), "segmenter_steps 4 there, 5 here"),
                                           (("--seed", "7"), "seed 42 there, 7 here")])
def test_reference_from_refuses_another_setup(extra, message, smoke, tiny_conic, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        study.main(smoke_argv(tiny_conic, tmp_path / "S", "--reference-from", str(smoke.out), *extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "S").exists()
    with pytest.raises(SystemExit):
        study.main(smoke_argv(tiny_conic, tmp_path / "S", "--reference-from", str(tmp_path)))
    assert "no finished reference stage" in capsys.readouterr().err


def test_compare_studies_tables_and_grids_two_gans(smoke, spade_smoke, run_script, tmp_path):
    out = tmp_path / "compare"
    result = run_script("compare_studies.py", smoke.out, spade_smoke, "--out-dir", out, "--grid-rows", 3)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (out / "compare.md").read_text().splitlines()
    rows = [line.split(" | ") for line in lines if line.startswith(("| S |", "| spade |"))]
    assert [r[1] for r in rows] == ["unet (transpose) + patch, --l1-lambda 50",
                                    "spade + oasis, --noise-dim 4, --l1-lambda 50, --gan-seed 7"]
    spade = json.loads((spade_smoke / "metrics.json").read_text())
    assert rows[1][3] == str(spade["gan"]["100"]["steps"])
    assert rows[1][2] == "{generator:.2f}M / {discriminator:.2f}M".format(
        **{k: v / 1e6 for k, v in spade["gan"]["100"]["parameters"].items()})
    assert "| nucleus Dice gain at k=50% | TSTR ratio at k=50% |" in lines[2]
    assert "grid.png: mask | real | S | spade" in lines[-1]
    assert rows[1][-1] == "{:.2f} |".format(spade["augmentation"]["50"]["summary"]["nuclei_dice"]["tstr_ratio"])
    assert lines[2] in result.stdout
    tile, gap = 64, 4  # rows of mask | real | one painting per study
    assert np.asarray(Image.open(out / "grid.png")).shape == (3 * tile + 2 * gap, 4 * tile + 3 * gap, 3)

    again = run_script("compare_studies.py", smoke.out, spade_smoke, "--out-dir", out)
    assert again.returncode == 2 and "--overwrite" in again.stderr and len(again.stderr.strip().splitlines()) == 1


def test_compare_studies_refuses_studies_that_differ_beyond_the_gan(smoke, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(smoke.out, other)
    metrics_path = other / "metrics.json"
    saved = json.loads(metrics_path.read_text())
    saved["options"]["budget_minutes"] = 12.0
    metrics_path.write_text(json.dumps(saved))
    with pytest.raises(SystemExit) as exit_info:
        compare_studies.main([str(smoke.out), str(other), "--out-dir", str(tmp_path / "compare")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "budget_minutes" in err[0] and "12.0" in err[0], err
    assert not (tmp_path / "compare").exists()
    with pytest.raises(SystemExit):
        compare_studies.main([str(smoke.out), str(tmp_path / "none")])
    assert "metrics.json not found" in capsys.readouterr().err

    # A study with its own reference segmenter (another judge) is refused too.
    saved["options"]["budget_minutes"] = smoke.metrics["options"]["budget_minutes"]
    metrics_path.write_text(json.dumps(saved))
    judge = torch.load(other / "reference" / "segmenter.pt", weights_only=True)
    first = next(iter(judge["model"]))
    judge["model"][first] = judge["model"][first] + 0.01
    torch.save(judge, other / "reference" / "segmenter.pt")
    with pytest.raises(SystemExit):
        compare_studies.main([str(smoke.out), str(other), "--out-dir", str(tmp_path / "compare")])
    err = capsys.readouterr().err
    assert "different reference segmenters" in err and f"--reference-from {smoke.out}" in err


def test_pix2pix_scores_zero_diversity(smoke, tiny_conic, tmp_path):
    assert smoke.metrics["realism"]["diversity"]["mean_pairwise_feature_distance"] == 0
    s = SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext())
    reference, _ = load_segmenter(smoke.out / "reference" / "segmenter.pt", s.device)
    data = CoNIC(tiny_conic)
    classes = np.stack([data.classes(i) for i in range(4)])
    instances = np.stack([data.instances(i) for i in range(4)])
    vivid = vivid_checkpoint(smoke.out / "k100" / "gan" / "checkpoints" / "last.pt", tmp_path / "unet.pt")
    assert stages.sample_diversity(s, vivid, classes, instances, reference)["mean_pairwise_feature_distance"] == 0


def test_learning_curve_reports_where_it_flattens():
    from quality.results import learning_curve
    from quality.stages import curve_name

    def study_with(dice):
        done = {curve_name(steps, seed): {"test": {"dice": {"Nuclei": value}}}
                for steps, values in dice.items() for seed, value in zip((1, 2), values)}
        return SimpleNamespace(args=SimpleNamespace(learning_curve=list(dice)), seeds=[1, 2]), done

    # 2000 steps: mean 0.80, sd 0.0283; 1000 steps is within it, 250 is not.
    curve = learning_curve(*study_with({250: (0.60, 0.62), 1000: (0.78, 0.80), 2000: (0.78, 0.82)}))
    assert curve["flattened_at"] == 1000 and curve["nuclei_dice"]["2000"]["mean"] == pytest.approx(0.80)
    # Still rising: no shorter run is within the longest one's spread.
    assert learning_curve(*study_with({250: (0.60, 0.62), 2000: (0.77, 0.78)}))["flattened_at"] is None


def test_a_study_from_before_manifests_continues_with_its_options_only(tmp_path):
    old, data = tmp_path / "S", tmp_path / "data"
    (old / "reference").mkdir(parents=True)
    (old / "reference" / "done.json").write_text("{}")
    (old / "study.json").write_text(json.dumps({"options": {"fractions": [10.0]}}))
    args = SimpleNamespace(out_dir=str(old), data_dir=str(data), overwrite=False)
    with pytest.raises(UserError, match="did not write"):
        options.claim_out_dir(args, {"fractions": [50.0]})
    with options.claim_out_dir(args, {"fractions": [10.0]}) as folder:
        assert folder.path == old and (old / "reference" / "done.json").is_file()
    assert json.loads((old / ".run.json").read_text())["options"] == {"fractions": [10.0]}
