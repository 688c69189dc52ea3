"""config.GAN_OPTIONS is the one declaration of the GAN's options: the training
scripts' flags, RUN_OPTIONS, the checkpoint's model config, the losses' step config,
bench.py's networks and the old-checkpoint defaults all follow from it."""
import argparse

import pytest
import torch

import bench
import config
import gan
from dataset.masks import CONIC, PANNUKE
from train_utils import StepConfig
from utils import UserError


def training_parser():
    return config.training_parser("CoNIC", config.add_conic_training_data_args, "runs/x")


def test_every_gan_option_is_a_training_flag_and_a_run_option():
    flags = {a.dest: a for a in training_parser()._actions}
    for option in config.GAN_OPTIONS:
        assert option.name in flags, option.name
        assert flags[option.name].help == option.help
        assert option.name in config.RUN_OPTIONS
        default = flags[option.name].default
        assert (tuple(default) if isinstance(default, list) else default) == option.default


def test_a_new_option_declared_once_reaches_the_flags_the_step_and_the_run(monkeypatch):
    """What 'adding a GAN option' means: one GanOption, and every derived place sees it."""
    extra = config.GanOption("toy_weight", 0.5, group="losses", minimum=0, legacy=0.0, help="a toy loss weight")
    monkeypatch.setattr(config, "GAN_OPTIONS", config.GAN_OPTIONS + (extra,))
    import train_utils
    monkeypatch.setattr(train_utils, "GAN_OPTIONS", config.GAN_OPTIONS)
    args = training_parser().parse_args(["--toy-weight", "2"])
    assert args.toy_weight == 2.0
    assert StepConfig(options=args).toy_weight == 2.0
    assert config.fill_legacy({"l1_lambda": 75.0}, model=False)["toy_weight"] == 0.0
    with pytest.raises(UserError, match="--toy-weight must be at least 0"):
        config.check_gan_options(training_parser().parse_args(["--toy-weight", "-1"]))


@pytest.mark.parametrize("flags,message", [
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--l1-lambda", "-5"], "--l1-lambda must be at least 0"),
    (["--l1-lambda", "nan"], "--l1-lambda must be a finite number"),
    (["--real-label-range", "2", "1"], "--real-label-range takes LO HI with LO <= HI"),
    (["--beta1", "1"], "--beta1 must be below 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--ngf", "0"], "--ngf must be at least 1"),
    (["--lr", "0"], "--lr must be positive"),
])
def test_out_of_range_options_are_one_line_errors(flags, message):
    with pytest.raises(UserError, match=message):
        config.check_gan_options(training_parser().parse_args(flags))


def test_defaults_pass_the_checks():
    config.check_gan_options(training_parser().parse_args([]))


def test_model_config_records_only_the_options_of_the_chosen_networks():
    unet = gan.model_config(training_parser().parse_args([]), CONIC, 128)
    assert unet == {"label_set": "conic", "generator": "unet", "upsample": "resize", "discriminator": "multiscale",
                    "ngf": 64, "ndf": 64, "norm": "batch", "dropout": True, "noise_inject": False, "unet_depth": 7,
                    "noise_dim": 0, "d_spectral_norm": False, "num_d_scales": 2, "instance_edges": False}
    spade = gan.model_config(training_parser().parse_args(["--generator", "spade", "--discriminator", "patch"]),
                             CONIC, 128)
    assert not {"upsample", "dropout", "noise_inject", "num_d_scales"} & set(spade)


def test_old_model_configs_read_with_the_values_they_trained_with():
    oldest = config.fill_legacy({"ngf": 64, "ndf": 64, "norm": "batch", "dropout": True})
    assert oldest == {"ngf": 64, "ndf": 64, "norm": "batch", "dropout": True, "label_set": "pannuke",
                      "generator": "unet", "upsample": "transpose", "discriminator": "patch", "unet_depth": 8,
                      "noise_dim": 0, "noise_inject": False, "d_spectral_norm": False, "instance_edges": False}
    spade = config.fill_legacy({"generator": "spade", "discriminator": "oasis", "label_set": "conic"})
    assert "upsample" not in spade  # only a U-Net has an upsampling
    recorded = {"generator": "unet", "upsample": "resize", "discriminator": "multiscale", "label_set": "conic"}
    assert config.fill_legacy(recorded).items() >= recorded.items()  # recorded values win


@pytest.mark.parametrize("flags", [
    [],
    ["--generator", "spade", "--noise-dim", "8", "--discriminator", "oasis"],
    ["--upsample", "transpose", "--discriminator", "patch", "--ngf", "8", "--ndf", "4", "--no-dropout"],
    ["--discriminator", "multiscale", "--num-d-scales", "3", "--norm", "instance", "--unet-depth", "5"],
])
@pytest.mark.parametrize("tile", [256, 128])
def test_bench_builds_the_networks_the_training_script_builds(flags, tile):
    """At 256 px as train_pannuke.py builds them, at 128 px as train_conic.py (and the study) does."""
    add_data_args, labels = {256: (config.add_pannuke_training_data_args, PANNUKE),
                             128: (config.add_conic_training_data_args, CONIC)}[tile]
    parser = config.training_parser("data", add_data_args, "runs/x")
    trained = gan.model_config(parser.parse_args(flags), labels, tile)
    benched = bench.training_model_config(bench.parse_args(flags), tile)
    assert benched == trained
    for build in (gan.build_generator, gan.build_discriminator):
        a, b = build(trained), build(benched)
        assert [(k, v.shape) for k, v in a.state_dict().items()] == [(k, v.shape) for k, v in b.state_dict().items()]


def test_bench_times_the_default_losses():
    args = bench.parse_args(["--gan-loss", "bce", "--feat-match-lambda", "3"])
    step = StepConfig(options=args)
    assert (step.gan_loss, step.feat_match_lambda) == ("bce", 3.0)
    assert StepConfig(options=bench.parse_args([])).feat_match_lambda == config.GAN_OPTION["feat_match_lambda"].default


def test_describe_names_the_networks_and_what_differs_from_the_defaults():
    options = vars(training_parser().parse_args(["--generator", "spade", "--noise-dim", "8", "--l1-lambda", "0",
                                                 "--real-label-range", "0.8", "1"]))
    assert gan.describe(options) == "spade + multiscale, --noise-dim 8, --l1-lambda 0, --real-label-range 0.8 1"
    assert gan.describe(vars(training_parser().parse_args([]))) == "unet (resize) + multiscale"


def test_step_config_takes_defaults_then_the_run_then_overrides():
    cfg = argparse.Namespace(l1_lambda=10.0, real_label_range=[0.8, 1.0])
    step = StepConfig(torch.autocast("cpu", enabled=False), cfg, gan_loss="bce")
    assert step.l1_lambda == 10.0 and step.real_label_range == (0.8, 1.0) and step.gan_loss == "bce"
    assert step.labelmix_lambda == config.GAN_OPTION["labelmix_lambda"].default


@pytest.mark.parametrize("factor", [1, 4])
def test_l1_lowpass_takes_l1_between_the_pooled_images(factor, one_thread):
    """--l1-lowpass, the option docs/design.md adds as its example: one GanOption in
    config.py, and its use in train_utils.gan_train_step."""
    import copy

    from torch.nn import functional as F

    from runtime import make_optimizer
    from train_utils import Networks, gan_train_step

    args = training_parser().parse_args(["--l1-lowpass", str(factor), "--discriminator", "patch"])
    model_cfg = gan.model_config(args, CONIC, 32)
    torch.manual_seed(0)
    g, d = gan.build_generator({**model_cfg, "ngf": 4, "ndf": 4}), gan.build_discriminator({**model_cfg, "ndf": 4})
    mask = F.one_hot(torch.randint(0, CONIC.num_classes, (2, 32, 32)), CONIC.num_classes).permute(0, 3, 1, 2).float()
    real = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.manual_seed(1)
    fake = copy.deepcopy(g)(mask)  # the step's fake: the same weights and dropout draws
    expected = F.l1_loss(F.avg_pool2d(fake, factor), F.avg_pool2d(real, factor)) * args.l1_lambda
    opts = [make_optimizer(m.parameters(), 1e-3, (0.5, 0.999), torch.device("cpu")) for m in (g, d)]
    scalers = [torch.amp.GradScaler("cpu", enabled=False) for _ in range(2)]
    torch.manual_seed(1)
    losses = gan_train_step(Networks(g, d, *opts, *scalers), mask, real, StepConfig(options=args))
    assert losses[2].item() == pytest.approx(expected.item(), rel=1e-5)
    if factor > 1:  # pooling changes the loss: the option reached the step
        assert losses[2].item() != pytest.approx((F.l1_loss(fake, real) * args.l1_lambda).item(), rel=1e-3)


def test_the_study_takes_every_gan_option_with_its_narrower_widths():
    from quality import options
    flags = {a.dest: a for a in options.parser()._actions}
    for option in config.GAN_OPTIONS:
        assert flags[option.name].help == option.help
        default = flags[option.name].default
        expected = options.GAN_DEFAULTS.get(option.name, option.default)
        assert (tuple(default) if isinstance(default, list) else default) == expected
        assert option.name in options.STUDY_OPTIONS
    args = options.parse_args(["--l1-lowpass", "2", "--d-augment", "diffaug"])
    assert (args.l1_lowpass, args.d_augment) == (2, "diffaug")
    with pytest.raises(UserError, match="--lr must be a finite number"):
        options.parse_args(["--lr", "nan"])


def test_a_study_recorded_before_an_option_existed_reads_with_its_legacy_value(tmp_path):
    import json

    from quality.options import recorded_options
    record = tmp_path / "study.json"
    record.write_text(json.dumps({"options": {"generator": "unet", "l1_lambda": 75.0}}))
    saved = recorded_options(record)
    assert saved["l1_lowpass"] == 1 and saved["d_augment"] == "none" and saved["ema_half_life"] == 0


@pytest.mark.parametrize("amx,avx512_bf16,expected", [(True, True, "bf16"), (False, True, "fp32"), (False, False, "fp32")],
                         ids=["amx", "avx512-bf16-without-amx", "avx2"])
def test_precision_auto_on_cpu_takes_bf16_only_with_amx(monkeypatch, amx, avx512_bf16, expected):
    import runtime
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert runtime.resolve_precision("auto", torch.device("cpu")) == expected
    assert runtime.resolve_precision("fp32", torch.device("cpu")) == "fp32"


@pytest.mark.parametrize("amx,capability,expected", [(True, "AVX512", True), (False, "AVX512", True),
                                                     (False, "AVX2", False)], ids=["amx", "avx512", "avx2"])
def test_channels_last_auto_follows_the_cpu_and_a_flag_wins(monkeypatch, amx, capability, expected):
    """--channels-last auto: NHWC on a CPU with AVX-512 (with or without AMX), NCHW on an AVX2-only one;
    on, off, the bare flag and --no-channels-last as given; None, as older runs recorded auto, reads as auto."""
    import runtime
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    cpu = torch.device("cpu")
    parse = training_parser().parse_args
    assert parse([]).channels_last == "auto"
    assert runtime.resolve_channels_last(parse([]).channels_last, cpu) is expected
    assert runtime.resolve_channels_last(None, cpu) is expected
    assert runtime.resolve_channels_last(parse(["--channels-last"]).channels_last, cpu) is True
    assert runtime.resolve_channels_last(parse(["--channels-last", "off"]).channels_last, cpu) is False
    assert runtime.resolve_channels_last(parse(["--no-channels-last"]).channels_last, cpu) is False
    assert runtime.resolve_channels_last("auto", torch.device("cuda")) is True
