"""UniToPatho: split reading, image/mask pairs, crops, the decode cache, training and
native-size generation, on a fixture built from the real split metadata (real file
names with spaces, parentheses and commas) with real H&E pixels."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, load_test_script
from PIL import Image
from utp_fixtures import UTP_META, make_utp_fixture, shared_data_available

from bench import loader_throughput
from dataset.masks import PALETTE, labels_to_rgb
from dataset.unitopatho import CLASSES, UniToPatho
from dataset.unitopatho_mask import DecodeCache, UniToPathoCentre, UniToPathoPairs, read_mask
from gan import load_generator
from runtime import autocast_context
from tiling import generate_tiled, generate_whole
from utils import UserError

pytestmark = pytest.mark.skipif(not shared_data_available(), reason="../shared/data (UniToPatho CSVs, H&E) absent")

SIZE = 300


@pytest.fixture(scope="module")
def utp(tmp_path_factory):
    """300 x 300 fixture: 2 train and 1 test image per class. Copy before changing it."""
    return make_utp_fixture(tmp_path_factory.mktemp("utp"), {"train": 2, "test": 1}, size=SIZE)


@pytest.fixture(scope="module")
def utp_native(tmp_path_factory):
    """Two test images at UniToPatho's native 1812 x 1812 (classes HP and TVA.LG)."""
    return make_utp_fixture(tmp_path_factory.mktemp("utp_native"), {"test": 1}, size=1812, classes=("HP", "TVA.LG"))


@pytest.fixture
def utp_copy(utp, tmp_path):
    data_dir, masks_dir = utp
    shutil.copytree(data_dir.parent, tmp_path / "copy")
    return tmp_path / "copy" / "800", tmp_path / "copy" / "masks"


def script_env():
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("WANDB_")}
    return {**env, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}


@pytest.fixture(scope="module")
def trained(utp, tmp_path_factory):
    """One epoch of `python train_utp.py` (batch norm, ngf 8) on the 300 px fixture."""
    data_dir, masks_dir = utp
    out = tmp_path_factory.mktemp("utp_run")
    cmd = [sys.executable, str(REPO / "train_utp.py"), "--data-dir", data_dir, "--masks-dir", masks_dir,
           "--out-dir", out, "--epochs", "1", "--batch-size", "4", "--crops-per-image", "1", "--ngf", "8",
           "--ndf", "8", "--norm", "batch", "--device", "cpu", "--precision", "fp32", "--workers", "0",
           "--wandb", "disabled", "--num-samples", "3", "--cache-dir", tmp_path_factory.mktemp("utp_cache")]
    proc = subprocess.run(list(map(str, cmd)), cwd=REPO, env=script_env(), capture_output=True, text=True,
                          timeout=600)
    return proc, out


# --------------------------------------------------------------------------- the split

@pytest.mark.parametrize("target", ["top_label", "type", "grade"])
def test_rows_targets_and_paths(utp, target):
    data_dir, _ = utp
    ds = UniToPatho(data_dir, "train", target=target)
    real = pd.read_csv(UTP_META / "train.csv", index_col=0).set_index("image_id")
    assert len(ds) == 12 and ds.classes == CLASSES[target]
    assert list(ds.rows.columns) == list(real.reset_index().columns)  # every official column kept
    assert any(" " in n and "(" in n and "," in n for n in ds.names)
    for i, row in ds.rows.iterrows():
        ref = real.loc[row["image_id"]]
        assert ds.targets[i] == ref[target] == row[target]
        if ref[target] >= 0:
            assert ds.classes[ds.targets[i]] == ref[f"{target}_name"]
        else:
            assert target == "grade" and ref["top_label_name"] in ("HP", "NORM")
        assert ds.paths[i] == data_dir / ref["top_label_name"] / row["image_id"] and ds.paths[i].is_file()
    image, label = ds[0]
    assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.uint8 and label == ds.targets[0]
    assert UniToPatho(data_dir, "test", target=target, downsample=2)[0][0].shape == (3, SIZE // 2, SIZE // 2)


def test_grade_only_keeps_graded_rows(utp):
    ds = UniToPatho(utp[0], "train", target="grade", grade_only=True)
    assert len(ds) == 8 and set(ds.targets) == {0, 1}
    assert not set(ds.rows["top_label_name"]) & {"HP", "NORM"}


def test_missing_images_reported_together(utp_copy):
    data_dir, _ = utp_copy
    ds = UniToPatho(data_dir, "train")
    for p in ds.paths[:7]:
        p.unlink()
    with pytest.raises(UserError) as err:
        UniToPatho(data_dir, "train")
    text = str(err.value)
    assert "7 image(s) missing" in text and str(ds.paths[0]) in text and "and 2 more" in text


def test_split_file_errors(utp_copy):
    data_dir, _ = utp_copy
    with pytest.raises(UserError, match="split file not found"):
        UniToPatho(data_dir / "nowhere", "train")
    rows = pd.read_csv(data_dir / "train.csv", index_col=0)
    rows.drop(columns=["top_label"]).to_csv(data_dir / "train.csv")
    with pytest.raises(UserError, match="lacks column\\(s\\) top_label"):
        UniToPatho(data_dir, "train")
    rows.assign(type=7).to_csv(data_dir / "train.csv")
    with pytest.raises(UserError, match="column 'type' holds 7"):
        UniToPatho(data_dir, "train")
    with pytest.raises(UserError, match="unknown UniToPatho target"):
        UniToPatho(data_dir, "test", target="tissue")


# --------------------------------------------------------------------------- masks

def test_palette_round_trip_with_noise(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, (64, 80)).astype(np.uint8)
    noisy = np.clip(labels_to_rgb(labels).astype(int) + rng.integers(-20, 21, (64, 80, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(tmp_path / "m a s k (1,2).png")
    Image.new("RGB", (80, 64)).save(tmp_path / "image.png")
    assert np.array_equal(read_mask(tmp_path / "m a s k (1,2).png", tmp_path / "image.png"), labels)


def test_off_palette_colour_names_file_and_colour(utp_copy):
    data_dir, masks_dir = utp_copy
    pairs = UniToPathoPairs(UniToPatho(data_dir, "train"), masks_dir)
    path = pairs.mask_paths[3]
    rgb = np.array(Image.open(path))
    rgb[10:20, 10:20] = (128, 128, 128)
    Image.fromarray(rgb).save(path)
    with pytest.raises(UserError) as err:
        pairs[3]
    assert str(path) in str(err.value) and "(128, 128, 128) (100 px)" in str(err.value)


def test_mask_of_wrong_size_rejected(utp_copy):
    data_dir, masks_dir = utp_copy
    pairs = UniToPathoPairs(UniToPatho(data_dir, "train"), masks_dir)
    path = pairs.mask_paths[1]
    Image.open(path).crop((0, 0, SIZE - 10, SIZE)).save(path)
    with pytest.raises(UserError, match=f"mask is {SIZE - 10} x {SIZE} px but its image .* is {SIZE} x {SIZE} px"):
        pairs[1]


def test_missing_masks_reported_together(utp_copy):
    data_dir, masks_dir = utp_copy
    split = UniToPatho(data_dir, "test")
    for name in split.names[:2]:
        (masks_dir / "test" / "masks" / name).unlink()
    with pytest.raises(UserError) as err:
        UniToPathoPairs(split, masks_dir)
    assert "2 mask(s) missing" in str(err.value) and split.names[0] in str(err.value)


# --------------------------------------------------------------------------- crops and cache

def paint_images_with_masks(data_dir, masks_dir):
    """Replace every train image by its mask's palette colours: then image and labels
    of an aligned crop satisfy image == PALETTE[labels] exactly."""
    for path in UniToPatho(data_dir, "train").paths:
        shutil.copyfile(masks_dir / "training" / "masks" / path.name, path)


@pytest.mark.parametrize("scheme,count", [("random", 3), ("fivecrop", 5)])
def test_crops_stay_aligned_under_augmentation(utp_copy, scheme, count):
    data_dir, masks_dir = utp_copy
    paint_images_with_masks(data_dir, masks_dir)
    pairs = UniToPathoPairs(UniToPatho(data_dir, "train"), masks_dir, 256, 3, scheme, augment=True)
    for index, seed in [(0, 1), (5, 2), (11, 3)]:
        labels, images = pairs[(index, seed)]
        assert labels.shape == (count, 256, 256) and images.shape == (count, 3, 256, 256)
        assert labels.dtype == images.dtype == torch.uint8
        assert np.array_equal(PALETTE[labels.numpy()], images.permute(0, 2, 3, 1).numpy())
        again = pairs[(index, seed)]
        assert torch.equal(again[0], labels) and torch.equal(again[1], images)  # seeded: reproducible
    assert not torch.equal(pairs[(0, 1)][1], pairs[(0, 2)][1])


def test_fivecrop_takes_corners_and_centre(utp):
    data_dir, masks_dir = utp
    pairs = UniToPathoPairs(UniToPatho(data_dir, "train"), masks_dir, 256, 1, "fivecrop", augment=False)
    labels, images = pairs[4]
    full, _ = pairs.decode(4)
    o = SIZE - 256
    for k, (y, x) in enumerate([(0, 0), (0, o), (o, 0), (o, o), (o // 2, o // 2)]):
        assert np.array_equal(images[k].permute(1, 2, 0).numpy(), full[y:y + 256, x:x + 256])
    centre = UniToPathoCentre(UniToPatho(data_dir, "train"), masks_dir)[4]
    assert torch.equal(centre[0], labels[4]) and torch.equal(centre[1], images[4])


def test_cache_gives_identical_items(utp, tmp_path):
    data_dir, masks_dir = utp
    split = UniToPatho(data_dir, "train")
    plain = UniToPathoPairs(split, masks_dir, crops_per_image=2)
    cached = UniToPathoPairs(split, masks_dir, crops_per_image=2, cache_dir=tmp_path / "cache")
    for item in [(0, 7), (3, 8), (3, 8), 9]:  # (3, 8) twice: written, then memory-mapped
        a, b = plain[item], cached[item]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    image, labels = cached.cache.load(split.paths[3], cached.mask_paths[3])
    assert isinstance(image, np.memmap) and image.shape == (SIZE, SIZE, 3) and labels.shape == (SIZE, SIZE)
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(files) == 6 and all(f.endswith((".image.npy", ".labels.npy")) for f in files)  # no temp files left
    centre = UniToPathoCentre(split, masks_dir)[3]
    assert torch.equal(centre[1], UniToPathoCentre(split, masks_dir, cache_dir=tmp_path / "cache")[3][1])


def test_cache_follows_a_regenerated_mask(utp_copy, tmp_path):
    data_dir, masks_dir = utp_copy
    split = UniToPatho(data_dir, "train")
    cached = UniToPathoPairs(split, masks_dir, cache_dir=tmp_path / "cache")
    before = cached.decode(0)[1].copy()
    Image.fromarray(labels_to_rgb(np.full((SIZE, SIZE), 2, np.uint8))).save(cached.mask_paths[0])
    os.utime(cached.mask_paths[0], ns=(1, 1))  # a different mtime even on coarse clocks
    after = cached.decode(0)[1]
    assert (after == 2).all() and not np.array_equal(before, after)
    assert isinstance(DecodeCache(tmp_path / "cache").load(split.paths[0], cached.mask_paths[0])[1], np.memmap)


def test_loader_throughput_reports_rates(utp, tmp_path):
    data_dir, masks_dir = utp
    for cache in (None, tmp_path / "cache"):
        stats = loader_throughput(data_dir, masks_dir, workers=0, cache_dir=cache, images=4, batch_size=2,
                                  crops_per_image=2)
        assert stats["images"] == 4 and stats["crops"] == 8 and stats["images_per_s"] > 0
        assert stats["crops_per_s"] == pytest.approx(2 * stats["images_per_s"])


# --------------------------------------------------------------------------- training

def test_train_utp_one_epoch_writes_checkpoint_and_samples(trained):
    proc, out = trained
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoints" / "last.pt").is_file()
    grid = Image.open(out / "samples" / "epoch_0001.png")
    assert grid.height > 3 * 256  # three sample rows: mask | real | fake
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["model_config"]["norm"] == "batch"


def test_train_utp_reports_missing_masks(utp_copy, tmp_path, capsys):
    import train_utp
    data_dir, masks_dir = utp_copy
    shutil.rmtree(masks_dir / "training")
    with pytest.raises(SystemExit) as exit_info:
        train_utp.main(["--data-dir", str(data_dir), "--masks-dir", str(masks_dir), "--out-dir", str(tmp_path / "run"),
                        "--device", "cpu", "--wandb", "disabled", "--ngf", "8", "--ndf", "8"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "error: 12 mask(s) missing" in err and "training/masks" in err


# --------------------------------------------------------------------------- generation

def local_net():
    """A small conv net (receptive field 9 px): tiling can match it exactly away from seams."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(6, 8, 5, padding=2, padding_mode="reflect"), torch.nn.Tanh(),
                              torch.nn.Conv2d(8, 3, 5, padding=2, padding_mode="reflect"), torch.nn.Tanh())
    return lambda mask, seeds: net(mask).detach()


@pytest.mark.parametrize("shape", [(700, 900), (300, 300), (200, 180)])
def test_tiled_matches_whole_away_from_seams(shape):
    forward = local_net()
    labels = np.random.default_rng(1).integers(0, 6, shape).astype(np.uint8)
    whole = generate_whole(forward, labels, torch.device("cpu"), channels_last=False)
    tiled = generate_tiled(forward, labels, torch.device("cpu"), overlap=64, batch_size=3, channels_last=False)
    assert whole.shape == tiled.shape == (3, *shape)
    interior = (whole - tiled).abs()[:, 8:-8, 8:-8]
    assert interior.mean() < 1e-4 and interior.max() < 5e-3
    if min(shape) > 256:
        # Without overlap the tile borders show: the window blending is what removes them.
        hard = generate_tiled(forward, labels, torch.device("cpu"), overlap=0, batch_size=3, channels_last=False)
        assert (whole - hard).abs()[:, 8:-8, 8:-8].max() > 0.05


def test_generation_mirrors_the_split_at_native_size(utp_native, trained, tmp_path, capsys):
    data_dir, masks_dir = utp_native
    checkpoint = trained[1] / "checkpoints" / "last.pt"
    script = load_test_script()
    # The raw G: the one-epoch run's average is still near its initial weights, whose paintings
    # depend more on the context a tile sees than trained weights do.
    common = ["--checkpoint", str(checkpoint), "--dataset", "unitopatho", "--data-dir", str(data_dir),
              "--masks-dir", str(masks_dir), "--device", "cpu", "--precision", "fp32", "--grids", "1", "--no-ema"]
    whole_dir, tiled_dir = tmp_path / "whole", tmp_path / "tiled"
    script.main(common + ["--out-dir", str(whole_dir)])
    script.main(common + ["--out-dir", str(tiled_dir), "--tile", "--tile-overlap", "64", "--batch-size", "16"])

    split = UniToPatho(data_dir, "test")
    for out in (whole_dir, tiled_dir):
        assert (out / "test.csv").read_bytes() == (data_dir / "test.csv").read_bytes()
        synthetic = UniToPatho(out, "test")  # a drop-in dataset: same rows, same relative paths
        assert [p.relative_to(out) for p in synthetic.paths] == [p.relative_to(data_dir) for p in split.paths]
        assert {p.name for p in out.iterdir() if p.is_dir()} == {"HP", "TVA.LG"}  # grids go beside, in OUT.grids
        assert len(list(out.with_name(out.name + ".grids").glob("*.png"))) == 1
        for path in synthetic.paths:
            assert Image.open(path).size == (1812, 1812) and Image.open(path).mode == "RGB"
    # Eval-mode batch norm: both modes run the same per-pixel model on different context,
    # so colours agree; the exact tiling check is test_tiled_matches_whole_away_from_seams.
    for path in split.paths:
        whole = np.asarray(Image.open(whole_dir / path.relative_to(data_dir)), np.float32)[64:-64, 64:-64]
        tiled = np.asarray(Image.open(tiled_dir / path.relative_to(data_dir)), np.float32)[64:-64, 64:-64]
        assert np.abs(whole - tiled).mean() < 4

    # Re-running skips what exists; --overwrite regenerates.
    stamps = {p: p.stat().st_mtime_ns for p in whole_dir.glob("*/*.png")}
    capsys.readouterr()
    script.main(common + ["--out-dir", str(whole_dir), "--grids", "0"])
    assert "2 already done" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in whole_dir.glob("*/*.png")} == stamps


def test_generation_shards_across_ranks(utp, trained, tmp_path):
    data_dir, masks_dir = utp
    script = load_test_script()
    args = script.test_parser().parse_args([
        "--checkpoint", str(trained[1] / "checkpoints" / "last.pt"), "--dataset", "unitopatho", "--data-dir",
        str(data_dir), "--masks-dir", str(masks_dir), "--out-dir", str(tmp_path / "out"), "--grids", "0"])
    cpu = torch.device("cpu")
    generator, ckpt = load_generator(args.checkpoint, cpu)
    count = script.generate_unitopatho(args, script.Painter(generator, ckpt, cpu, autocast_context(cpu, "fp32"),
                                                            rank=1, world_size=2))
    split = UniToPatho(data_dir, "test")
    written = sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").glob("*/*.png"))
    # The count is the split's; this rank wrote its share, rows 1, 3, 5.
    assert count == len(split) == 6 and written == sorted(p.relative_to(data_dir) for p in split.paths[1::2])
    assert not (tmp_path / "out" / "test.csv").exists()  # rank 0 copies the CSV
    assert Image.open(tmp_path / "out" / written[0]).size == (SIZE, SIZE)
