"""Small helpers shared by every entry point: clean user-facing errors, atomic
checkpoint files, a cache of arrays derived from files, RNG state capture, wandb
mode resolution, and figures."""
import contextlib
import functools
import hashlib
import os
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


class UserError(Exception):
    """A problem with the user's input (path, file, option). Printed as one line, exit 2."""


def _user_message(exc):
    # DataLoader workers re-raise exceptions as `type(exc)(formatted traceback)`;
    # the user's message is the text after the last "UserError: ".
    text = str(exc)
    marker = "UserError: "
    if marker in text:
        text = text.rsplit(marker, 1)[1]
    return text.strip()


def run_main(main):
    """Run `main()` turning UserError into a single `error: ...` line and exit code 2."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            print(f"error: {_user_message(exc)}", file=sys.stderr, flush=True)
            sys.exit(2)
        except RuntimeError as exc:
            # A worker-side UserError can surface wrapped in a RuntimeError.
            if "UserError: " in str(exc):
                print(f"error: {_user_message(exc)}", file=sys.stderr, flush=True)
                sys.exit(2)
            raise
    return wrapper


def atomic_write(path, write):
    """Call `write(f)` on a binary temp file beside `path`, then rename it over `path`:
    a crash mid-write leaves the previous file intact, and concurrent readers (loader
    workers, other ranks) see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_save_torch(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_save_text(path, text):
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_save_png(array, path):
    """An (H, W, 3) or (H, W) uint8 array as a PNG."""
    from PIL import Image
    atomic_write(path, lambda f: Image.fromarray(array).save(f, format="PNG"))


def atomic_save_figure(fig, path, dpi=100):
    """A matplotlib figure as PNG (closed afterwards)."""
    import matplotlib.pyplot as plt
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    plt.close(fig)


def atomic_save_npy(array, path):
    """np.save, atomically: concurrent workers and ranks never see half a file."""
    try:
        atomic_write(path, lambda f: np.save(f, array))
    except OSError as exc:
        raise UserError(f"cannot write cache file {path}: {exc}") from None


class ArrayCache:
    """Arrays derived from source files (decoded, resized...), saved once as
    <dir>/<key>.<name>.npy and memory-mapped on later reads.

    The key hashes the sources' paths, sizes and modification times, and a tag that
    names the derivation, so an edited source is derived afresh and two derivations
    of the same file (another size, another mask) never collide.
    """

    def __init__(self, cache_dir):
        self.dir = Path(cache_dir)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create cache directory {self.dir}: {exc}") from None

    def files(self, sources, names, tag=""):
        parts = []
        for p in map(Path, sources):
            st = p.stat()
            parts.append(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}")
        key = hashlib.sha1("\n".join(parts + ([tag] if tag else [])).encode()).hexdigest()
        return [self.dir / f"{key}.{name}.npy" for name in names]

    def get(self, sources, names, derive, tag=""):
        """The arrays `derive()` returns (one per name), from the cache when present."""
        files = self.files(sources, names, tag)
        if all(f.is_file() for f in files):
            return tuple(np.load(f, mmap_mode="r") for f in files)
        arrays = derive()
        for array, f in zip(arrays, files):
            atomic_save_npy(array, f)
        return arrays


def safe_torch_load(path, what="checkpoint"):
    """Load a checkpoint with weights_only=True (no arbitrary code), with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt/foreign files
        text = str(exc).strip()
        if "Weights only load failed" in text:
            reason = "not a PyTorch checkpoint, or it holds objects that are unsafe to load (weights_only=True)"
        else:
            reason = text.splitlines()[0] if text else type(exc).__name__
        raise UserError(f"cannot read {what} {path}: {reason}") from None


# Every checkpoint this project writes names its kind, so a file meant for one script
# is refused by the others with a message that says what the file is.
CHECKPOINT_KINDS = {
    "he-pix2pix": "a pix2pix GAN checkpoint (from train_pannuke.py / train_utp.py)",
    "he-segmenter": "a nucleus segmenter checkpoint (from train_segmenter.py)",
}


def load_checkpoint_of_kind(path, kind):
    """safe_torch_load, then check the checkpoint's 'kind' field."""
    ckpt = safe_torch_load(path)
    found = ckpt.get("kind") if isinstance(ckpt, dict) else None
    if found != kind:
        expected = f"{CHECKPOINT_KINDS[kind]} (kind {kind!r})"
        if found in CHECKPOINT_KINDS:
            raise UserError(f"{path} is {CHECKPOINT_KINDS[found]} (kind {found!r}), not {expected}")
        raise UserError(f"{path} is not {expected}; it has kind {found!r}")
    return ckpt


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state():
    """All RNG states as tensors/ints only, so the checkpoint loads with weights_only=True."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def wandb_has_credentials():
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def resolve_wandb_mode(mode):
    """'auto' means online when an account is configured (env key or `wandb login`), else offline."""
    if mode == "auto":
        return "online" if wandb_has_credentials() else "offline"
    return mode
