"""--budget-minutes and --eval-every in the GAN loop. The budget's clock (loop.training_clock) is
replaced by one that moves STEP_SECONDS per training step, so a budget of a few "seconds" runs
in no time and every run of it is exact; --eval-every's score is replaced by a given sequence
where a test needs to choose when it improves, and is the real one in a real tiny run."""
import math

import pytest
import torch
from test_run_safety import error_line
from test_training import assert_same_training_state, uninterrupted_run  # noqa: F401 (a fixture)

import loop
import train_utils
from train_utils import budget_lr_factor

CKPT = "checkpoints/last.pt"
BEST = "checkpoints/best.pt"
LR = 2e-4                        # config.LEARNING_RATE
STEP_SECONDS = 0.375             # a multiple of 1/8: sums of it are exact
BUDGET_MINUTES = 0.0625          # 3.75 s: 10 steps; the lr decays over the last 1.875 s (steps 7-10)
BUDGET_RUN = dict(batch_size=2, train_folds=(1, 2), test_folds=(3,))   # 6 Colon patches: 3 steps per epoch
LR_PER_STEP = [1.0] * 6 + [0.8, 0.6, 0.4, 0.2]  # times LR, set before each step from the time before it
EVAL_RUN = dict(batch_size=3, train_folds=(1, 2), test_folds=(3,))     # 2 steps per epoch, 2 held-out tiles


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def fake_clock(patch):
    """Make training time move STEP_SECONDS per GAN step; returns the list of G's and D's learning
    rates each step ran with."""
    now, lrs = [1000.0], []
    real_step = train_utils.gan_train_step

    def timed_step(nets, *args, **kwargs):
        lrs.append((nets.opt_g.param_groups[0]["lr"], nets.opt_d.param_groups[0]["lr"]))
        losses = real_step(nets, *args, **kwargs)
        now[0] += STEP_SECONDS
        return losses

    patch.setattr(loop, "training_clock", lambda: now[0])
    patch.setattr(train_utils, "gan_train_step", timed_step)
    return lrs


def budget_argv(train_in_process, data, out, *extra, epochs=1000):
    return train_in_process.argv(data, out, *extra, epochs=epochs, **BUDGET_RUN)


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory, pannuke_folds, train_in_process):
    """A run to the budget in one go: (its folder, the (G, D) lr of each step)."""
    out = tmp_path_factory.mktemp("budget_run")
    with pytest.MonkeyPatch.context() as patch:
        lrs = fake_clock(patch)
        train_in_process(budget_argv(train_in_process, pannuke_folds, out, "--budget-minutes", BUDGET_MINUTES))
    return out, lrs


def test_budget_lr_factor_is_flat_then_linear_to_zero():
    assert [budget_lr_factor(s, 100) for s in (0, 50, 75, 100, 130)] == [1, 1, 0.5, 0, 0]


def test_budget_stops_within_one_step_of_the_budget_with_the_lr_at_0(budget_run):
    out, lrs = budget_run
    ckpt = load(out / CKPT)
    budget = BUDGET_MINUTES * 60
    # Step 10 is the first to bring the training time to the budget: the run stops after it, mid-epoch
    # (epoch 4, batch 1).
    assert (ckpt["step"], ckpt["epoch"], ckpt["batches_done"]) == (10, 3, 1) == (math.ceil(budget / STEP_SECONDS), 3, 1)
    assert ckpt["train_seconds"] == budget
    assert ckpt["config"]["budget_minutes"] == BUDGET_MINUTES and ckpt["config"]["epochs"] == 1000
    # Full lr for the first half, then linear decay: the last step ran at one step's worth of the slope,
    # and the optimisers are saved at 0.
    assert [g for g, _ in lrs] == pytest.approx([LR * f for f in LR_PER_STEP])
    assert all(g == d for g, d in lrs)
    assert lrs[-1][0] <= LR * STEP_SECONDS / (budget / 2) + 1e-12
    assert ckpt["opt_g"]["param_groups"][0]["lr"] == ckpt["opt_d"]["param_groups"][0]["lr"] == 0
    # The outputs a normal end writes: the grid of the epoch in progress, the loss plot.
    assert (out / "samples" / "epoch_0004.png").is_file() and (out / "loss_curves.png").is_file()
    assert [h["epoch"] for h in ckpt["history"]] == [1, 2, 3]


def test_a_resumed_run_continues_the_budget(tmp_path, pannuke_folds, train_in_process, budget_run, capsys):
    """Stopped by --epochs after 6 of the 10 steps, then resumed with only --resume (the budget comes from
    the checkpoint): 4 more steps at the decaying lr, the same run as the one that went straight to the budget."""
    with pytest.MonkeyPatch.context() as patch:
        lrs = fake_clock(patch)
        train_in_process(budget_argv(train_in_process, pannuke_folds, tmp_path, "--budget-minutes", BUDGET_MINUTES,
                                     epochs=2))
        first = load(tmp_path / CKPT)
        assert (first["step"], first["train_seconds"]) == (6, 6 * STEP_SECONDS)
        assert "--epochs 2 reached with" in capsys.readouterr().out
        train_in_process(budget_argv(train_in_process, pannuke_folds, tmp_path, "--resume", tmp_path / CKPT))
    out = capsys.readouterr().out
    assert "--budget-minutes 0.0625" in out and "budget reached" in out
    final = load(tmp_path / CKPT)
    assert (final["step"], final["train_seconds"]) == (10, BUDGET_MINUTES * 60)
    assert [g for g, _ in lrs] == pytest.approx([LR * f for f in LR_PER_STEP])
    assert_same_training_state(final, load(budget_run[0] / CKPT))
    # Nothing is left of the budget: a further resume says so, and how to go on.
    line = error_line(capsys, lambda: train_in_process(budget_argv(train_in_process, pannuke_folds, tmp_path,
                                                                   "--resume", tmp_path / CKPT)))
    assert "its --budget-minutes 0.0625" in line and "larger --budget-minutes" in line


@pytest.mark.parametrize("flags, needle", [
    (["--budget-minutes", "-1"], "--budget-minutes must be at least 0"),
    (["--budget-minutes", "nan"], "--budget-minutes must be a finite number"),
    (["--eval-every", "-1"], "--eval-every must be at least 0"),
], ids=["budget-negative", "budget-nan", "eval-every-negative"])
def test_impossible_budget_and_eval_options_fail_before_work(tmp_path, pannuke_folds, train_in_process, capsys,
                                                             flags, needle):
    out = tmp_path / "run"
    line = error_line(capsys, lambda: train_in_process(train_in_process.argv(pannuke_folds, out, *flags)))
    assert needle in line
    assert not out.exists()


# --------------------------------------------------------------------------- --eval-every

def scripted_scores(patch, scores):
    """RealismProbe.score gives `scores` in turn; returns the log of checkpoint writes: (file name, step,
    best score the state carries)."""
    queue, written = list(scores), []
    real_save = loop.atomic_save_torch

    def recording_save(state, path):
        written.append((path.name, state["step"], state.get("best_realism_fd")))
        real_save(state, path)

    patch.setattr(train_utils.RealismProbe, "score", lambda self, generator: queue.pop(0))
    patch.setattr(loop, "atomic_save_torch", recording_save)
    return written


def test_the_probe_scores_alike_every_time_and_leaves_the_random_stream_alone(pannuke_folds, one_thread):
    """Built twice (as by a run and by its resume), the probe is the same network on the same tiles: one
    generator gets one score, and building it draws nothing from the training run's RNG."""
    from contextlib import nullcontext

    from dataset.pannuke import PanNukeFolds
    from gan import build_generator
    items = [PanNukeFolds(pannuke_folds, [1])[i] for i in range(3)]
    torch.manual_seed(1)
    generator = build_generator(dict(ngf=8, ndf=8, norm="batch", dropout=True))
    state = torch.get_rng_state()
    probes = [train_utils.RealismProbe(items, 6, torch.device("cpu"), False, nullcontext()) for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), state)
    scores = [probe.score(generator) for probe in probes]
    assert scores[0] == scores[1] and math.isfinite(scores[0]) and scores[0] > 0
    # Real tiles against themselves: 0, up to rounding.
    assert abs(train_utils.frechet_distance(probes[0].real, probes[1].real)) < 1e-6 * scores[0]


def test_best_is_replaced_only_when_the_score_improves_and_a_resume_keeps_it(tmp_path, pannuke_folds,
                                                                              train_in_process):
    def train(epochs, scores, *extra):
        with pytest.MonkeyPatch.context() as patch:
            written = scripted_scores(patch, scores)
            train_in_process(train_in_process.argv(pannuke_folds, tmp_path, *extra, epochs=epochs, **EVAL_RUN))
        return [(step, best) for name, step, best in written if name == "best.pt"]

    # Steps 1 and 2 improve: best.pt twice, each time carrying its own score.
    assert train(1, [5.0, 3.0], "--eval-every", 1) == [(1, 5.0), (2, 3.0)]
    # Resumed (--eval-every from the checkpoint): 4 and 6 are worse than the 3 it had, so best.pt stays.
    assert train(2, [4.0, 6.0], "--resume", tmp_path / CKPT) == []
    best, last = load(tmp_path / BEST), load(tmp_path / CKPT)
    assert (best["step"], best["best_realism_fd"], best["best_step"]) == (2, 3.0, 2)
    assert (last["step"], last["best_realism_fd"], last["best_step"]) == (4, 3.0, 2)
    assert last["config"]["eval_every"] == 1
    # Then 2.5 beats it at step 5 and 7 does not at step 6.
    assert train(3, [2.5, 7.0], "--resume", tmp_path / CKPT) == [(5, 2.5)]
    assert (load(tmp_path / BEST)["step"], load(tmp_path / CKPT)["best_step"]) == (5, 5)


def test_the_end_is_scored_once_between_eval_steps(tmp_path, pannuke_folds, train_in_process, capsys):
    """--eval-every 3 over 4 steps: scored at step 3 and at the end (step 4), before the last save."""
    with pytest.MonkeyPatch.context() as patch:
        written = scripted_scores(patch, [2.0, 1.0])
        train_in_process(train_in_process.argv(pannuke_folds, tmp_path, "--eval-every", 3, epochs=2, **EVAL_RUN))
    assert [(name, step) for name, step, _ in written if name == "best.pt"] == [("best.pt", 3), ("best.pt", 4)]
    assert load(tmp_path / CKPT)["best_step"] == 4
    out = capsys.readouterr().out
    assert "step 3: eval/realism_fd 2" in out and "step 4: eval/realism_fd 1" in out


def test_a_real_tiny_run_keeps_a_finite_best_and_trains_as_without(tmp_path, pannuke_folds, train_in_process,
                                                                   uninterrupted_run):  # noqa: F811
    """The real score (an untrained seeded network's features of fold 3's two tiles), every step of a
    two-epoch run: best.pt holds a finite score, and scoring changed nothing in the training."""
    train_in_process(train_in_process.argv(pannuke_folds, tmp_path, "--eval-every", 1, epochs=2, **EVAL_RUN))
    best, last = load(tmp_path / BEST), load(tmp_path / CKPT)
    assert math.isfinite(best["best_realism_fd"]) and best["best_realism_fd"] >= 0
    assert best["step"] == best["best_step"] == last["best_step"] and 1 <= best["step"] <= 4
    assert last["best_realism_fd"] == best["best_realism_fd"]
    assert_same_training_state(last, uninterrupted_run)


def test_a_checkpoint_from_before_both_options_resumes_with_them(tmp_path, pannuke_folds, train_in_process):
    train_in_process(train_in_process.argv(pannuke_folds, tmp_path, epochs=1, **EVAL_RUN))
    old = load(tmp_path / CKPT)
    for key in ("train_seconds", "best_realism_fd", "best_step"):
        old.pop(key, None)
    for key in ("budget_minutes", "eval_every"):
        del old["config"][key]
    torch.save(old, tmp_path / CKPT)
    train_in_process(train_in_process.argv(pannuke_folds, tmp_path, "--resume", tmp_path / CKPT, "--eval-every", 1,
                                           "--budget-minutes", 10, epochs=2, **EVAL_RUN))
    final = load(tmp_path / CKPT)
    assert final["step"] == 4 and 0 < final["train_seconds"] < 600
    assert final["best_step"] in (3, 4) and (tmp_path / BEST).is_file()
