"""Folder datasets (dataset/folder.py, train_folder.py, test.py --dataset folder): index
and colour masks read alike, a folder written from lizard_128 gives dataset/conic.py's
items, names pair across extensions, bad input gives one line, a tiny run trains and
resumes, and what test.py paints reads back as a folder dataset.

Folders are written here with plain PIL/numpy/json in the documented layout."""
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import REPO, SHARED_DATA, preserved_signal_handlers
from PIL import Image

from dataset.conic import CoNIC, patch_source, split_by_source
from dataset.folder import FolderTiles, open_folder, split_folder
from dataset.masks import CONIC
from gan import prepare_batch
from utils import UserError

LIZARD = SHARED_DATA / "lizard_128"
# Classes with ids that are not their indices, one above 255 (16-bit masks).
CLASSES = {"name": "tiny", "background": 7, "classes": [
    {"id": 3, "name": "Tumour", "colour": [0, 0, 255]},
    {"id": 7, "name": "Background", "colour": [255, 255, 255]},
    {"id": 300, "name": "Immune", "colour": [0, 160, 0]},
]}
IDS = [c["id"] for c in CLASSES["classes"]]
COLOURS = np.array([c["colour"] for c in CLASSES["classes"]], np.uint8)
TISSUE = np.array([(70, 30, 120), (235, 200, 225), (40, 20, 90)], np.uint8)  # image colour of each class


def class_map(seed, h, w):
    """(H, W) class indices 0..2: discs of classes 0 and 2 on background 1."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    labels = np.ones((h, w), np.uint8)
    for k in range(6):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(3, 10)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = (0, 2)[k % 2]
    return labels


def save_mask(path, labels, kind):
    """Write class indices as an index PNG (16-bit ids) or an RGB palette PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "index":
        Image.fromarray(np.array(IDS, np.uint16)[labels]).save(path)
    else:
        Image.fromarray(COLOURS[labels]).save(path)


def write_folder(root, tiles, kind="index", classes=CLASSES):
    """tiles: {name: (image extension, (H, W) class indices)}; images coloured by class."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for name, (ext, labels) in tiles.items():
        Image.fromarray(TISSUE[labels]).save(root / "images" / f"{name}{ext}")
        save_mask(root / "masks" / f"{name}.png", labels, kind)
    if classes is not None:
        (root / "classes.json").write_text(json.dumps(classes))
    return root


def tiny_tiles(count=6, h=72, w=80):
    # Sources a, b, c: the seeded split keeps each on one side.
    return {f"{'abc'[k % 3]}_{k:02d}": (".png", class_map(k, h, w)) for k in range(count)}


def test_index_and_palette_masks_give_the_same_onehot(tmp_path):
    labels = class_map(0, 40, 56)
    for kind in ("index", "colour"):
        write_folder(tmp_path / kind, {"t": (".png", labels)}, kind)
    # A palette-mode PNG holding the same colours.
    shutil.copytree(tmp_path / "colour", tmp_path / "palette")
    Image.fromarray(COLOURS[labels]).quantize(colors=3).save(tmp_path / "palette" / "masks" / "t.png")
    assert Image.open(tmp_path / "palette" / "masks" / "t.png").mode == "P"
    onehots = []
    for kind in ("index", "colour", "palette"):
        item = FolderTiles(open_folder(tmp_path / kind))[0]
        onehots.append(prepare_batch(item[0][None], item[1][None], "cpu", False, 3)[0])
    expected = torch.nn.functional.one_hot(torch.from_numpy(labels).long(), 3).permute(2, 0, 1)[None].float()
    for onehot in onehots:
        assert torch.equal(onehot, expected)


def test_demo_drawn_mask_is_a_folder_of_conic_masks():
    folder = open_folder(REPO / "demo_assets" / "drawn_masks", CONIC, masks_only=True, check_data=True)
    classes = FolderTiles(folder).classes(0)
    assert folder.names == ["drawn_mask"] and classes.shape == (192, 256)
    assert set(np.unique(classes)) == set(range(CONIC.num_classes))


@pytest.fixture(scope="module")
def lizard_folder(tmp_path_factory):
    """The first 20 lizard_128 tiles as a folder: images as PNG or TIFF, index masks,
    instance maps as 16-bit PNG or .npy, the CoNIC classes in classes.json."""
    if not (LIZARD / "images.npy").is_file():
        pytest.skip(f"lizard_128 not found under {LIZARD}")
    root = tmp_path_factory.mktemp("lizard") / "folder"
    images = np.load(LIZARD / "images.npy", mmap_mode="r")
    labels = np.load(LIZARD / "labels.npy", mmap_mode="r")
    names = (LIZARD / "patch_info.csv").read_text().split()[1:21]
    for sub in ("images", "masks", "instances"):
        (root / sub).mkdir(parents=True)
    for i, name in enumerate(names):
        Image.fromarray(np.asarray(images[i])).save(root / "images" / f"{name}{('.png', '.tif')[i % 2]}")
        Image.fromarray(np.asarray(labels[i, ..., 1], np.uint8)).save(root / "masks" / f"{name}.png")
        if i % 2:
            np.save(root / "instances" / f"{name}.npy", np.asarray(labels[i, ..., 0], np.int32))
        else:
            Image.fromarray(np.asarray(labels[i, ..., 0], np.uint16)).save(root / "instances" / f"{name}.png")
    record = {"name": "lizard", "background": 0, "classes": [
        {"id": k, "name": n, "colour": [int(v) for v in c]} for k, (n, c) in enumerate(zip(CONIC.class_names,
                                                                                          CONIC.palette))]}
    (root / "classes.json").write_text(json.dumps(record))
    return root, names


def test_lizard_folder_gives_the_conic_items(lizard_folder):
    root, names = lizard_folder
    folder = open_folder(root, check_data=True)
    assert folder.names == sorted(names) and folder.label_set.same_classes(CONIC)
    conic, conic_aug = CoNIC(LIZARD, np.arange(20)), CoNIC(LIZARD, np.arange(20), augment=True)
    tiles, tiles_aug = FolderTiles(folder), FolderTiles(folder, crop_size=128, augment=True)
    for i, name in enumerate(folder.names):
        j = names.index(name)
        for a, b in ((tiles[i], conic[j]), (tiles_aug[(i, 11 + i)], conic_aug[(j, 11 + i)])):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert np.array_equal(tiles.classes(i), conic.classes(j))
        assert np.array_equal(tiles.instances(i), conic.instances(j))
    # The seeded split puts the same tiles on each side as the CoNIC split of those names.
    folder_sides = [sorted(folder.names[k] for k in side) for side in split_folder(folder, seed=3)]
    conic_sides = [sorted(names[k] for k in side) for side in split_by_source(names, seed=3, source=patch_source)]
    assert folder_sides == conic_sides and all(folder_sides)


def test_names_pair_across_extensions_and_missing_partners_are_listed(tmp_path):
    labels = class_map(1, 32, 32)
    root = write_folder(tmp_path / "d", {"a": (".png", labels), "b": (".jpg", labels), "c": (".tif", labels)})
    assert open_folder(root).names == ["a", "b", "c"]
    Image.fromarray(TISSUE[labels]).save(root / "images" / "lonely.png")
    for name in ("m1", "m2"):
        save_mask(root / "masks" / f"{name}.png", labels, "index")
    with pytest.raises(UserError) as err:
        open_folder(root)
    text = str(err.value)
    assert "1 image(s) without a mask" in text and "lonely" in text
    assert "2 mask(s) without an image" in text and "m1, m2" in text and "\n" not in text


# --------------------------------------------------------------------------- the scripts

def folder_argv(data_dir, out_dir, *extra, epochs=1):
    return ["--data-dir", data_dir, "--out-dir", out_dir, "--epochs", epochs, "--batch-size", 2, "--crop-size", 64,
            "--ngf", 4, "--ndf", 4, "--workers", 0, "--precision", "fp32", "--device", "cpu", "--wandb", "disabled",
            "--num-samples", 1, "--save-every", 0, "--test-fraction", 0.3, *extra]


def train_folder(argv):
    import train_folder
    with preserved_signal_handlers():
        train_folder.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A 2-step run on 6 tiles of 72 x 80 px (sources a, b, c) without classes.json."""
    root = write_folder(tmp_path_factory.mktemp("tiny") / "data", tiny_tiles(), classes=None)
    out = tmp_path_factory.mktemp("folder_run")
    train_folder(folder_argv(root, out))
    return root, out


def test_training_run_records_split_and_classes_and_resumes(folder_run, tmp_path, capsys):
    root, out = folder_run
    ckpt = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["model_config"]["unet_depth"] == 6
    rows = [r.split(",") for r in (out / "split.csv").read_text().splitlines()]
    assert rows[0] == ["name", "split"] and len(rows) == 7
    sides = {}
    for name, side in rows[1:]:
        sides.setdefault(name[0], set()).add(side)
    assert all(len(s) == 1 for s in sides.values())
    # Inferred from the 16-bit masks: the ids, with background 7 (no 0 among them: the most common value).
    inferred = json.loads((out / "classes.json").read_text())
    assert [c["id"] for c in inferred["classes"]] == IDS and inferred["background"] == 7
    assert ckpt["model_config"]["label_set"]["classes"] == inferred["classes"]
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    capsys.readouterr()
    train_folder(folder_argv(root, resumed, "--resume", resumed / "checkpoints" / "last.pt", epochs=2))
    assert "inferred" in capsys.readouterr().out
    ckpt = torch.load(resumed / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 4


def test_masks_only_paints_any_size_into_a_folder_dataset(folder_run, run_script, tmp_path):
    root, out = folder_run
    masks = tmp_path / "drawn"
    sizes = {"big": (70, 150), "small": (40, 50)}
    for name, (h, w) in sizes.items():
        save_mask(masks / f"{name}.png", class_map(len(name), h, w), "index")
    (masks / "classes.json").write_text((out / "classes.json").read_text())
    painted = tmp_path / "painted"
    res = run_script("test.py", "--checkpoint", out / "checkpoints" / "last.pt", "--dataset", "folder",
                     "--masks-only", "--data-dir", masks, "--out-dir", painted, "--tile", "--tile-overlap", 16,
                     "--device", "cpu", "--precision", "fp32", "--grids", 1)
    assert res.returncode == 0, res.stderr[-3000:]
    back = open_folder(painted, check_data=True)
    assert back.names == ["big", "small"] and back.sizes == [sizes["big"], sizes["small"]]
    assert back.label_set.same_classes(open_folder(root).label_set)
    for name in sizes:
        assert (painted / "masks" / f"{name}.png").read_bytes() == (masks / f"{name}.png").read_bytes()
    labels, image = FolderTiles(back)[0]
    assert image.shape == (3, 70, 150) and image.dtype == torch.uint8
    assert (tmp_path / "painted.grids" / "grid_0000.png").is_file()


def test_test_split_is_painted_as_a_folder(folder_run, run_script, tmp_path):
    root, out = folder_run
    res = run_script("test.py", "--checkpoint", out / "checkpoints" / "last.pt", "--dataset", "folder",
                     "--out-dir", tmp_path / "synthetic", "--device", "cpu", "--precision", "fp32", "--grids", 0)
    assert res.returncode == 0, res.stderr[-3000:]
    test_names = [r.split(",")[0] for r in (out / "split.csv").read_text().splitlines()[1:] if r.endswith(",test")]
    back = open_folder(tmp_path / "synthetic")
    assert back.names == sorted(test_names) and all(s == (72, 80) for s in back.sizes)


def test_masks_of_other_classes_are_refused_naming_both(folder_run, run_script, tmp_path):
    _, out = folder_run
    masks = tmp_path / "drawn"
    save_mask(masks / "x.png", class_map(0, 40, 40), "index")
    (masks / "classes.json").write_text(json.dumps({**CLASSES, "classes": CLASSES["classes"][:2], "background": 7}))
    res = run_script("test.py", "--checkpoint", out / "checkpoints" / "last.pt", "--dataset", "folder",
                     "--masks-only", "--data-dir", masks, "--out-dir", tmp_path / "p", "--device", "cpu")
    err = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(err) == 1 and "Traceback" not in res.stderr
    assert "tiny label set" in err[0] and "class_300" in err[0] and "classes.json" in err[0]


def break_value(root):
    labels = class_map(0, 72, 80)
    Image.fromarray(np.where(labels == 1, 9, 3).astype(np.uint8)).save(root / "masks" / "a_00.png")


def break_size(root):
    Image.fromarray(TISSUE[class_map(0, 72, 64)]).save(root / "images" / "a_00.png")


def empty(root):
    shutil.rmtree(root)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()


def small_tile(root):
    labels = class_map(0, 72, 48)
    Image.fromarray(TISSUE[labels]).save(root / "images" / "a_00.png")
    save_mask(root / "masks" / "a_00.png", labels, "index")


def bad_classes(root):
    (root / "classes.json").write_text(json.dumps({**CLASSES, "background": 5}))


def unmatched(root):
    (root / "masks" / "a_00.png").unlink()


@pytest.mark.parametrize("damage, expected", [
    (break_value, ["a_00.png", "value 9", "tiny label set"]),
    (break_size, ["a_00.png", "64 x 72", "80 x 72"]),
    (empty, ["holds no images and no masks"]),
    (small_tile, ["a_00.png", "smaller than --crop-size 64"]),
    (bad_classes, ["classes.json", "background must be one of the class ids"]),
    (unmatched, ["1 image(s) without a mask", "a_00"]),
])
def test_bad_input_gives_one_line(damage, expected, tmp_path, capsys):
    root = write_folder(tmp_path / "data", tiny_tiles())
    damage(root)
    with pytest.raises(SystemExit) as exit_info:
        train_folder(folder_argv(root, tmp_path / "run"))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert all(text in err[0] for text in expected), err[0]


def test_a_lizard_folder_trains_on_the_conic_runs_tiles_and_shows_the_same_masks(lizard_folder, tmp_path):
    """train_folder.py and train_conic.py on the same 20 tiles: the same training set size (hence the
    same steps) and sample grids of the same masks, in the same order."""
    import config
    import train_folder
    from dataset.conic import gan_datasets, write_conic_folder
    root, names = lizard_folder
    conic_dir = tmp_path / "conic"
    write_conic_folder(conic_dir, np.load(LIZARD / "images.npy")[:20], np.load(LIZARD / "labels.npy")[:20], names)

    def settled(add_data_args, data_dir, out):
        parser = config.training_parser("x", add_data_args, str(out))
        return parser.parse_args(["--data-dir", str(data_dir), "--out-dir", str(out), "--crop-size", "128"]
                                 if add_data_args is config.add_folder_training_data_args
                                 else ["--data-dir", str(data_dir), "--out-dir", str(out)])

    folder_train, folder_shown = train_folder.build_datasets(
        settled(config.add_folder_training_data_args, root, tmp_path / "f"))
    conic_train, conic_shown = gan_datasets(settled(config.add_conic_training_data_args, conic_dir, tmp_path / "c"))
    assert len(folder_train) == len(conic_train) > 0
    assert sorted(folder_train.names) == sorted(conic_train.names)
    assert folder_shown.names == conic_shown.names
    for i in range(len(folder_shown)):
        assert torch.equal(folder_shown[i][0], conic_shown[i][0])


def test_instance_edges_are_refused_for_folder_data(tmp_path, capsys):
    root = write_folder(tmp_path / "data", tiny_tiles())
    with pytest.raises(SystemExit) as exit_info:
        train_folder(folder_argv(root, tmp_path / "run", "--instance-edges"))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "--instance-edges needs nucleus instance maps" in err[0], err
    assert str(root) in err[0]
