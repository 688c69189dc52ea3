"""CoNIC / Lizard end to end: the GAN and the segmenter train on the CoNIC layout,
the label set and the U-Net depth travel in the checkpoint (save -> resume ->
test.py), a checkpoint of another label set is refused, 128-px tiles get the
7-level U-Net and still generate at 1812 px, and real Lizard tiles train."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
from conic_fixtures import make_conic

from dataset.conic import CoNIC, gan_datasets, open_conic, read_split_file
from dataset.masks import CONIC
from gan import build_discriminator, build_generator, load_generator, prepare_batch
from runtime import make_optimizer
from tiling import generate_tiled
from train_utils import Networks, StepConfig, gan_train_step

LIZARD = SHARED_DATA / "lizard_128"
CKPT = ("checkpoints", "last.pt")


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def conic_128(tmp_path_factory):
    """A CoNIC folder of 14 consistent 128-px patches from 6 source images."""
    root, _, _ = make_conic(tmp_path_factory.mktemp("conic") / "data", size=128, n_nuclei=20)
    return root


def conic_argv(data_dir, out_dir, *extra, epochs=1):
    return ["--data-dir", str(data_dir), "--out-dir", str(out_dir), "--epochs", str(epochs), "--batch-size", "4",
            "--ngf", "8", "--ndf", "8", "--workers", "0", "--precision", "fp32", "--device", "cpu",
            "--wandb", "disabled", "--num-samples", "2", "--save-every", "0", "--test-fraction", "0.3",
            *map(str, extra)]


@pytest.fixture(scope="module")
def conic_run(tmp_path_factory, conic_128, train_conic_in_process):
    out = tmp_path_factory.mktemp("conic_run")
    train_conic_in_process(conic_argv(conic_128, out))
    return out


def test_conic_run_records_label_set_depth_and_split(conic_run, conic_128):
    ckpt = load(conic_run.joinpath(*CKPT))
    assert ckpt["model_config"]["label_set"] == "conic" and ckpt["model_config"]["unet_depth"] == 7
    # 7 classes in, so the first generator layer has 7 input channels.
    assert ckpt["generator"]["downs.0.block.0.weight"].shape[1] == CONIC.num_classes
    split = (conic_run / "split.csv").read_text().splitlines()
    assert split[0] == "patch_info,split" and len(split) == 1 + 14
    sides = {}
    for row in split[1:]:
        name, side = row.split(",")
        sides.setdefault(name.split("__")[0].split("-")[0], set()).add(side)
    assert all(len(s) == 1 for s in sides.values()), f"a source image on both sides: {sides}"
    assert (conic_run / "samples" / "epoch_0001.png").is_file()


def test_gan_samples_are_the_test_tiles_with_most_nuclei_first(conic_128, tmp_path):
    cfg = SimpleNamespace(data_dir=conic_128, seed=1, test_fraction=0.3, split_file=None, label_set="pannuke",
                          check_data=False, out_dir=tmp_path, instance_edges=False)
    train_set, samples = gan_datasets(cfg)
    train, test = read_split_file(tmp_path / "split.csv", train_set.all_names)
    assert np.array_equal(train, train_set.indices) and sorted(samples.indices) == sorted(test)
    assert samples.label_set.name == "pannuke"
    ranked = [(-int((samples.classes(i) > 0).sum()), int(samples.indices[i])) for i in range(len(samples))]
    assert ranked == sorted(ranked), "most nucleus pixels first, ties in tile order"


def test_label_set_survives_resume_and_test_py(conic_run, conic_128, train_conic_in_process, run_script, tmp_path):
    resumed = tmp_path / "resumed"
    import shutil
    shutil.copytree(conic_run, resumed)
    last = resumed.joinpath(*CKPT)
    train_conic_in_process(conic_argv(conic_128, resumed, "--resume", last, epochs=2))
    ckpt = load(last)
    assert ckpt["epoch"] == 2 and ckpt["model_config"]["label_set"] == "conic"
    out = tmp_path / "synthetic"
    res = run_script("test.py", "--checkpoint", last, "--dataset", "conic", "--out-dir", out, "--device", "cpu",
                     "--precision", "fp32", "--grids", 1)
    assert res.returncode == 0, res.stderr[-3000:]
    # A drop-in CoNIC folder: the loader reads it unchanged, labels are the real test patches'.
    images, labels, names = open_conic(out, check_data=True)
    real = CoNIC(conic_128)
    test_names = [row.split(",")[0] for row in (resumed / "split.csv").read_text().splitlines()[1:]
                  if row.endswith(",test")]
    assert names == test_names and images.shape[1:] == (128, 128, 3) and images.dtype == np.uint8
    for i, name in enumerate(names):
        assert np.array_equal(labels[i], real.labels[real.all_names.index(name)])
    assert not np.array_equal(images[0], real.images[real.all_names.index(names[0])])
    assert (tmp_path / "synthetic.grids" / "grid_0000.png").is_file()


def test_pannuke_checkpoint_refuses_conic_masks(trained_checkpoint, conic_128, run_script, tmp_path):
    res = run_script("test.py", "--checkpoint", trained_checkpoint, "--dataset", "conic", "--data-dir", conic_128,
                     "--out-dir", tmp_path / "out", "--device", "cpu", "--precision", "fp32")
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "conic label set" in err[0] and "pannuke label set" in err[0], res.stderr
    assert not (tmp_path / "out").exists()


def test_resume_on_other_label_set_is_refused(conic_run, conic_128, train_conic_in_process, capsys, tmp_path):
    argv = conic_argv(conic_128, tmp_path / "other", "--resume", conic_run.joinpath(*CKPT), "--label-set",
                      "pannuke", epochs=2)
    with pytest.raises(SystemExit) as exit_info:
        train_conic_in_process(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "conic label set" in err and "pannuke masks" in err


def test_128px_generator_generates_at_1812_px_tiled(conic_run):
    generator, ckpt = load_generator(conic_run.joinpath(*CKPT), torch.device("cpu"))
    assert generator.size_multiple == 128
    rng = np.random.default_rng(0)
    labels = rng.integers(0, CONIC.num_classes, (1812, 1812)).astype(np.uint8)

    def forward(mask, seeds):
        with torch.no_grad():
            return generator.eval()(mask)

    fake = generate_tiled(forward, labels, torch.device("cpu"), overlap=32, batch_size=16, channels_last=False,
                          tile=128, num_classes=CONIC.num_classes)
    assert fake.shape == (3, 1812, 1812) and torch.isfinite(fake).all() and fake.abs().max() <= 1
    one = forward(prepare_batch(torch.from_numpy(labels[:128, :128])[None], torch.zeros(1, 3, 128, 128),
                                torch.device("cpu"), False, CONIC.num_classes)[0], None)
    assert one.shape == (1, 3, 128, 128)


def test_segmenter_trains_on_conic_and_records_its_scale(conic_128, tmp_path):
    import train_segmenter
    out = tmp_path / "seg"
    train_segmenter.main(["--dataset", "conic", "--data-dir", str(conic_128), "--out-dir", str(out),
                          "--test-fraction", "0.3", "--label-set", "pannuke", "--epochs", "1", "--batch-size", "4",
                          "--width", "4", "--workers", "0", "--device", "cpu", "--precision", "fp32"])
    ckpt = load(out.joinpath(*CKPT))
    assert ckpt["model_config"]["label_set"] == "pannuke" and ckpt["mpp"] == pytest.approx(0.5)
    assert ckpt["model"]["head.weight"].shape[0] == 6


@pytest.mark.skipif(not (LIZARD / "images.npy").is_file(), reason="../shared/data/lizard_128 absent")
def test_a_few_steps_on_real_lizard_tiles_lower_l1():
    data = CoNIC(LIZARD)
    counts = [(data.classes(i) > 0).sum() for i in range(0, len(data), 10)]
    picks = [10 * i for i in np.argsort(counts)[-4:]]  # four tiles with many nuclei
    labels, images = map(torch.stack, zip(*(data[i] for i in picks)))
    torch.manual_seed(0)
    cfg = dict(ngf=8, ndf=8, norm="batch", dropout=False, label_set="conic", unet_depth=7)
    g, d = build_generator(cfg), build_discriminator(cfg)
    device = torch.device("cpu")
    opt_g = make_optimizer(g.parameters(), 2e-3, (0.5, 0.999), device)
    opt_d = make_optimizer(d.parameters(), 2e-3, (0.5, 0.999), device)
    scalers = [torch.amp.GradScaler("cpu", enabled=False) for _ in range(2)]
    step_cfg = StepConfig(l1_lambda=75.0, real_label_range=(0.7, 1.2), fake_label_range=(0.0, 0.3),
                          smooth_real=True, smooth_fake=True, autocast=torch.autocast("cpu", enabled=False))
    mask, real = prepare_batch(labels, images, device, False, CONIC.num_classes)
    first = gan_train_step(Networks(g, d, opt_g, opt_d, *scalers), mask, real, step_cfg)[2].item()
    for _ in range(14):
        last = gan_train_step(Networks(g, d, opt_g, opt_d, *scalers), mask, real, step_cfg)[2].item()
    assert last < 0.7 * first, (first, last)


def test_a_shared_tiles_dir_is_not_reused_across_checkpoints(conic_run, conic_128, run_script, tmp_path):
    """Run-folder case 7: the per-patch tiles of one checkpoint are never assembled into another's folder.
    Also case 20: test.py takes the dataset from the checkpoint (no --dataset)."""
    last = conic_run.joinpath(*CKPT)
    other = tmp_path / "other.pt"
    state = load(last)
    state["step"] += 1
    torch.save(state, other)
    tiles = tmp_path / "shared_tiles"

    def paint(checkpoint, out):
        return run_script("test.py", "--checkpoint", checkpoint, "--out-dir", tmp_path / out, "--tiles-dir", tiles,
                          "--device", "cpu", "--precision", "fp32", "--grids", 0)

    first = paint(last, "a")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "a" / "images.npy").is_file()
    before = {p.name: p.read_bytes() for p in tiles.glob("*.png")}
    second = paint(other, "b")
    assert second.returncode == 2 and "--tiles-dir" in second.stderr and "checkpoint_sha256" in second.stderr
    assert {p.name: p.read_bytes() for p in tiles.glob("*.png")} == before and not (tmp_path / "b").exists()
