"""--ema-half-life in the training loop: the checkpoint carries G's moving average with
BatchNorm statistics of its own, a resumed run's average equals an uninterrupted one's,
and test.py paints with the average unless --no-ema (ema.py's own tests cover the
average and the statistics)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_training import assert_same, assert_same_training_state

import config
from gan import load_generator

CKPT = "checkpoints/last.pt"
RUN = dict(epochs=2, batch_size=3, train_folds=(1, 2), test_folds=(3,))   # 6 Colon patches: 2 steps/epoch
EMA = ("--ema-half-life", 12, "--ema-rampup", 0.5)


def load(path):
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory, pannuke_folds, train_in_process):
    out = tmp_path_factory.mktemp("ema_run")
    train_in_process(train_in_process.argv(pannuke_folds, out, *EMA, **RUN))
    return out


def test_the_checkpoint_carries_an_average_that_trails_the_generator(ema_run):
    ckpt = load(ema_run / CKPT)
    average, raw = ckpt["generator_ema"]["model"], ckpt["generator"]
    assert ckpt["generator_ema"]["images_seen"] == 12  # 2 epochs x 6 patches
    weights = [k for k in raw if not ("running_" in k or "num_batches" in k)]
    assert all(torch.isfinite(average[k]).all() for k in average)
    assert any(not torch.equal(average[k], raw[k]) for k in weights)
    # Its BatchNorm statistics are its own, not copies of the raw G's.
    stats = [k for k in raw if k.endswith("running_mean")]
    assert stats and any(not torch.equal(average[k], raw[k]) for k in stats)


def test_the_average_is_on_by_default_and_half_life_0_turns_it_off(tmp_path, pannuke_folds, train_in_process):
    train_in_process(train_in_process.argv(pannuke_folds, tmp_path / "default", **dict(RUN, epochs=1)))
    assert load(tmp_path / "default" / CKPT)["config"]["ema_half_life"] == config.EMA_HALF_LIFE > 0
    assert "generator_ema" in load(tmp_path / "default" / CKPT)
    train_in_process(train_in_process.argv(pannuke_folds, tmp_path / "off", "--ema-half-life", 0, **dict(RUN, epochs=1)))
    assert "generator_ema" not in load(tmp_path / "off" / CKPT)


def test_resumed_average_equals_uninterrupted(tmp_path, pannuke_folds, train_in_process, ema_run):
    train_in_process(train_in_process.argv(pannuke_folds, tmp_path, *EMA, **dict(RUN, epochs=1)))
    train_in_process(train_in_process.argv(pannuke_folds, tmp_path, "--resume", tmp_path / CKPT, **RUN))
    final, reference = load(tmp_path / CKPT), load(ema_run / CKPT)
    assert final["config"]["ema_half_life"] == 12  # taken from the checkpoint
    assert_same_training_state(final, reference)
    assert_same(final["generator_ema"], reference["generator_ema"], "generator_ema")


def test_test_py_paints_with_the_average_unless_told_not_to(ema_run, pannuke_folds, test_script, tmp_path, one_thread):
    generator, _ = load_generator(ema_run / CKPT, "cpu")
    raw, _ = load_generator(ema_run / CKPT, "cpu", ema=False)
    assert any(not torch.equal(a, b) for a, b in zip(generator.state_dict().values(), raw.state_dict().values()))

    def paint(out, *flags):
        test_script.main(["--checkpoint", str(ema_run / CKPT), "--data-dir", str(pannuke_folds), "--out-dir",
                          str(out), "--device", "cpu", "--precision", "fp32", "--grids", "0", *flags])
        return {p.name: np.asarray(Image.open(p)) for p in sorted(out.glob("*.png"))}

    averaged, plain = paint(tmp_path / "ema"), paint(tmp_path / "raw", "--no-ema")
    assert averaged.keys() == plain.keys() and averaged
    assert any(not np.array_equal(averaged[k], plain[k]) for k in averaged)
    assert all(img.std() > 0 for img in averaged.values())  # painted, not one flat colour
    record = json.loads((tmp_path / "ema" / ".run.json").read_text())
    assert record["options"]["weights"] == "ema"
    # Raw-G images are not mixed into a folder of the average's.
    with pytest.raises(SystemExit):
        paint(tmp_path / "ema", "--no-ema")


# --------------------------------------------------------------------------- --d-augment and --r1-gamma in the step

def tiny_networks(d_augment="none", discriminator="patch"):
    import config
    import gan
    from augment import DiscriminatorAugment
    from dataset.masks import CONIC
    from runtime import make_optimizer
    from train_utils import Networks

    args = config.training_parser("x", config.add_conic_training_data_args, "x").parse_args(
        ["--ngf", "4", "--ndf", "4", "--discriminator", discriminator, "--no-dropout"])
    model_cfg = gan.model_config(args, CONIC, 64)
    torch.manual_seed(0)
    g, d = gan.build_generator(model_cfg), gan.build_discriminator(model_cfg)
    opts = [make_optimizer(m.parameters(), 1e-3, (0.5, 0.999), torch.device("cpu")) for m in (g, d)]
    scalers = [torch.amp.GradScaler("cpu", enabled=False) for _ in range(2)]
    return Networks(g, d, *opts, *scalers, augment=DiscriminatorAugment(d_augment, 0, "cpu"))


def batch(size=8):
    from torch.nn import functional as F

    from dataset.masks import CONIC
    torch.manual_seed(1)
    labels = torch.randint(0, CONIC.num_classes, (size, 64, 64))
    return F.one_hot(labels, CONIC.num_classes).permute(0, 3, 1, 2).float(), torch.rand(size, 3, 64, 64) * 2 - 1


@pytest.mark.parametrize("discriminator", ["patch", "multiscale"])
def test_r1_is_added_to_d_loss_on_its_steps_only(discriminator, one_thread):
    import copy

    import config
    from losses import r1_penalty
    from train_utils import StepConfig, gan_train_step
    nets, (mask, real) = tiny_networks(discriminator=discriminator), batch()
    step_cfg = StepConfig(r1_gamma=2.0)
    losses = {}
    for step in (config.R1_INTERVAL - 1, config.R1_INTERVAL):
        copied = copy.deepcopy(nets)
        if step == config.R1_INTERVAL:
            inputs = real.clone().requires_grad_(True)
            expected = 2.0 / 2 * config.R1_INTERVAL * r1_penalty(copied.discriminator(mask, inputs), inputs).item()
        torch.manual_seed(2)
        losses[step] = gan_train_step(copied, mask, real, step_cfg, step)[0].item()
    assert expected > 0
    assert losses[config.R1_INTERVAL] - losses[config.R1_INTERVAL - 1] == pytest.approx(expected, rel=1e-4)


def test_ada_moves_p_from_d_logits_and_diffaug_changes_d_loss(one_thread):
    import copy

    from train_utils import StepConfig, gan_train_step
    mask, real = batch()
    ada = tiny_networks("ada")
    for step in range(1, 5):  # 4 x 8 real images: one ADA interval (32)
        gan_train_step(ada, mask, real, StepConfig(), step)
    assert ada.augment.ada.last_rt is not None and 0 <= ada.augment.p < 1

    plain, augmented = tiny_networks("none"), tiny_networks("diffaug")
    augmented.generator, augmented.discriminator = copy.deepcopy(plain.generator), copy.deepcopy(plain.discriminator)
    torch.manual_seed(3)
    a = gan_train_step(plain, mask, real, StepConfig())
    torch.manual_seed(3)
    b = gan_train_step(augmented, mask, real, StepConfig())
    assert a[2] == pytest.approx(b[2].item())  # L1 is on the unaugmented images
    assert a[0].item() != pytest.approx(b[0].item())  # D saw augmented ones


def test_augmented_run_resumes_exactly(tmp_path, pannuke_folds, train_in_process):
    flags = ("--d-augment", "ada", "--r1-gamma", 1)
    reference = tmp_path / "straight"
    train_in_process(train_in_process.argv(pannuke_folds, reference, *flags, **RUN))
    resumed = tmp_path / "resumed"
    train_in_process(train_in_process.argv(pannuke_folds, resumed, *flags, **dict(RUN, epochs=1)))
    train_in_process(train_in_process.argv(pannuke_folds, resumed, "--resume", resumed / CKPT, **RUN))
    final, straight = load(resumed / CKPT), load(reference / CKPT)
    assert_same_training_state(final, straight)
    assert_same(final["d_augment"], straight["d_augment"], "d_augment")
    assert "d_augment_p" in final["history"][-1]


def test_oasis_refuses_ada(tmp_path, train_conic_in_process, capsys):
    from conic_fixtures import make_conic
    data, _, _ = make_conic(tmp_path / "data", size=64, n_nuclei=4)
    with pytest.raises(SystemExit):
        train_conic_in_process(["--data-dir", data, "--out-dir", tmp_path / "run", "--discriminator", "oasis",
                                "--d-augment", "ada", "--epochs", 1, "--wandb", "disabled", "--device", "cpu"])
    assert "--d-augment ada and --r1-gamma" in capsys.readouterr().err


def test_the_average_is_recalibrated_on_masks_from_across_the_training_set():
    """Not the first tiles, which often share a source image: the first and the last item are among them."""
    from train_utils import ema_mask_batches
    items = [(torch.full((8, 8), i // 200, dtype=torch.uint8), None) for i in range(1000)]  # class = fifth of the set
    batches = list(ema_mask_batches(items, torch.device("cpu"), False, 6)())
    drawn = torch.cat([b.argmax(1)[:, 0, 0] for b in batches])
    assert len(drawn) == 64 and sorted(set(drawn.tolist())) == [0, 1, 2, 3, 4]  # every fifth, not the first
