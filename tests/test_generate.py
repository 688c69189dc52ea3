"""test.py on PanNuke: one PNG per test sample, grids, skip/overwrite, --norm-mode."""
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def generate(test_script, trained_checkpoint, pannuke_folds):
    def run(out_dir, *extra, data_dir=pannuke_folds):
        argv = ["--checkpoint", str(trained_checkpoint), "--dataset", "pannuke", "--data-dir", str(data_dir),
                "--out-dir", str(out_dir), "--device", "cpu", "--precision", "fp32", *map(str, extra)]
        test_script.main(argv)
        return out_dir
    return run


def read(path):
    return np.asarray(Image.open(path).convert("RGB"))


def pngs(folder):
    return sorted(p.name for p in folder.glob("*.png"))


def test_one_png_per_test_sample_with_names_and_sizes(tmp_path, generate, pannuke_folds_info):
    out = generate(tmp_path / "out", "--test-folds", 3)
    expected = [f"fold3_{i:05d}.png" for i in pannuke_folds_info.colon[3]]
    assert pngs(out) == expected
    for name in expected:
        image = read(out / name)
        assert image.shape == (256, 256, 3) and image.dtype == np.uint8
        assert image.std() > 0
    # Two samples, batch 8: one batch, one grid of rows mask | real | fake, beside the output folder.
    assert not (out / "grids").exists()
    grids = sorted((tmp_path / "out.grids").glob("*.png"))
    assert [g.name for g in grids] == ["grid_0000.png"]
    assert read(grids[0]).shape == (2 * 256 + 4, 3 * 256 + 2 * 4, 3)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")], "temporary files left behind"


def test_folds_and_tissue_select_the_samples(tmp_path, generate):
    out = generate(tmp_path / "out", "--test-folds", 1, 3, "--tissue", "BREAST", "--grids", 0)
    assert pngs(out) == ["fold1_00002.png", "fold3_00001.png"]
    assert not (tmp_path / "out.grids").exists()


def test_grid_count_follows_batches(tmp_path, generate):
    generate(tmp_path / "out", "--batch-size", 1, "--grids", 16, "--grids-dir", tmp_path / "g")
    assert pngs(tmp_path / "g") == ["grid_0000.png", "grid_0001.png"]
    assert read(tmp_path / "g" / "grid_0000.png").shape == (256, 3 * 256 + 8, 3)


def test_skips_existing_and_overwrite_regenerates(tmp_path, generate):
    out = generate(tmp_path / "out", "--grids", 0)
    names = pngs(out)
    first = {n: read(out / n) for n in names}
    # Replace one output with a marker image: a re-run must leave it alone ...
    marker = np.zeros((256, 256, 3), np.uint8)
    Image.fromarray(marker).save(out / names[0])
    os.utime(out / names[0], (1, 1))
    (out / names[1]).unlink()
    generate(out, "--grids", 0)
    assert np.array_equal(read(out / names[0]), marker)
    assert os.stat(out / names[0]).st_mtime == 1
    assert np.array_equal(read(out / names[1]), first[names[1]])  # missing one was written
    # ... and --overwrite regenerates it.
    generate(out, "--grids", 0, "--overwrite")
    assert np.array_equal(read(out / names[0]), first[names[0]])
    assert pngs(out) == names


def test_eval_mode_is_deterministic_and_batch_independent(tmp_path, generate):
    # The mechanics of eval-mode painting, on the one-step run's raw G (its average, near the
    # initial weights, is covered by test_ema_training.py).
    a = generate(tmp_path / "a", "--norm-mode", "eval", "--batch-size", 8, "--no-ema")
    b = generate(tmp_path / "b", "--norm-mode", "eval", "--batch-size", 1, "--no-ema")
    c = generate(tmp_path / "c", "--norm-mode", "eval", "--batch-size", 8, "--no-ema")
    assert pngs(a) == pngs(b) == pngs(c)
    for name in pngs(a):
        assert np.array_equal(read(a / name), read(c / name)), "eval mode is not deterministic"
        assert np.array_equal(read(a / name), read(b / name)), "eval mode depends on the batch size"


def test_train_mode_works_seeded_and_differs_from_eval(tmp_path, generate):
    a = generate(tmp_path / "a", "--norm-mode", "train", "--batch-size", 2)
    b = generate(tmp_path / "b", "--norm-mode", "train", "--batch-size", 1)
    e = generate(tmp_path / "e", "--norm-mode", "eval")
    assert pngs(a) == pngs(b) == pngs(e)
    for name in pngs(a):
        image = read(a / name)
        assert image.shape == (256, 256, 3)
        assert np.array_equal(image, read(b / name)), "train mode should be seeded per image"
        assert not np.array_equal(image, read(e / name))


def test_generation_leaves_the_checkpoint_untouched(tmp_path, generate, trained_checkpoint):
    before = trained_checkpoint.read_bytes()
    generate(tmp_path / "out", "--norm-mode", "train")
    assert trained_checkpoint.read_bytes() == before


def test_converted_layout_generation(tmp_path, generate, pannuke_converted):
    out = generate(tmp_path / "out", data_dir=pannuke_converted)
    assert pngs(out) == ["t_000.png", "t_001.png"]
    assert read(out / "t_000.png").shape == (256, 256, 3)


def test_data_dir_defaults_to_the_checkpoints(tmp_path, test_script, trained_checkpoint, pannuke_folds_info):
    test_script.main(["--checkpoint", str(trained_checkpoint), "--out-dir", str(tmp_path / "out"),
                      "--device", "cpu", "--precision", "fp32", "--grids", "0"])
    assert pngs(tmp_path / "out") == [f"fold3_{i:05d}.png" for i in pannuke_folds_info.colon[3]]


def test_test_help_lists_key_flags(test_script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        test_script.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--checkpoint", "--dataset", "--data-dir", "--test-folds", "--tissue", "--out-dir", "--norm-mode",
                 "--batch-size", "--grids", "--overwrite", "--device", "--precision"):
        assert flag in out, flag
