"""The one owner of an output folder: every script that writes claims its folder here, and
only this module creates, locks, overwrites or clears one.

A claim checks the folder is apart from every input (both ways, on resolved paths), takes
an exclusive lock for the run (a second run into the folder is refused, naming the first's
pid), and compares the folder's manifest (the script, a run id, and every option that
changes the output) with this run's. The same manifest continues; another one is refused,
or with --overwrite the files the manifest lists as this tool's output are deleted first
(never the folder itself, nor anything else in it). While the folder is claimed, every
`utils.atomic_write` into it is checked at write time (no symbolic link may stand on the
path inside the folder) and logged, which is how the manifest knows what is the tool's.

The folder's own files sit at its top as hidden files, so a drop-in data tree stays one for
its loaders (ImageFolder lists folders only): OUT/.run.json (the manifest), OUT/.run.lock and
OUT/.run.written (one relative path per line).
"""
import contextlib
import errno
import fcntl
import json
import os
import shutil
import uuid
from pathlib import Path

from utils import WRITE_CHECKS, UserError, atomic_save_text, within

OWNER_PREFIX = ".run."


def new_run_id():
    return uuid.uuid4().hex[:12]


def read_manifest(folder):
    """The manifest of `folder`, or None where there is none."""
    path = Path(folder) / f"{OWNER_PREFIX}json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path} ({exc}): that folder's manifest is damaged; delete the folder's "
                        f"output by hand, or choose a new folder") from None
    return manifest


def check_apart(out, inputs, flag="--out-dir"):
    """Refuse an output folder inside an input, or an input inside the output folder.
    `inputs` maps each input flag to its path (None: not given)."""
    for input_flag, path in inputs.items():
        if path is None or str(path).startswith("wandb:"):
            continue
        if within(out, path):
            raise UserError(f"{flag} {out} is inside {input_flag} {path}; outputs must not be written among the "
                            f"inputs: choose another {flag}")
        if within(path, out):
            raise UserError(f"{input_flag} {path} is inside {flag} {out}; an output folder must not hold its "
                            f"inputs (--overwrite could delete them): move it, or choose another {flag}")


def lock_holder(folder):
    """The pid written in a folder's lock while another process holds it, else None (a test
    that takes no lock and writes nothing)."""
    try:
        fd = os.open(Path(folder) / f"{OWNER_PREFIX}lock", os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except OSError:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(fd)


def logged_output(folder):
    """The relative paths a folder's owner logged as the tool's output."""
    log = Path(folder) / f"{OWNER_PREFIX}written"
    return log.read_text().splitlines() if log.is_file() else []


def differences(saved, wanted):
    keys = sorted(set(saved) | set(wanted))
    return [f"{k} {saved.get(k)} there, {wanted.get(k)} here" for k in keys if saved.get(k) != wanted.get(k)]


class RunFolder:
    """A claimed output folder. Use `claim` (the main process) and `join` (the other ranks),
    as a context manager: leaving it drops the lock and the write checks."""

    def __init__(self, path, manifest, lock_fd=None):
        self.path = Path(path)
        self.root = Path(os.path.abspath(self.path))
        self.manifest = manifest
        self.lock_fd = lock_fd
        self.written = set(self._read_log())
        WRITE_CHECKS.append(self.check_write)

    @property
    def run_id(self):
        return self.manifest.get("run_id")

    @classmethod
    def claim(cls, path, script, options=None, inputs=None, overwrite=False, one_run=False, resume=None,
              flag="--out-dir", continue_hint="give the same options to continue it", read_options=None, adopt=False):
        """Claim `path` for `script` writing with `options` (JSON values; a folder made with
        others is refused, or cleared with `overwrite`). A training run is `one_run`: a
        folder holding a run is refused unless `resume` = (run id, checkpoint) continues
        that very run. `read_options` reads the saved options for the comparison (a study
        fills in options newer than it). `adopt`: the caller knows the folder for its own
        output from before manifests (its files are never logged, so never deleted).
        Returns the claimed RunFolder."""
        path, options = Path(path), options or {}
        saved, conflict = cls.check(path, script, options, inputs, overwrite, one_run, resume, flag, continue_hint,
                                    read_options, adopt)
        try:
            path.mkdir(parents=True, exist_ok=True)
            lock_fd = cls._lock(path, flag)
        except OSError as exc:
            raise UserError(f"cannot write to {flag} {path}: {exc.strerror or exc}") from None
        folder = cls(path, saved or {}, lock_fd)
        try:
            starting_afresh = conflict or (overwrite and resume is None)
            if starting_afresh and folder.holds_output():
                folder.clear()
            if starting_afresh:
                saved = None
            if saved is None:
                run_id = (resume[0] if resume else None) or new_run_id()
                folder.manifest = {"script": script, "run_id": run_id, "options": options}
                atomic_save_text(folder.owner_file("json"), json.dumps(folder.manifest, indent=1) + "\n")
        except BaseException:
            folder.release()
            raise
        return folder

    @staticmethod
    def check(path, script, options=None, inputs=None, overwrite=False, one_run=False, resume=None,
              flag="--out-dir", continue_hint="give the same options to continue it", read_options=None, adopt=False):
        """What `claim` checks before it writes anything (so that a script claiming several
        folders checks them all first). Returns (the saved manifest or None, what differs or None)."""
        path, options = Path(path), options or {}
        if path.is_symlink() and not path.exists():
            raise UserError(f"{flag} {path} is a broken symbolic link; give a folder")
        if path.exists() and not path.is_dir():
            raise UserError(f"{flag} {path} is a file; give a folder")
        check_apart(path, inputs or {}, flag)
        holder = lock_holder(path)
        if holder:
            raise UserError(f"{flag} {path} is in use by another run (pid {holder}); wait for it to end, or choose "
                            f"another {flag}")
        saved = read_manifest(path)
        conflict = None
        if saved is None:
            # A run from before manifests is adopted when resumed from its own checkpoint, or when its
            # script recognises it.
            adopting = adopt or (resume is not None and within(resume[1], path))
            if path.is_dir() and not adopting and any(not p.name.startswith(OWNER_PREFIX) for p in path.iterdir()):
                raise UserError(f"{flag} {path} holds files that this tool did not write (no manifest "
                                f"{OWNER_PREFIX}json); give an empty or new folder")
        elif resume is not None:
            if saved.get("run_id") != resume[0]:
                raise UserError(f"{flag} {path} holds another run ({saved.get('script')} run {saved.get('run_id')}), "
                                f"not run {resume[0]} of checkpoint {resume[1]}; resume into that run's folder, or "
                                f"into a new {flag}")
        elif one_run:
            conflict = f"already holds a run ({saved.get('script')} run {saved.get('run_id')})"
        else:
            recorded = (read_options or dict)(saved.get("options", {}))
            changed = differences({"script": saved.get("script"), **recorded}, {"script": script, **options})
            conflict = f"holds the output of another {saved.get('script')} run ({'; '.join(changed)})" if changed else None
        # A run that failed before writing anything left nothing to lose.
        if conflict and not overwrite and any(os.path.lexists(path / r) for r in logged_output(path)):
            raise UserError(f"{flag} {path} {conflict}; {continue_hint}, pass --overwrite to delete that output, "
                            f"or choose a new {flag}")
        return saved, conflict

    @classmethod
    def join(cls, path):
        """The claimed folder as seen by another rank: its writes are checked and logged
        too, but the lock and the manifest stay with the main process."""
        return cls(path, read_manifest(path) or {})

    @staticmethod
    def _lock(path, flag):
        lock = path / f"{OWNER_PREFIX}lock"
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UserError(f"{lock} is a symbolic link; an output folder's lock file must be a plain file") \
                    from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise UserError(f"{flag} {path} is in use by another run (pid {holder}); wait for it to end, "
                                f"or choose another {flag}") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def owner_file(self, suffix):
        return self.path / f"{OWNER_PREFIX}{suffix}"

    def _read_log(self):
        return logged_output(self.path)

    def check_write(self, path):
        """Called by utils.atomic_write: a write under this folder must not pass through a
        symbolic link inside it, nor resolve outside it. Logs the path as this tool's."""
        target = self.check_path(path)
        if target is not None:
            self.record(target.relative_to(self.root).as_posix())

    def check_path(self, path):
        """`path` made absolute when it lies in this folder and no symbolic link inside the
        folder stands on its way (else a UserError); None for a path elsewhere."""
        target = Path(os.path.abspath(path))
        if not target.is_relative_to(self.root) or target == self.root:
            return None
        step = self.root
        for part in target.relative_to(self.root).parts:
            step = step / part
            if step.is_symlink():
                raise UserError(f"refusing to write {path}: {step} is a symbolic link inside the output folder "
                                f"{self.path}")
        if not target.resolve().is_relative_to(self.root.resolve()):
            raise UserError(f"refusing to write {path}: it resolves outside the output folder {self.path}")
        return target

    def holds_output(self):
        return any(os.path.lexists(self.path / relative) for relative in self.written)

    def record(self, relative):
        """Log `relative` (a file, or a folder the tool fills wholly, such as wandb/) as this
        tool's output, which --overwrite may delete."""
        if relative in self.written or relative.startswith(OWNER_PREFIX):
            return
        self.written.add(relative)
        fd = os.open(self.owner_file("written"), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        with os.fdopen(fd, "a") as log:  # one short append per line: ranks may log at once
            log.write(relative + "\n")

    def clear(self):
        """Delete what the log lists as this tool's output (deepest first), then the folders
        it leaves empty; nothing else in the folder is touched."""
        parents = set()
        for relative in sorted(set(self._read_log()), key=lambda r: -r.count("/")):
            target = self.path / relative
            if not target.resolve().is_relative_to(self.root.resolve()) and not target.is_symlink():
                continue
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                with contextlib.suppress(FileNotFoundError):
                    target.unlink()
            parents.update(p for p in Path(relative).parents if p != Path("."))
        for relative in sorted(parents, key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                (self.path / relative).rmdir()
        self.owner_file("written").unlink(missing_ok=True)
        self.written.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def release(self):
        """Stop checking writes and drop the lock (the process's exit drops it too)."""
        with contextlib.suppress(ValueError):
            WRITE_CHECKS.remove(self.check_write)
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


# Options naming a script's inputs, as argparse dests: an output folder must stay apart from each.
INPUT_OPTIONS = ("data_dir", "masks_dir", "masks", "real", "fake", "checkpoint", "segmenter", "reference", "run_dir",
                 "split_file", "reference_from", "cache_dir", "synthetic_dir")
# Options that say where outputs go or how fast they are made, not what they hold: left out of a manifest.
PLUMBING_OPTIONS = ("out_dir", "grids_dir", "tiles_dir", "overwrite", "device", "channels_last", "compile", "workers",
                    "wandb", "wandb_project", "wandb_entity", "run_name")


def input_paths(args):
    """{flag: path} for each input option `args` gives."""
    return {"--" + name.replace("_", "-"): getattr(args, name) for name in INPUT_OPTIONS if getattr(args, name, None)}


def manifest_options(args, leave_out=()):
    """The options of `args` that change what a script writes, input paths resolved (a folder
    stays the same folder however it is named): what a manifest compares."""
    options = {k: v for k, v in vars(args).items() if k not in PLUMBING_OPTIONS + tuple(leave_out)}
    for name in INPUT_OPTIONS:
        if isinstance(options.get(name), str) and not options[name].startswith("wandb:"):
            options[name] = str(Path(options[name]).resolve())
    return options
