"""Generators (unet, spade with and without noise) x discriminators (patch, multiscale,
oasis), and the U-Net's resize upsampling: shapes for 128 px (depth 7) and 256 px (depth 8) tiles in both label sets,
a few training steps learn, save -> resume is exact and refuses another
architecture, the OASIS loss prefers a perfect discriminator, noise is seeded (tiled
generation at 1812 px included), and test.py --samples-per-mask writes K
reproducible drop-in trees."""
import contextlib
import shutil

import numpy as np
import pytest
import torch
from conftest import vivid_checkpoint
from conic_fixtures import make_conic
from test_training import assert_same_training_state

from dataset.conic import open_conic
from dataset.masks import CONIC, PANNUKE
from gan import build_discriminator, build_generator, generate, load_generator
from losses import oasis_d_loss
from runtime import make_optimizer
from tiling import generate_tiled
from train_utils import Networks, StepConfig, gan_train_step

GENERATORS = {"unet": dict(generator="unet"), "unet-resize": dict(generator="unet", upsample="resize"),
              "spade": dict(generator="spade"),
              "spade-noise": dict(generator="spade", noise_dim=4)}
DISCRIMINATORS = {"patch": dict(discriminator="patch"), "multiscale": dict(discriminator="multiscale", num_d_scales=3),
                  "oasis": dict(discriminator="oasis")}
COMBOS = [(g, d) for g in GENERATORS if g != "unet-resize" for d in DISCRIMINATORS] + [("unet-resize", "patch")]
CKPT = ("checkpoints", "last.pt")


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def model_cfg(gen, disc, label_set="conic", depth=7, **extra):
    return {"ngf": 8, "ndf": 8, "norm": "batch", "dropout": True, "label_set": label_set, "unet_depth": depth,
            "noise_dim": 0, **GENERATORS[gen], **DISCRIMINATORS[disc], **extra}


def blocky_batch(classes, size, batch=2, block=8, seed=0):
    """A one-hot mask of square class blocks and an image whose colour follows the class."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (batch, size // block, size // block), generator=g)
    labels = labels.repeat_interleave(block, 1).repeat_interleave(block, 2)
    mask = torch.nn.functional.one_hot(labels, classes).permute(0, 3, 1, 2).float()
    colours = torch.rand(classes, 3, generator=g) * 2 - 1
    return mask, colours[labels].permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("labels", [PANNUKE, CONIC], ids=["pannuke6", "conic7"])
@pytest.mark.parametrize("size,depth", [(128, 7), (256, 8)], ids=["128px", "256px"])
@pytest.mark.parametrize("gen,disc", COMBOS, ids=[f"{g}-{d}" for g, d in COMBOS])
def test_output_shapes(gen, disc, size, depth, labels, one_thread):
    torch.manual_seed(0)
    cfg = model_cfg(gen, disc, labels.name, depth)
    g, d = build_generator(cfg).eval(), build_discriminator(cfg).eval()
    n = labels.num_classes
    mask, real = blocky_batch(n, size, batch=1)
    with torch.no_grad():
        fake = generate(g, mask, contextlib.nullcontext())
        out = d(fake) if disc == "oasis" else d(mask, fake)
    assert fake.shape == (1, 3, size, size) and fake.abs().max() <= 1 and fake.std() > 0
    first = next(m for m in g.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == n + cfg["noise_dim"]
    if disc == "patch":
        assert out.shape == (1, 1, size // 8 - 2, size // 8 - 2)
    elif disc == "multiscale":
        sides = [size // 8 - 2, size // 16 - 2, size // 32 - 2]
        assert [scale[-1].shape for scale in out] == [(1, 1, s, s) for s in sides]
        assert all(len(scale) == 5 for scale in out)  # 4 LeakyReLU features + logits
    else:
        assert out.shape == (1, n + 1, size, size)


@pytest.mark.parametrize("labels", [PANNUKE, CONIC], ids=["pannuke6", "conic7"])
def test_resize_upsampling_paints_an_empty_mask_without_a_grid(labels, one_thread):
    """Issue 13's "regular grid of dark dots over empty regions": transposed convolutions
    weight the pixels of each 2x2 cell differently, so even an all-background mask comes out
    patterned; nearest x2 then a 3x3 convolution keeps a uniform input uniform."""
    mask = torch.zeros(1, labels.num_classes, 128, 128)
    mask[:, labels.background] = 1
    spread = {}
    for upsample in ("transpose", "resize"):
        torch.manual_seed(0)
        g = build_generator(model_cfg("unet", "patch", labels.name, 7, upsample=upsample))
        with torch.no_grad():
            fake = generate(g, mask, contextlib.nullcontext())
        spread[upsample] = fake[0, :, 8:-8, 8:-8].std((1, 2)).max().item()  # per channel, away from the borders
    assert spread["resize"] < 1e-5 and spread["transpose"] > 100 * max(spread["resize"], 1e-8), spread


def test_checkpoints_without_an_upsampling_are_transposed():
    old = build_generator({k: v for k, v in model_cfg("unet", "patch").items() if k != "upsample"})
    assert any(isinstance(m, torch.nn.ConvTranspose2d) for m in old.modules())
    resize = build_generator(model_cfg("unet-resize", "patch"))
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in resize.modules())


# --------------------------------------------------------------------------- training steps

def run_steps(gen, disc, steps, autocast=None, precision="fp32", **step_options):
    torch.manual_seed(0)
    cfg = model_cfg(gen, disc, depth=6, num_d_scales=2) if disc == "multiscale" else model_cfg(gen, disc, depth=6)
    g, d = build_generator(cfg), build_discriminator(cfg)
    cpu = torch.device("cpu")
    opt_g, opt_d = (make_optimizer(m.parameters(), 2e-3, (0.5, 0.999), cpu) for m in (g, d))
    scalers = [torch.amp.GradScaler("cpu", enabled=precision == "fp16") for _ in range(2)]
    step_cfg = StepConfig(l1_lambda=75.0, real_label_range=(0.7, 1.2), fake_label_range=(0.0, 0.3), smooth_real=True,
                          smooth_fake=True, autocast=autocast or contextlib.nullcontext(),
                          **{"feat_match_lambda": 10.0, "labelmix_lambda": 10.0, **step_options})
    mask, real = blocky_batch(CONIC.num_classes, 64)
    d_before = [p.detach().clone() for p in d.parameters()]
    nets = Networks(g, d, opt_g, opt_d, *scalers)
    losses = torch.stack([gan_train_step(nets, mask, real, step_cfg) for _ in range(steps)])
    assert any(not torch.equal(a, b) for a, b in zip(d_before, d.parameters())), "D was not updated"
    assert all(p.requires_grad for p in d.parameters()), "D stayed frozen after G's step"
    return losses


@pytest.mark.parametrize("gen,disc", COMBOS, ids=[f"{g}-{d}" for g, d in COMBOS])
def test_a_few_steps_lower_l1(gen, disc, one_thread):
    losses = run_steps(gen, disc, 16)
    assert losses.shape == (16, 3) and torch.isfinite(losses).all()
    l1 = losses[:, 2].tolist()
    assert l1[-1] < 0.85 * l1[0], f"L1 did not fall: {[round(v, 1) for v in l1]}"
    if disc == "oasis":  # D learns to segment the real image and to spot the fake one
        assert losses[-4:, 0].mean() < losses[:2, 0].mean(), losses[:, 0]


@pytest.mark.parametrize("disc", ["patch", "multiscale", "oasis"])
def test_multiscale_bce_and_autocast_steps_are_finite(disc, one_thread):
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        losses = run_steps("spade-noise", disc, 2, torch.autocast("cpu", dtype=dtype), precision)
        assert torch.isfinite(losses).all(), (precision, losses)
    if disc == "multiscale":
        assert torch.isfinite(run_steps("unet", disc, 2, gan_loss="bce")).all()


def test_pix2pix_step_ignores_the_new_options(one_thread):
    """The patch path is the pix2pix step: the multiscale and OASIS options change nothing."""
    plain = run_steps("unet", "patch", 2, feat_match_lambda=0.0, labelmix_lambda=0.0)
    assert torch.equal(plain, run_steps("unet", "patch", 2, gan_loss="bce"))


def test_oasis_loss_prefers_a_perfect_discriminator():
    """Real images are +1, fake ones -1: a perfect D gives the true class to real pixels
    and "fake" to fake ones (so its output on a LabelMix image is the mix of its outputs)."""
    n = CONIC.num_classes
    mask, _ = blocky_batch(n, 32)
    real, fake = torch.ones(2, 3, 32, 32), -torch.ones(2, 3, 32, 32)
    truth = torch.cat([mask, torch.zeros(2, 1, 32, 32)], 1) * 20 - 10
    fake_truth = torch.cat([torch.zeros_like(mask), torch.ones(2, 1, 32, 32)], 1) * 20 - 10

    def perfect(image):
        return torch.where(image[:, :1] > 0, truth, fake_truth)

    logits = torch.randn(3, 2, n + 1, 32, 32, generator=torch.Generator().manual_seed(0))
    answers = iter(logits)

    def random(image):
        return next(answers)

    cfg = StepConfig(l1_lambda=0.0, labelmix_lambda=10.0)
    torch.manual_seed(0)
    good = oasis_d_loss(perfect, mask, real, fake, cfg)
    bad = oasis_d_loss(random, mask, real, fake, cfg)
    assert good < 1e-3 < 1.0 < bad, (good, bad)


# --------------------------------------------------------------------------- noise

def test_noise_is_seeded_and_tiled_generation_works_at_1812_px(one_thread):
    torch.manual_seed(0)
    g = build_generator(model_cfg("spade-noise", "patch", depth=7)).eval()
    mask, _ = blocky_batch(CONIC.num_classes, 128, batch=2)
    cpu, fp32 = torch.device("cpu"), contextlib.nullcontext()
    a = generate(g, mask, fp32, seeds=[3, 4])
    assert torch.equal(a, generate(g, mask, fp32, seeds=[3, 4]))
    # The same image whatever shares its batch (up to the last bits of a batched convolution).
    assert torch.allclose(a[1:], generate(g, mask[1:], fp32, seeds=[4]), rtol=0, atol=1e-6 * a.abs().max())
    other = generate(g, mask[:1], fp32, seeds=[5])
    assert not torch.allclose(a[:1], other, rtol=0, atol=1e-3 * a.abs().max())
    assert not torch.equal(generate(g, mask, fp32, "train", [3, 4]), a)

    labels = np.random.default_rng(0).integers(0, CONIC.num_classes, (1812, 1812)).astype(np.uint8)

    def forward(mask, seeds):  # every tile of the image shares its noise vector
        return generate(g, mask, fp32, seeds=[7] * len(mask))

    fake = generate_tiled(forward, labels, cpu, overlap=32, batch_size=32, channels_last=False, tile=128,
                          num_classes=CONIC.num_classes)
    assert fake.shape == (3, 1812, 1812) and torch.isfinite(fake).all() and fake.abs().max() <= 1


def test_noise_needs_spade(tmp_path, conic_64, train_conic_in_process, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_conic_in_process(conic_argv(conic_64, tmp_path / "run", "--noise-dim", 4))
    assert exit_info.value.code == 2
    assert "--noise-dim 4 needs --generator spade" in capsys.readouterr().err


# --------------------------------------------------------------------------- save -> resume, test.py

@pytest.fixture(scope="module")
def conic_64(tmp_path_factory):
    """A CoNIC folder of 14 consistent 64-px patches (U-Net depth 6)."""
    root, _, _ = make_conic(tmp_path_factory.mktemp("conic") / "data", size=64, n_nuclei=10)
    return root


def conic_argv(data_dir, out_dir, *extra, epochs=1):
    return ["--data-dir", data_dir, "--out-dir", out_dir, "--epochs", epochs, "--batch-size", 4, "--ngf", 8,
            "--ndf", 8, "--workers", 0, "--precision", "fp32", "--device", "cpu", "--wandb", "disabled",
            "--num-samples", 1, "--save-every", 0, "--test-fraction", 0.3, *extra]


RUNS = {"spade-oasis-noise": ["--generator", "spade", "--noise-dim", 4, "--discriminator", "oasis", "--l1-lambda", 0],
        "unet-multiscale-pannuke": ["--discriminator", "multiscale", "--feat-match-lambda", 5, "--label-set", "pannuke",
                                    "--upsample", "resize"]}


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory, conic_64, train_conic_in_process, one_thread):
    """Per run: (2 epochs straight, 1 epoch then --resume to 2 with only runtime flags) checkpoint folders."""
    runs = {}
    for name, flags in RUNS.items():
        straight, resumed = tmp_path_factory.mktemp(f"{name}-straight"), tmp_path_factory.mktemp(f"{name}-resumed")
        train_conic_in_process(conic_argv(conic_64, straight, *flags, epochs=2))
        train_conic_in_process(conic_argv(conic_64, resumed, *flags, epochs=1))
        train_conic_in_process(conic_argv(conic_64, resumed, "--resume", resumed.joinpath(*CKPT), epochs=2))
        runs[name] = straight, resumed
    return runs


@pytest.mark.parametrize("name", RUNS)
def test_resume_equals_uninterrupted(name, resumed_runs):
    straight, resumed = (load(folder.joinpath(*CKPT)) for folder in resumed_runs[name])
    assert (resumed["epoch"], resumed["step"]) == (2, straight["step"])
    assert_same_training_state(resumed, straight)
    recorded = resumed["model_config"]
    if name.startswith("spade"):
        assert (recorded["generator"], recorded["discriminator"], recorded["noise_dim"]) == ("spade", "oasis", 4)
        assert "dropout" not in recorded and "num_d_scales" not in recorded
        assert resumed["config"]["l1_lambda"] == 0
    else:
        assert (recorded["generator"], recorded["discriminator"], recorded["num_d_scales"]) == ("unet", "multiscale", 2)
        assert recorded["label_set"] == "pannuke" and resumed["config"]["feat_match_lambda"] == 5
        assert recorded["upsample"] == "resize"


@pytest.mark.parametrize("flags,named", [(["--generator", "unet"], "--generator spade"),
                                         (["--noise-dim", 8], "--noise-dim 4"),
                                         (["--discriminator", "multiscale"], "--discriminator oasis")])
def test_resume_refuses_another_architecture(flags, named, resumed_runs, conic_64, train_conic_in_process, capsys,
                                             tmp_path):
    run = tmp_path / "run"
    shutil.copytree(resumed_runs["spade-oasis-noise"][1], run)
    with pytest.raises(SystemExit) as exit_info:
        train_conic_in_process(conic_argv(conic_64, run, "--resume", run.joinpath(*CKPT), *flags, epochs=3))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    asked = " ".join(map(str, flags))
    assert len(err) == 1 and named in err[0] and asked in err[0] and "leave out those flags" in err[0], err


def test_resume_refuses_another_upsampling(resumed_runs, conic_64, train_conic_in_process, capsys, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(resumed_runs["unet-multiscale-pannuke"][1], run)
    with pytest.raises(SystemExit) as exit_info:
        train_conic_in_process(conic_argv(conic_64, run, "--resume", run.joinpath(*CKPT), "--upsample", "transpose",
                                          epochs=3))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--upsample resize" in err[0] and "--upsample transpose" in err[0], err


def test_a_unet_saved_before_upsample_existed_resumes_with_transpose(conic_64, train_conic_in_process, capsys,
                                                                    tmp_path):
    """The default is now resize; a checkpoint that does not record --upsample was a transpose U-Net,
    and --resume goes on with that architecture instead of refusing or rebuilding it."""
    train_conic_in_process(conic_argv(conic_64, tmp_path, "--upsample", "transpose", epochs=1))
    last = tmp_path.joinpath(*CKPT)
    ckpt = load(last)
    del ckpt["model_config"]["upsample"], ckpt["config"]["upsample"]
    torch.save(ckpt, last)
    capsys.readouterr()
    train_conic_in_process(conic_argv(conic_64, tmp_path, "--resume", last, epochs=2))
    assert "--upsample transpose" in capsys.readouterr().out
    resumed = load(last)
    assert resumed["epoch"] == 2 and resumed["model_config"]["upsample"] == "transpose"
    assert any(k.endswith("ups.0.block.0.weight") and v.dim() == 4 and v.shape[-1] == 4
               for k, v in resumed["generator"].items())  # 4x4 transposed kernels


def sample_trees(out, k):
    return [open_conic(out / f"sample_{i}", check_data=True) for i in range(1, k + 1)]


def test_samples_per_mask_writes_k_reproducible_trees(resumed_runs, test_script, tmp_path, one_thread):
    checkpoint = vivid_checkpoint(resumed_runs["spade-oasis-noise"][1].joinpath(*CKPT), tmp_path / "spade.pt")
    out = tmp_path / "synthetic"
    argv = ["--checkpoint", checkpoint, "--dataset", "conic", "--out-dir", out, "--device", "cpu", "--precision",
            "fp32", "--samples-per-mask", 3, "--grids", 1]
    test_script.main(list(map(str, argv)))
    for folder in (out, tmp_path / "synthetic.tiles"):  # beside the owner's .run.* files
        assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".run.")) == \
            ["sample_1", "sample_2", "sample_3"]
    assert (tmp_path / "synthetic.grids" / "sample_3" / "grid_0000.png").is_file()
    trees = sample_trees(out, 3)
    names, labels = trees[0][2], np.asarray(trees[0][1])
    first = [np.array(images) for images, _, _ in trees]
    for images, tree_labels, tree_names in trees:  # the same masks in every tree
        assert tree_names == names and np.array_equal(tree_labels, labels)
    for i in range(len(names)):
        assert not np.array_equal(first[0][i], first[1][i]) and not np.array_equal(first[1][i], first[2][i])
        assert not np.array_equal(first[0][i], first[2][i])

    test_script.main(list(map(str, argv + ["--overwrite"])))
    for before, (images, _, _) in zip(first, sample_trees(out, 3)):
        assert np.array_equal(before, images), "the samples are not reproducible"


def test_samples_of_a_unet_vary_through_train_mode_dropout(resumed_runs, test_script, tmp_path, capsys, one_thread):
    checkpoint = vivid_checkpoint(resumed_runs["unet-multiscale-pannuke"][1].joinpath(*CKPT), tmp_path / "unet.pt")
    argv = ["--checkpoint", checkpoint, "--dataset", "conic", "--out-dir", tmp_path / "eval", "--device", "cpu",
            "--precision", "fp32", "--samples-per-mask", 2, "--grids", 0]
    with pytest.raises(SystemExit) as exit_info:
        test_script.main(list(map(str, argv)))
    assert exit_info.value.code == 2 and "add --norm-mode train" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()
    argv[argv.index(tmp_path / "eval")] = tmp_path / "train"
    test_script.main(list(map(str, argv + ["--norm-mode", "train"])))
    (one, _, _), (two, _, _) = sample_trees(tmp_path / "train", 2)
    assert all(not np.array_equal(a, b) for a, b in zip(one, two))


def test_a_spade_checkpoint_loads_for_generation(resumed_runs):
    generator, ckpt = load_generator(resumed_runs["spade-oasis-noise"][1].joinpath(*CKPT), torch.device("cpu"))
    assert generator.noise_dim == 4 and ckpt["model_config"]["unet_depth"] == 6
