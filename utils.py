"""Small helpers shared by every entry point: clean user-facing errors, atomic
checkpoint files, a cache of arrays derived from files, RNG state capture, wandb
mode resolution, and figures."""
import contextlib
import errno
import functools
import hashlib
import http.client
import os
import random
import shutil
import ssl
import sys
import tempfile
import threading
import urllib.parse
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
    """Run `main()` turning UserError into a single `error: ...` line and exit code 2, and Ctrl-C into
    `interrupted` and exit code 130, without a traceback."""
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
        except KeyboardInterrupt:
            # Ctrl-C where no loop saves first (a training loop's first Ctrl-C saves and exits 143).
            print("interrupted", file=sys.stderr, flush=True)
            sys.exit(130)
    return wrapper


def within(path, folder):
    """Whether `path` is `folder` or lies below it, once both are resolved (.., symlinks)."""
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def inside(folder, path):
    """`path`, checked to resolve strictly inside `folder`: an output path built from
    data (a CSV's file names, say) must never escape its output folder."""
    resolved, root = Path(path).resolve(), Path(folder).resolve()
    if resolved == root or not resolved.is_relative_to(root):
        raise UserError(f"refusing to write {path}: it resolves to {resolved}, outside {folder}")
    return path


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def current_umask():
    """The process umask. Linux shows it in /proc (read-only, thread-safe); elsewhere
    it can only be read by setting it, so set it back at once."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Write failures the user must fix (not bugs), as one line each.
WRITE_ERRORS = {
    errno.ENOSPC: "no space left on device writing {path}",
    errno.EDQUOT: "disk quota exceeded writing {path}",
    errno.EACCES: "cannot write {path}: permission denied",
    errno.EPERM: "cannot write {path}: permission denied",
    errno.EROFS: "cannot write {path}: read-only file system",
}


# Checks every atomic write passes first: run_folder.RunFolder adds one per claimed output
# folder (no symbolic link on the way inside it; the path logged as the tool's output).
WRITE_CHECKS = []


def atomic_write(path, write):
    """Call `write(f)` on a binary temp file beside `path`, then rename it over `path`:
    a crash mid-write leaves the previous file intact, and concurrent readers (loader
    workers, other ranks) see the old file or the new one, never half of one. A full
    disk or an unwritable folder is a UserError naming `path`."""
    path = Path(path)
    for check in WRITE_CHECKS:
        check(path)
    try:
        _atomic_write(path, write)
    except OSError as exc:
        if exc.errno not in WRITE_ERRORS:
            raise
        raise UserError(WRITE_ERRORS[exc.errno].format(path=path)) from None


def _atomic_write(path, write):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file 0600; give it the mode a plain open() would (where the
        # file system has modes at all).
        with contextlib.suppress(OSError):
            os.fchmod(fd, 0o666 & ~current_umask())
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


def atomic_copy(source, path):
    """A copy of the file `source` at `path`, written like any other output (never through a
    link standing at `path`)."""
    with open(source, "rb") as src:
        atomic_write(path, lambda f: shutil.copyfileobj(src, f))


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
            try:
                return tuple(np.load(f, mmap_mode="r", allow_pickle=False) for f in files)
            except (OSError, ValueError, EOFError):
                pass  # truncated or damaged (a full disk, an interrupted copy): derive it again
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
        if not looks_like_torch_file(path):
            reason = "not a PyTorch checkpoint (torch.save writes a zip archive or a pickle; this file is neither)"
        elif "Weights only load failed" in text:
            reason = "not a PyTorch checkpoint, or it holds objects that are unsafe to load (weights_only=True)"
        else:
            reason = text.splitlines()[0] if text else type(exc).__name__
        raise UserError(f"cannot read {what} {path}: {reason}") from None


def looks_like_torch_file(path):
    """Whether the file starts as torch.save output does: a zip archive, or (legacy) a pickle."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return True  # unreadable: torch's own error says why
    return head == b"PK" or head[:1] == b"\x80"


# Every checkpoint this project writes names its kind, so a file meant for one script
# is refused by the others with a message that says what the file is.
CHECKPOINT_KINDS = {
    "he-pix2pix": "a pix2pix GAN checkpoint (from train_pannuke.py / train_utp.py)",
    "he-segmenter": "a nucleus segmenter checkpoint (from train_segmenter.py)",
    "utp-classifier": "a UniToPatho classifier checkpoint (from classify_utp.py)",
    "fid-features": "a feature network for evaluate.py (from metrics.save_feature_net)",
}


def load_checkpoint_of_kind(path, kind, required=(), version=1):
    """safe_torch_load, then check the checkpoint's 'kind' field, that its format
    'version' is one this code reads (at most `version`), and that it holds the
    `required` keys."""
    ckpt = safe_torch_load(path)
    found = ckpt.get("kind") if isinstance(ckpt, dict) else None
    if found != kind:
        expected = f"{CHECKPOINT_KINDS[kind]} (kind {kind!r})"
        if found in CHECKPOINT_KINDS:
            raise UserError(f"{path} is {CHECKPOINT_KINDS[found]} (kind {found!r}), not {expected}")
        raise UserError(f"{path} is not {expected}; it has kind {found!r}")
    found_version = ckpt.get("version", 1)
    if isinstance(found_version, bool) or not isinstance(found_version, int) or found_version < 1:
        raise UserError(f"{path} has checkpoint format version {found_version!r}; expected a whole number (this code "
                        f"reads formats up to {version}): a hand-edited or damaged checkpoint?")
    if found_version > version:
        raise UserError(f"{path} was written by a newer version of this project (checkpoint format "
                        f"{ckpt['version']}, this code reads up to {version}); update the code to load it")
    missing = [key for key in required if key not in ckpt]
    if missing:
        raise UserError(f"{path} is {CHECKPOINT_KINDS[kind]} but lacks {', '.join(map(repr, missing))} "
                        f"(an incomplete or hand-edited checkpoint?)")
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


WANDB_TIMEOUT = 3  # seconds to wait for the wandb server before logging offline


def wandb_server():
    """(host, port, tls) of the wandb server: WANDB_BASE_URL's, else api.wandb.ai:443 over TLS."""
    url = urllib.parse.urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    try:
        port = url.port or (80 if url.scheme == "http" else 443)
    except ValueError:  # a malformed port: unreachable
        port = 0
    return url.hostname or "", port, url.scheme != "http"


def wandb_reachable(host, port, tls, timeout=WANDB_TIMEOUT):
    """Whether the server answers an HTTP request within `timeout` seconds in all: name lookup,
    connection, TLS handshake and the first response line. A server that accepts the connection
    but never answers would otherwise stall wandb.init for minutes. The request runs in a daemon
    thread, as a name lookup cannot be given a timeout."""
    if not host or not port:
        return False
    answered = threading.Event()

    def probe():
        connection = None
        try:
            connection = (http.client.HTTPSConnection if tls else http.client.HTTPConnection)(host, port, timeout=timeout)
            connection.request("HEAD", "/")
            connection.getresponse()
            answered.set()
        except ssl.SSLCertVerificationError:
            answered.set()  # it answered; wandb.init judges the certificate with its own trust store
        except (OSError, http.client.HTTPException, ValueError):
            pass
        finally:
            if connection is not None:
                connection.close()

    threading.Thread(target=probe, name="wandb-reachable", daemon=True).start()
    return answered.wait(timeout)


def resolve_wandb_mode(mode):
    """'auto' means online when an account is configured (env key or `wandb login`) and its
    server answers, else offline; 'online' without either is an error."""
    if mode not in ("auto", "online"):
        return mode
    if not wandb_has_credentials():
        if mode == "online":
            raise UserError("wandb online needs an account: set WANDB_API_KEY or run `wandb login` "
                            "(or use --wandb offline)")
        return "offline"
    host, port, tls = wandb_server()
    if wandb_reachable(host, port, tls):
        return "online"
    unreachable = f"the wandb server {host}:{port} did not answer within {WANDB_TIMEOUT} s"
    if mode == "online":
        raise UserError(f"wandb online: {unreachable}; check the network or WANDB_BASE_URL, or use --wandb offline")
    print(f"wandb: {unreachable}; logging offline (upload later with `wandb sync`)", file=sys.stderr, flush=True)
    return "offline"
