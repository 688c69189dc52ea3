"""Shared fixtures for the core (PanNuke) tests.

Tiny PanNuke data is written here with plain numpy in the *official* release format,
independently of the project's own writer (demo.write_demo_folds), so a
format bug in the project cannot hide behind a matching bug in the fixtures:

    <root>/Fold k/images/foldk/images.npy   (N, 256, 256, 3) float64, 0..255
    <root>/Fold k/images/foldk/types.npy    (N,) tissue names ('Colon', ...)
    <root>/Fold k/masks/foldk/masks.npy     (N, 256, 256, 6) float64: channels 0-4 instance
                                            ids, channel 5 the binary background map

Nothing here is autouse; every fixture is opt-in and named for what it holds.
"""
import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PYTHON = sys.executable

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PATCH = 256

# Tissue of each patch in the synthetic folds. Colon: fold1 {0, 1, 3}, fold2 {0, 2, 3}, fold3 {0, 2}.
PANNUKE_TYPES = {
    1: ["Colon", "Colon", "Breast", "Colon", "Kidney"],
    2: ["Colon", "Lung", "Colon", "Colon"],
    3: ["Colon", "Breast", "Colon"],
}
EMPTY_MASK_PATCH = (1, 1)          # (fold, index): all six mask channels zero
DOUBLE_LABEL = (1, 0, (10, 12), (1, 3))  # (fold, index, pixel, channels set at that pixel)

# Image colour of each class in the synthetic tissue (nucleus classes dark, background pink).
CLASS_COLOURS = np.array([
    (70, 30, 120),    # Neoplastic
    (40, 20, 90),     # Inflammatory
    (150, 70, 140),   # Connective
    (110, 110, 110),  # Dead
    (120, 50, 170),   # Epithelial
    (235, 200, 225),  # Background
], dtype=np.float64)


# --------------------------------------------------------------------------- writers (plain numpy)

def fold_files(root, k):
    root = Path(root) / f"Fold {k}"
    return SimpleNamespace(images=root / "images" / f"fold{k}" / "images.npy",
                           types=root / "images" / f"fold{k}" / "types.npy",
                           masks=root / "masks" / f"fold{k}" / "masks.npy")


def write_official_fold(root, k, images, masks, types):
    """Write one fold exactly as the official zip unpacks; any of the arrays may be None
    (that file is then not written), and they are saved as given (no checks), so tests
    can write malformed folds too."""
    files = fold_files(root, k)
    for path, arr in ((files.images, images), (files.types, types), (files.masks, masks)):
        if arr is None:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, arr)
    return files


def synthetic_patch(seed, n_nuclei=10, size=PATCH, noise=8, empty=False):
    """One (image, mask) pair: disc and box nuclei with instance ids per class channel,
    channel 5 the background map, and an image whose colour follows the class (+ noise)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((size, size, 6), dtype=np.float64)
    labels = np.full((size, size), 5, dtype=np.int64)
    if not empty:
        yy, xx = np.mgrid[:size, :size]
        next_id = {c: 1 for c in range(5)}
        for _ in range(n_nuclei):
            c = int(rng.integers(5))
            cy, cx = rng.integers(12, size - 12, size=2)
            r = int(rng.integers(5, 12))
            if rng.random() < 0.5:
                region = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            else:
                region = (abs(yy - cy) <= r) & (abs(xx - cx) <= r // 2)
            region &= mask[..., :5].sum(-1) == 0   # nuclei do not overlap (except where a test sets it)
            mask[region, c] = next_id[c]
            next_id[c] += 1
            labels[region] = c
        mask[..., 5] = (mask[..., :5].sum(-1) == 0).astype(np.float64)
    # An all-zero patch (as in the official fold 1) keeps channel 5 at zero too.
    image = CLASS_COLOURS[labels] + rng.integers(-noise, noise + 1, size=(size, size, 3))
    image = np.clip(image, 0, 255).round().astype(np.float64)
    return image, mask, labels


def make_synthetic_folds(root, types=None, seed=0):
    types = PANNUKE_TYPES if types is None else types
    for k, names in types.items():
        images, masks = [], []
        for i in range(len(names)):
            image, mask, _ = synthetic_patch(seed * 1000 + k * 100 + i, empty=(k, i) == EMPTY_MASK_PATCH)
            if (k, i) == DOUBLE_LABEL[:2]:
                (y, x), chans = DOUBLE_LABEL[2], DOUBLE_LABEL[3]
                mask[y, x, :5] = 0
                for c in chans:
                    mask[y, x, c] = 99
                mask[y, x, 5] = 0
            images.append(image)
            masks.append(mask)
        write_official_fold(root, k, np.stack(images), np.stack(masks), np.array(names))
    return Path(root)


def make_converted_layout(root, splits=None, seed=0):
    """The original project's converted layout: split/data/<name>.png + split/masks/<name>.npy (H, W, 6)."""
    from PIL import Image
    splits = splits or {"train": ["a_000", "a_001", "b_000"], "test": ["t_000", "t_001"]}
    for s, (split, names) in enumerate(splits.items()):
        (Path(root) / split / "data").mkdir(parents=True, exist_ok=True)
        (Path(root) / split / "masks").mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(names):
            image, mask, _ = synthetic_patch(seed * 1000 + 500 + s * 50 + i)
            Image.fromarray(image.astype(np.uint8)).save(Path(root) / split / "data" / f"{name}.png")
            np.save(Path(root) / split / "masks" / f"{name}.npy", mask)
    return Path(root)


# --------------------------------------------------------------------------- data fixtures

@pytest.fixture(scope="session")
def pannuke_folds(tmp_path_factory):
    """Path of a tiny PanNuke root in the official fold layout (see PANNUKE_TYPES).
    Shared by the session: copy it before changing anything in it."""
    return make_synthetic_folds(tmp_path_factory.mktemp("pannuke_folds"))


@pytest.fixture(scope="session")
def pannuke_folds_info():
    """What `pannuke_folds` holds: tissue per patch, the all-zero patch, the doubly-labelled pixel."""
    colon = {k: [i for i, t in enumerate(v) if t == "Colon"] for k, v in PANNUKE_TYPES.items()}
    return SimpleNamespace(types=PANNUKE_TYPES, colon=colon, empty=EMPTY_MASK_PATCH, double=DOUBLE_LABEL,
                           colours=CLASS_COLOURS, size=PATCH)


@pytest.fixture(scope="session")
def pannuke_converted(tmp_path_factory):
    """Path of a tiny PanNuke root in the converted layout ({train,test}/data/*.png + masks/*.npy)."""
    return make_converted_layout(tmp_path_factory.mktemp("pannuke_converted"))


@pytest.fixture(scope="session")
def pannuke_writer():
    """The plain-numpy writers, for tests that need their own (possibly malformed) folds."""
    return SimpleNamespace(fold=write_official_fold, files=fold_files, patch=synthetic_patch,
                           folds=make_synthetic_folds, converted=make_converted_layout)


@pytest.fixture(scope="session")
def pannuke_tiny_real():
    """The real three-patch PanNuke fixture in ../shared/data (skipped when absent)."""
    root = SHARED_DATA / "pannuke_tiny"
    if not all(fold_files(root, k).masks.is_file() for k in (1, 2, 3)):
        pytest.skip(f"real PanNuke fixture not found under {root}")
    return root


# --------------------------------------------------------------------------- running the scripts

def script_env(tmp_root=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(NO_ALBUMENTATIONS_UPDATE="1", PYTHONUNBUFFERED="1", WANDB_SILENT="true")
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    if tmp_root is not None:
        # Keep wandb's own settings/cache out of the user's home.
        for var, sub in (("WANDB_CONFIG_DIR", "wandb_config"), ("WANDB_CACHE_DIR", "wandb_cache"),
                         ("WANDB_DATA_DIR", "wandb_data")):
            env[var] = str(Path(tmp_root) / sub)
    return env


def start_script(script, *args, tmp_root=None, **popen_kwargs):
    """Popen `python <repo>/<script> args...` from the repo root with text pipes."""
    return subprocess.Popen([PYTHON, str(REPO / script), *map(str, args)], cwd=REPO, env=script_env(tmp_root),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_kwargs)


@pytest.fixture(scope="session")
def run_script(tmp_path_factory):
    """run_script('train_pannuke.py', '--flag', value, ..., timeout=s) -> CompletedProcess (text), run
    from the repo root with this interpreter; run_script.start(...) -> Popen (text pipes)."""
    env_root = tmp_path_factory.mktemp("script_env")

    def run(script, *args, timeout=300):
        return subprocess.run([PYTHON, str(REPO / script), *map(str, args)], cwd=REPO,
                              env=script_env(env_root), capture_output=True, text=True, timeout=timeout)
    run.start = lambda script, *args, **kw: start_script(script, *args, tmp_root=env_root, **kw)
    return run


@contextlib.contextmanager
def preserved_signal_handlers():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def tiny_train_argv(data_dir, out_dir, *extra, epochs=1, batch_size=2, train_folds=(1, 2), test_folds=(3,)):
    """Arguments for a small, deterministic train_pannuke.py run on CPU (with --allow-overlap when the
    folds overlap: the one-step runs train and sample on fold 3)."""
    overlap = ["--allow-overlap"] if set(train_folds) & set(test_folds) else []
    return ["--data-dir", str(data_dir), "--out-dir", str(out_dir),
            "--train-folds", *map(str, train_folds), "--test-folds", *map(str, test_folds), *overlap,
            "--epochs", str(epochs), "--batch-size", str(batch_size),
            "--ngf", "8", "--ndf", "8", "--workers", "0", "--precision", "fp32", "--device", "cpu",
            "--wandb", "disabled", "--num-samples", "1", "--save-every", "0", "--log-every", "1",
            *map(str, extra)]


@pytest.fixture(scope="session")
def train_in_process():
    """train_in_process(argv) runs train_pannuke.main in this process (saves ~3 s of imports per
    run) and puts the SIGTERM/SIGINT handlers back afterwards."""
    def run(argv):
        import train_pannuke
        with preserved_signal_handlers():
            train_pannuke.main(list(map(str, argv)))
    run.argv = tiny_train_argv
    return run


@pytest.fixture(scope="session")
def train_conic_in_process():
    """train_conic_in_process(argv) runs train_conic.main in this process, like train_in_process."""
    def run(argv):
        import train_conic
        with preserved_signal_handlers():
            train_conic.main(list(map(str, argv)))
    return run


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory, pannuke_folds):
    """checkpoints/last.pt of a one-step run (ngf 8, ndf 8) trained on fold 3's Colon patches."""
    import train_pannuke
    out = tmp_path_factory.mktemp("trained_run")
    argv = tiny_train_argv(pannuke_folds, out, train_folds=(3,), test_folds=(3,))
    with preserved_signal_handlers():
        train_pannuke.main(argv)
    path = out / "checkpoints" / "last.pt"
    assert path.is_file()
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors on a shared 2-core machine: one thread avoids OpenMP spin contention
    (measured 5x faster here under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_test_script():
    """test.py as a module, by path: `import test` could find the standard library's package."""
    spec = importlib.util.spec_from_file_location("he_test_script", REPO / "test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def test_script():
    return load_test_script()


def one_error_line(stderr):
    """The single `error: ...` line that must be all of an entry point's stderr."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    return lines[0]


def main_error_line(capsys, call):
    """Run `call` (an entry point's main, in this process): it must exit 2 with one error line, returned."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        call()
    assert exit_info.value.code == 2
    return one_error_line(capsys.readouterr().err)


def main_error(main, argv, capsys):
    """main_error_line for an entry point's main on `argv` (any values, passed as strings)."""
    return main_error_line(capsys, lambda: main(list(map(str, argv))))


def wait_for(predicate, proc, timeout, what):
    """predicate()'s first truthy value within `timeout` s; fails if `proc` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"run exited ({proc.returncode}) before {what}:\n{out}\n{err}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def sigterm_when(proc, predicate, what, timeout=240):
    """Send SIGTERM once predicate() holds; returns (its value, stdout, stderr)."""
    try:
        value = wait_for(predicate, proc, timeout, what)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return value, out, err


def dihedral(a):
    """The 8 symmetries of the square applied to the last two axes."""
    out = []
    for flip in (False, True):
        b = np.flip(a, -1) if flip else a
        out += [np.rot90(b, k, axes=(-2, -1)).copy() for k in range(4)]
    return out


def assert_augmentation_keeps_alignment(plain, aug, index, colours, size):
    """Items of a dataset whose image colour encodes the class: with seeds, `aug[index]`
    is one of the 8 symmetries of the plain item, image and labels moved together,
    the same for the same seed and different across seeds."""
    labels0, image0 = plain[index]
    assert torch.equal(image0, colours[labels0.long()].permute(2, 0, 1))
    symmetries = dihedral(labels0.numpy())
    seen = set()
    for seed in range(12):
        labels, image = aug[(index, seed)]
        assert labels.dtype == torch.uint8 and image.dtype == torch.uint8
        assert labels.shape == (size, size) and image.shape == (3, size, size)
        # The augmented image still encodes the augmented labels, pixel for pixel.
        assert torch.equal(image, colours[labels.long()].permute(2, 0, 1)), f"misaligned for seed {seed}"
        # ... and the labels are a symmetry of the square of the original ones.
        matches = [j for j, s in enumerate(symmetries) if np.array_equal(labels.numpy(), s)]
        assert matches, f"seed {seed}: not a flip/rotation of the original mask"
        seen.add(matches[0])
        # Same seed, same result.
        again = aug[(index, seed)]
        assert torch.equal(again[0], labels) and torch.equal(again[1], image)
    assert len(seen) >= 3 and seen != {0}, "different seeds should give different flips/rotations"
    return labels0


def vivid_checkpoint(path, out):
    """A copy of the checkpoint whose generator has PyTorch's default init: two epochs
    from pix2pix's N(0, 0.02) still paint every image the same grey in uint8, which
    would hide whether the samples differ."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    from gan import build_generator
    generator = build_generator(ckpt["model_config"])
    torch.manual_seed(0)
    for module in generator.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            module.reset_parameters()
    ckpt["generator"] = generator.state_dict()
    torch.save(ckpt, out)
    return out
