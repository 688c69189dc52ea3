"""Hardening: paths from CSVs stay inside the output folder, test.py records which
checkpoint made a folder and keeps grids and records beside the drop-in tree, outputs
never go into the inputs, atomic writes honour the umask and turn a full or read-only
disk into one line, clear messages for foreign files and damaged caches, and wandb's
auto mode falls back to offline when its server cannot be reached.

Data: UniToPatho trees from tests/utp_fixtures.py (real CSV rows and file names, real
H&E) and PanNuke folds from conftest, in the releases' exact formats. The CLI contract
(one `error:` line, exit 2, no traceback) is checked on real subprocesses."""
import errno
import hashlib
import json
import os
import shutil
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import main_error
from conftest import one_error_line as error_line
from utp_fixtures import make_utp_fixture, shared_data_available

import utils
from dataset.common import load_npy
from dataset.unitopatho import UniToPatho
from dataset.unitopatho_mask import DecodeCache, decode_pair, masks_folder
from utils import UserError

needs_utp = pytest.mark.skipif(not shared_data_available(), reason="../shared/data (UniToPatho CSVs, H&E) absent")
CLASS_FOLDERS = ["HP", "TVA.LG"]


# --------------------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="module")
def utp_small(tmp_path_factory):
    """One 300 px test image each of HP and TVA.LG, with masks. Copy before changing it."""
    if not shared_data_available():
        pytest.skip("../shared/data (UniToPatho CSVs, H&E) absent")
    return make_utp_fixture(tmp_path_factory.mktemp("utp_small"), {"test": 1}, size=300, classes=CLASS_FOLDERS)


@pytest.fixture
def utp_copy(utp_small, tmp_path):
    shutil.copytree(utp_small[0].parent, tmp_path / "utp")
    return tmp_path / "utp" / "800", tmp_path / "utp" / "masks"


@pytest.fixture(scope="module")
def other_checkpoint(trained_checkpoint, tmp_path_factory):
    """The same weights saved again with another step: another file, another sha256."""
    state = torch.load(trained_checkpoint, weights_only=True)
    state["step"] += 1
    path = tmp_path_factory.mktemp("other") / "other.pt"
    torch.save(state, path)
    return path


def set_csv_value(csv, row, column, value):
    """Change one cell, keeping the official layout (unnamed index column first)."""
    rows = pd.read_csv(csv, index_col=0)
    rows[column] = rows[column].astype(object)
    rows.loc[rows.index[row], column] = value
    rows.to_csv(csv)


def generate_argv(checkpoint, data_dir, out_dir, *extra):
    return ["--checkpoint", str(checkpoint), "--data-dir", str(data_dir), "--out-dir", str(out_dir),
            "--device", "cpu", "--precision", "fp32", *map(str, extra)]


def utp_argv(checkpoint, data_dir, masks_dir, out_dir, *extra):
    return generate_argv(checkpoint, data_dir, out_dir, "--dataset", "unitopatho", "--masks-dir", masks_dir, *extra)


def files_under(folder, owner_files=True):
    """The files under `folder`; without `owner_files`, leaving out its owner's .run.* files."""
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*")
                  if p.is_file() and (owner_files or not p.name.startswith(".run.")))


# --------------------------------------------------------------------------- 1. paths from CSVs

@needs_utp
@pytest.mark.parametrize("column,value", [
    ("image_id", "../../escape.png"), ("image_id", "/tmp/absolute.png"), ("image_id", "sub/x.png"),
    ("image_id", "sub\\x.png"), ("image_id", ".."), ("top_label_name", "grids"), ("top_label_name", "../HP"),
])
def test_csv_path_values_are_rejected_naming_file_line_and_value(utp_copy, column, value):
    data_dir, _ = utp_copy
    set_csv_value(data_dir / "test.csv", 1, column, value)
    with pytest.raises(UserError) as err:
        UniToPatho(data_dir, "test")
    text = str(err.value)
    assert "\n" not in text
    assert f"{data_dir / 'test.csv'}, line 3" in text and repr(value) in text and column in text


def test_inside_refuses_escapes_and_symlinks(tmp_path):
    out = tmp_path / "out"
    (out / "HP").mkdir(parents=True)
    assert utils.inside(out, out / "HP" / "a (1), b.png") == out / "HP" / "a (1), b.png"
    (tmp_path / "elsewhere").mkdir()
    (out / "link").symlink_to(tmp_path / "elsewhere")
    for bad in (out / "HP" / ".." / ".." / "x.png", Path("/etc/passwd"), out, out / "link" / "x.png"):
        with pytest.raises(UserError, match="outside"):
            utils.inside(out, bad)


@needs_utp
def test_test_py_refuses_a_class_folder_linked_outside(test_script, utp_copy, trained_checkpoint, tmp_path, capsys):
    """A link standing where a class folder of an earlier run was is refused at write time, and
    --overwrite deletes nothing through it."""
    data_dir, masks_dir = utp_copy
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    argv = utp_argv(trained_checkpoint, data_dir, masks_dir, out, "--grids", 0)
    test_script.main(argv)
    shutil.rmtree(out / "HP")
    elsewhere.mkdir()
    (elsewhere / "keep.png").write_bytes(b"not the tool's")
    (out / "HP").symlink_to(elsewhere)
    line = main_error(test_script.main, argv, capsys)
    assert ("symbolic link" in line or "outside" in line) and str(out / "HP") in line
    assert [p.name for p in elsewhere.iterdir()] == ["keep.png"]


def escape_tree(root):
    """A UniToPatho tree whose test.csv names '../../../escape.png' with an image and a
    mask really there, so unchecked code would read them and write outside its output."""
    data_dir, masks_dir = make_utp_fixture(root / "d" / "x", {"test": 1}, size=300, classes=["HP"])
    name = pd.read_csv(data_dir / "test.csv", index_col=0)["image_id"].iloc[0]
    bad = "../../../escape.png"
    for folder in (data_dir / "HP", masks_folder(masks_dir, "test")):
        target = Path(os.path.normpath(folder / bad))
        shutil.copyfile(folder / name, target)
    set_csv_value(data_dir / "test.csv", 0, "image_id", bad)
    return data_dir, masks_dir


def segmenter_checkpoint(path):
    from segmenter import CHECKPOINT_KIND, build_segmenter
    cfg = {"encoder": "unet", "width": 4}
    torch.save({"kind": CHECKPOINT_KIND, "version": 1, "model_config": cfg, "model": build_segmenter(cfg).state_dict(),
                "epoch": 1}, path)
    return path


# --------------------------------------------------------------------------- the CLI cases, run once

def build_cli_cases(tmp, test_script, checkpoint, other, folds):
    """{case: (script, argv, strings the error line must contain, folder that must stay as it was)}.
    No case may write anything, so each can check all of `tmp`."""
    cases = {}
    # 2: a folder made by one checkpoint, re-run with another.
    made = tmp / "made_by_one"
    test_script.main(generate_argv(checkpoint, folds, made, "--grids", 0))
    cases["other-checkpoint"] = ("test.py", generate_argv(other, folds, made, "--grids", 0),
                                 [str(checkpoint.resolve()), str(other.resolve()), "--overwrite", "--out-dir"], made)
    # 4: output inside the inputs.
    copy = tmp / "folds"
    shutil.copytree(folds, copy)
    cases["out-inside-data"] = ("test.py", generate_argv(checkpoint, copy, copy / "synthetic"),
                                [str(copy), "--out-dir", "--data-dir"], copy)
    # 6: a text file given as the checkpoint.
    text = tmp / "notes.pt"
    text.write_text("epoch,loss\n1,0.5\n")
    cases["text-checkpoint"] = ("test.py", generate_argv(text, folds, tmp / "unused"),
                                [str(text), "not a PyTorch checkpoint"], None)
    if shared_data_available():
        # 1: a CSV whose image_id climbs out of every folder.
        data_dir, masks_dir = escape_tree(tmp / "escape")
        csv_line = [f"{data_dir / 'test.csv'}, line 2", "'../../../escape.png'"]
        # Unchecked, test.py would write tmp/escape.png and make_masks.py tmp/escape/escape.png.
        cases["csv-escape-test.py"] = ("test.py", utp_argv(checkpoint, data_dir, masks_dir, tmp / "escape" / "out"),
                                       csv_line, tmp)
        seg = segmenter_checkpoint(tmp / "segmenter.pt")
        cases["csv-escape-make_masks.py"] = ("make_masks.py", [
            "--checkpoint", seg, "--data-dir", data_dir, "--out-dir", tmp / "escape" / "made_masks", "--splits",
            "test", "--tile", "128", "--overlap", "32", "--device", "cpu", "--precision", "fp32", "--workers", "0"],
            csv_line, tmp)
    return cases


CLI_CASES = ["other-checkpoint", "out-inside-data", "text-checkpoint", "csv-escape-test.py", "csv-escape-make_masks.py"]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, test_script, trained_checkpoint, other_checkpoint, pannuke_folds, run_script):
    tmp = tmp_path_factory.mktemp("cli")
    cases = build_cli_cases(tmp, test_script, trained_checkpoint, other_checkpoint, pannuke_folds)
    before = {case: files_under(c[3]) if c[3] else None for case, c in cases.items()}

    def run(item):
        case, (script, argv, _, _) = item
        return case, run_script(script, *argv, timeout=300)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(pool.map(run, cases.items()))
    return {case: (cases[case], results[case], before[case]) for case in cases}


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_refuses_with_one_line(cli_runs, case):
    if case not in cli_runs:
        pytest.skip("../shared/data (UniToPatho CSVs, H&E) absent")
    (_, _, needles, folder), res, before = cli_runs[case]
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    line = error_line(res.stderr)
    print(line)
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    if folder is not None:
        assert files_under(folder) == before, "the refused run wrote files"


# --------------------------------------------------------------------------- 2. which checkpoint made a folder

def record_of(out):
    return json.loads((out / ".run.json").read_text())["options"]


def test_checkpoint_record_resume_refuse_and_overwrite(test_script, trained_checkpoint, other_checkpoint,
                                                       pannuke_folds, tmp_path, capsys, one_thread):
    out = tmp_path / "synthetic"
    argv = generate_argv(trained_checkpoint, pannuke_folds, out, "--grids", 0)
    test_script.main(argv)
    record = record_of(out)
    state = torch.load(trained_checkpoint, weights_only=True)
    assert record["checkpoint_sha256"] == hashlib.sha256(trained_checkpoint.read_bytes()).hexdigest()
    assert (record["checkpoint_epoch"], record["checkpoint_step"]) == (state["epoch"], state["step"])
    assert not [p for p in out.iterdir() if p.suffix != ".png" and not p.name.startswith(".run.")]

    # Same checkpoint: resume, leaving what exists alone.
    names = sorted(p.name for p in out.glob("*.png"))
    os.utime(out / names[0], ns=(1, 1))
    (out / names[1]).unlink()
    test_script.main(argv)
    assert (out / names[0]).stat().st_mtime_ns == 1 and (out / names[1]).is_file()

    # Another checkpoint: refused, naming the one that made the images.
    other = generate_argv(other_checkpoint, pannuke_folds, out, "--grids", 0)
    line = main_error(test_script.main, other, capsys)
    assert str(trained_checkpoint.resolve()) in line and "--overwrite" in line
    assert (out / names[0]).stat().st_mtime_ns == 1

    # --overwrite: everything regenerated and the record updated.
    test_script.main(other + ["--overwrite"])
    assert (out / names[0]).stat().st_mtime_ns != 1
    assert record_of(out)["checkpoint_sha256"] == hashlib.sha256(other_checkpoint.read_bytes()).hexdigest()
    assert record_of(out)["checkpoint_step"] == state["step"] + 1


def test_a_folder_without_a_manifest_is_refused_even_with_overwrite(test_script, trained_checkpoint, pannuke_folds,
                                                                     tmp_path, capsys, one_thread):
    out = tmp_path / "synthetic"
    out.mkdir()
    (out / "0_0.png").write_bytes(b"made by someone else")
    for extra in ([], ["--overwrite"]):
        line = main_error(test_script.main, generate_argv(trained_checkpoint, pannuke_folds, out, *extra), capsys)
        assert "did not write" in line and str(out) in line
    assert files_under(out) == ["0_0.png"] and (out / "0_0.png").read_bytes() == b"made by someone else"


# --------------------------------------------------------------------------- 3. grids beside the drop-in tree

def test_pannuke_grids_go_beside_the_output(test_script, trained_checkpoint, pannuke_folds, tmp_path, one_thread):
    out = tmp_path / "synthetic"
    test_script.main(generate_argv(trained_checkpoint, pannuke_folds, out, "--grids", 1))
    assert all(name.endswith(".png") and "/" not in name for name in files_under(out, owner_files=False))
    assert files_under(tmp_path / "synthetic.grids", owner_files=False) == ["grid_0000.png"]
    chosen = tmp_path / "my grids"
    test_script.main(generate_argv(trained_checkpoint, pannuke_folds, tmp_path / "b", "--grids-dir", chosen))
    assert files_under(chosen, owner_files=False) == ["grid_0000.png"] and not (tmp_path / "b.grids").exists()


@needs_utp
def test_unitopatho_output_is_a_clean_drop_in_tree(test_script, utp_small, trained_checkpoint, tmp_path, one_thread):
    from torchvision.datasets.folder import find_classes
    data_dir, masks_dir = utp_small
    out = tmp_path / "synthetic"
    test_script.main(utp_argv(trained_checkpoint, data_dir, masks_dir, out, "--grids", 2))
    # An ImageFolder-style loader sees exactly the real classes, and the CSV loader the real rows.
    assert find_classes(str(out))[0] == find_classes(str(data_dir))[0] == CLASS_FOLDERS
    assert files_under(out, owner_files=False) == files_under(data_dir)
    assert [p.relative_to(out) for p in UniToPatho(out, "test").paths] == \
        [p.relative_to(data_dir) for p in UniToPatho(data_dir, "test").paths]
    assert files_under(tmp_path / "synthetic.grids", owner_files=False) == ["grid_0000.png", "grid_0001.png"]
    assert (out / ".run.json").is_file()


# --------------------------------------------------------------------------- 4. outputs never go into the inputs

@needs_utp
@pytest.mark.parametrize("where", ["data", "masks", "masks-subfolder", "grids-in-data"])
def test_outputs_inside_the_inputs_are_refused(test_script, utp_copy, trained_checkpoint, where, capsys):
    data_dir, masks_dir = utp_copy
    out = {"data": data_dir, "masks": masks_dir, "masks-subfolder": masks_dir / "test"}.get(where, data_dir.parent / "s")
    extra = ["--grids-dir", data_dir / "grids"] if where == "grids-in-data" else []
    before = files_under(data_dir.parent)
    line = main_error(test_script.main, utp_argv(trained_checkpoint, data_dir, masks_dir, out, *extra), capsys)
    assert "inside" in line and ("--grids-dir" if extra else "--out-dir") in line
    assert files_under(data_dir.parent) == before


# --------------------------------------------------------------------------- 5. file modes

@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_atomic_write_honours_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        utils.atomic_save_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == mode


# --------------------------------------------------------------------------- 6. messages, damaged caches, missing keys

def test_text_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("this is not a checkpoint\n")
    with pytest.raises(UserError) as err:
        utils.safe_torch_load(path)
    assert str(path) in str(err.value) and "not a PyTorch checkpoint" in str(err.value)
    assert "pop from empty list" not in str(err.value)


def test_random_bytes_npy_is_named_as_not_an_npy_file(tmp_path):
    path = tmp_path / "masks.npy"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    for mmap in (True, False):
        with pytest.raises(UserError) as err:
            load_npy(path, mmap=mmap)
        assert str(path) in str(err.value) and "not a valid .npy array file" in str(err.value)
        assert "pickle" not in str(err.value)


@needs_utp
def test_truncated_cache_file_is_rebuilt(utp_small, tmp_path):
    data_dir, masks_dir = utp_small
    split = UniToPatho(data_dir, "test")
    image_path, mask_path = split.paths[0], masks_folder(masks_dir, "test") / split.names[0]
    cache = DecodeCache(tmp_path / "cache")
    cache.load(image_path, mask_path)
    image_file = cache.files((image_path, mask_path), ("image", "labels"))[0]
    data = image_file.read_bytes()
    image_file.write_bytes(data[: len(data) // 2])
    image, labels = cache.load(image_path, mask_path)
    expected = decode_pair(image_path, mask_path)
    assert np.array_equal(image, expected[0]) and np.array_equal(labels, expected[1])
    assert image_file.read_bytes() == data  # derived again and written whole
    assert np.array_equal(cache.load(image_path, mask_path)[0], expected[0])


def test_checkpoint_missing_a_required_key_is_named(trained_checkpoint, tmp_path):
    from gan import CHECKPOINT_KIND
    state = torch.load(trained_checkpoint, weights_only=True)
    del state["generator"]
    path = tmp_path / "no_generator.pt"
    torch.save(state, path)
    assert "generator" not in utils.load_checkpoint_of_kind(path, CHECKPOINT_KIND)  # nothing required by default
    with pytest.raises(UserError) as err:
        utils.load_checkpoint_of_kind(path, CHECKPOINT_KIND, required=("model_config", "generator"))
    assert str(path) in str(err.value) and "'generator'" in str(err.value) and "'model_config'" not in str(err.value)


# --------------------------------------------------------------------------- 7. full or read-only disks

@pytest.mark.parametrize("code,message", [
    (errno.ENOSPC, "no space left on device writing {path}"),
    (errno.EACCES, "cannot write {path}: permission denied"),
    (errno.EROFS, "cannot write {path}: read-only file system"),
])
def test_write_errors_are_one_line_and_keep_the_previous_file(tmp_path, monkeypatch, code, message):
    path = tmp_path / "checkpoints" / "last.pt"
    utils.atomic_save_torch({"epoch": 1}, path)
    previous = path.read_bytes()

    def failing_fsync(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(utils.os, "fsync", failing_fsync)
    with pytest.raises(UserError) as err:
        utils.atomic_save_torch({"epoch": 2}, path)
    assert str(err.value) == message.format(path=path)
    assert path.read_bytes() == previous
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"], "temporary file left behind"


def test_other_write_errors_still_raise(tmp_path, monkeypatch):
    def failing_write(f):
        raise OSError(errno.EIO, "I/O error")
    with pytest.raises(OSError):
        utils.atomic_write(tmp_path / "x", failing_write)


# --------------------------------------------------------------------------- 8. wandb

@pytest.fixture
def loopback_only(monkeypatch):
    """Tests must never reach the network: anything but loopback fails here."""
    real = socket.create_connection

    def guarded(address, *args, **kwargs):
        assert address[0] in ("127.0.0.1", "localhost", "::1"), f"test tried to reach {address}"
        return real(address, *args, **kwargs)
    monkeypatch.setattr(socket, "create_connection", guarded)


@pytest.fixture
def wandb_key(monkeypatch, tmp_path, loopback_only):
    monkeypatch.setenv("WANDB_API_KEY", "k")
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))


def test_wandb_auto_falls_back_to_offline_when_unreachable(wandb_key, monkeypatch, capsys):
    asked = []
    monkeypatch.setattr(utils, "wandb_reachable", lambda host, port, tls: asked.append((host, port)) or False)
    assert utils.resolve_wandb_mode("auto") == "offline"
    assert asked == [("api.wandb.ai", 443)]
    notice = capsys.readouterr().err.strip()
    assert "\n" not in notice and "api.wandb.ai:443" in notice and "offline" in notice
    monkeypatch.setenv("WANDB_BASE_URL", "http://wandb.example.org:8080")
    assert utils.resolve_wandb_mode("auto") == "offline" and asked[-1] == ("wandb.example.org", 8080)
    monkeypatch.setattr(utils, "wandb_reachable", lambda host, port, tls: True)
    assert utils.resolve_wandb_mode("auto") == "online"
    assert utils.resolve_wandb_mode("disabled") == "disabled" and utils.resolve_wandb_mode("offline") == "offline"


def test_wandb_online_without_key_or_network_is_one_line(wandb_key, monkeypatch, capsys):
    monkeypatch.setattr(utils, "wandb_reachable", lambda host, port, tls: False)
    with pytest.raises(UserError) as err:
        utils.resolve_wandb_mode("online")
    assert "\n" not in str(err.value) and "api.wandb.ai:443" in str(err.value) and "--wandb offline" in str(err.value)
    monkeypatch.delenv("WANDB_API_KEY")
    asked = []
    monkeypatch.setattr(utils, "wandb_reachable", lambda host, port, tls: asked.append(host) or True)
    with pytest.raises(UserError) as err:
        utils.resolve_wandb_mode("online")
    assert "\n" not in str(err.value) and "WANDB_API_KEY" in str(err.value)
    assert utils.resolve_wandb_mode("auto") == "offline" and not asked, "no account: no network check"


def answer_once(server):
    """Accept one connection and answer its request with an HTTP status line."""
    connection, _ = server.accept()
    with connection:
        connection.recv(1024)
        connection.sendall(b"HTTP/1.0 200 OK\r\n\r\n")


def test_wandb_reachability_check_on_loopback(loopback_only):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        answer = threading.Thread(target=answer_once, args=(server,), daemon=True)
        answer.start()
        assert utils.wandb_reachable("127.0.0.1", port, False, timeout=1)
        answer.join()
    assert not utils.wandb_reachable("127.0.0.1", port, False, timeout=1)  # closed: refused at once
    assert not utils.wandb_reachable("", 443, True)


def test_ctrl_c_outside_a_training_loop_is_one_line_and_status_130(capsys):
    from utils import run_main

    @run_main
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        interrupted()
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "interrupted\n"


# --------------------------------------------------------------------------- 9. one owner per output folder
# The cases of the run-folder issue, by number; run_folder.py itself is tested in test_run_folder.py.

def last_bytes(run):
    return (run / "checkpoints" / "last.pt").read_bytes()


def test_case_3_resume_into_a_folder_of_another_run_is_refused(tmp_path, pannuke_folds, train_in_process, capsys,
                                                               one_thread):
    folds = dict(train_folds=(3,), test_folds=(3,))
    a, b = tmp_path / "A", tmp_path / "B"
    for run in (a, b):
        train_in_process(train_in_process.argv(pannuke_folds, run, **folds))
    before = last_bytes(b)
    argv = train_in_process.argv(pannuke_folds, b, "--resume", a / "checkpoints" / "last.pt", epochs=2, **folds)
    line = main_error(train_in_process, argv, capsys)
    assert "holds another run" in line and str(b) in line
    assert last_bytes(b) == before
    # Into a new folder the resumed run goes on, under its own run id.
    train_in_process(train_in_process.argv(pannuke_folds, tmp_path / "C", "--resume", a / "checkpoints" / "last.pt",
                                           epochs=2, **folds))
    run_id = torch.load(a / "checkpoints" / "last.pt", weights_only=True)["run_id"]
    assert run_id and torch.load(tmp_path / "C" / "checkpoints" / "last.pt", weights_only=True)["run_id"] == run_id


def test_case_4_a_second_run_into_a_busy_folder_names_the_first(tmp_path, pannuke_folds, run_script, train_in_process,
                                                               capsys):
    from conftest import sigterm_when
    out = tmp_path / "run"
    argv = train_in_process.argv(pannuke_folds, out, "--save-every-steps", 1, epochs=1000, batch_size=1,
                                 train_folds=(3,), test_folds=(3,))
    proc = run_script.start("train_pannuke.py", *argv)
    lines = []

    def refused_while_running():
        if not (out / "checkpoints" / "last.pt").is_file():
            return False
        lines.append(main_error(train_in_process, argv, capsys))
        return True

    _, _, err = sigterm_when(proc, refused_while_running, "the first run's first checkpoint")
    assert proc.returncode == 143, err
    assert f"in use by another run (pid {proc.pid})" in lines[0]


@needs_utp
def test_case_5_test_csv_linked_to_the_input_is_one_line_and_never_written_through(
        test_script, utp_copy, trained_checkpoint, tmp_path, capsys, one_thread):
    data_dir, masks_dir = utp_copy
    out = tmp_path / "out"
    argv = utp_argv(trained_checkpoint, data_dir, masks_dir, out, "--grids", 0)
    test_script.main(argv)
    source = data_dir / "test.csv"
    original = source.read_bytes()
    (out / "test.csv").unlink()
    (out / "test.csv").symlink_to(source)
    line = main_error(test_script.main, argv, capsys)
    assert "symbolic link" in line and str(out / "test.csv") in line
    # --overwrite deletes the link (the run's own entry), never what it points at.
    test_script.main(argv + ["--overwrite"])
    assert source.read_bytes() == original
    assert not (out / "test.csv").is_symlink() and (out / "test.csv").read_bytes() == original


def test_case_8_overwrite_with_fewer_folds_leaves_no_old_image(test_script, trained_checkpoint, pannuke_folds,
                                                              tmp_path, one_thread):
    out = tmp_path / "synthetic"
    test_script.main(generate_argv(trained_checkpoint, pannuke_folds, out, "--test-folds", 1, 3, "--grids", 0))
    assert any(p.name.startswith("fold1_") for p in out.glob("*.png"))
    test_script.main(generate_argv(trained_checkpoint, pannuke_folds, out, "--test-folds", 3, "--grids", 0,
                                   "--overwrite"))
    assert {p.name.split("_")[0] for p in out.glob("*.png")} == {"fold3"}


@pytest.mark.parametrize("change", [["--seed", "5"], ["--norm-mode", "train"]])
def test_case_9_another_seed_or_norm_mode_keeps_no_old_image(change, test_script, trained_checkpoint, pannuke_folds,
                                                             tmp_path, capsys, one_thread):
    out = tmp_path / "synthetic"
    argv = generate_argv(trained_checkpoint, pannuke_folds, out, "--grids", 0)
    test_script.main(argv)
    before = {p.name: p.read_bytes() for p in out.glob("*.png")}
    line = main_error(test_script.main, argv + change, capsys)
    assert f"{change[0][2:].replace('-', '_')} " in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == before


@pytest.mark.parametrize("flags,needle", [(["--batch-size", "-1"], "--batch-size must be at least 1"),
                                          (["--batch-size", "0"], "--batch-size must be at least 1"),
                                          (["--seed", "-1"], "--seed must be at least 0")])
def test_case_10_impossible_test_py_options_write_nothing(flags, needle, test_script, trained_checkpoint,
                                                          pannuke_folds, tmp_path, capsys):
    line = main_error(test_script.main, generate_argv(trained_checkpoint, pannuke_folds, tmp_path / "out", *flags),
                      capsys)
    assert needle in line and not (tmp_path / "out").exists()


def test_case_17_a_full_disk_while_copying_is_one_line(tmp_path, monkeypatch):
    source, target = tmp_path / "test.csv", tmp_path / "out" / "test.csv"
    source.write_text("image_id\n")

    def full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(utils.shutil, "copyfileobj", full)
    with pytest.raises(UserError) as err:
        utils.atomic_copy(source, target)
    assert str(err.value) == f"no space left on device writing {target}"
    assert not target.exists() and not list(target.parent.iterdir())


@needs_utp
@pytest.mark.parametrize("script", ["test.py", "make_masks.py", "evaluate.py", "classify_utp.py"])
def test_case_18_out_dir_naming_a_file_is_one_line(script, utp_copy, trained_checkpoint, tmp_path, run_script):
    data_dir, masks_dir = utp_copy
    out = tmp_path / "a_file"
    out.write_text("not a folder")
    argv = {"test.py": utp_argv(trained_checkpoint, data_dir, masks_dir, out),
            "make_masks.py": ["--checkpoint", segmenter_checkpoint(tmp_path / "seg.pt"), "--data-dir", data_dir,
                              "--out-dir", out, "--splits", "test", "--device", "cpu"],
            "evaluate.py": ["--real", data_dir, "--fake", data_dir, "--out-dir", out, "--device", "cpu"],
            "classify_utp.py": ["--data-dir", data_dir, "--out-dir", out, "--device", "cpu", "--wandb", "disabled"],
            }[script]
    res = run_script(script, *argv)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    line = error_line(res.stderr)
    assert str(out) in line and "is a file" in line
    assert out.read_text() == "not a folder"


def test_case_20_ctrl_c_in_test_py_is_one_line_and_status_130(test_script, trained_checkpoint, pannuke_folds,
                                                             tmp_path, monkeypatch, capsys):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setitem(test_script.WRITERS, "pannuke", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        test_script.main(generate_argv(trained_checkpoint, pannuke_folds, tmp_path / "out"))
    assert exit_info.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"


@needs_utp
def test_case_2_make_masks_never_writes_through_a_link_nor_into_the_data(utp_copy, tmp_path, capsys, one_thread):
    import make_masks
    data_dir, masks_dir = utp_copy
    out = tmp_path / "made"
    argv = ["--checkpoint", segmenter_checkpoint(tmp_path / "seg.pt"), "--data-dir", data_dir, "--out-dir", out,
            "--splits", "test", "--tile", "128", "--overlap", "32", "--device", "cpu", "--precision", "fp32",
            "--workers", "0"]
    make_masks.main(list(map(str, argv)))
    inputs = {p: p.read_bytes() for p in data_dir.parent.rglob("*") if p.is_file()}
    shutil.rmtree(out / "test" / "masks")
    (out / "test" / "masks").symlink_to(masks_dir / "test" / "masks")
    make_masks.main(list(map(str, argv)))  # every mask is there (through the link): nothing to write
    line = main_error(make_masks.main, argv + ["--overwrite"], capsys)
    assert "symbolic link" in line and str(out / "test" / "masks") in line
    inside_data = argv[:5] + [data_dir / "masks_here"] + argv[6:]
    assert "inside --data-dir" in main_error(make_masks.main, inside_data, capsys)
    assert {p: p.read_bytes() for p in data_dir.parent.rglob("*") if p.is_file()} == inputs
