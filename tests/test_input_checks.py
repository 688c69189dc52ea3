"""User-input checks: each bad input gives one UserError line naming the file or option and
what was expected, raised before any work. Tiny data in the real on-disk formats."""
import numpy as np
import pytest
from conftest import main_error, main_error_line

from utils import UserError


# --------------------------------------------------------------------------- PanNuke patches read later

def _colon_fold(pannuke_writer, root, n):
    """Official fold 1 of n identical Colon patches (float64, 0..255); returns (images, masks, files)."""
    image, mask, _ = pannuke_writer.patch(3)
    images = np.repeat(image[None], n, 0).astype(np.float64)
    masks = np.repeat(mask[None], n, 0).astype(np.float64)
    return images, masks, pannuke_writer.files(root, 1)


@pytest.mark.parametrize("case, change, needle", [
    ("nan", lambda a: a.__setitem__((1, 0, 0, 0), np.nan), "patch 1 has pixel values outside 0..255"),
    ("scaled-0-1", lambda a: a.__setitem__(1, a[1] / 255.0), "patch 1 holds pixel values within 0..1"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_pannuke_patch_outside_startup_sample_is_checked_on_read(tmp_path, pannuke_writer, case, change, needle):
    """Patch 1 is not among the evenly spaced start-up sample; reading it names the fold file and the patch."""
    from dataset.pannuke import SAMPLE_ITEMS, PanNukeFolds, sample_indices
    n = 4 * SAMPLE_ITEMS + 3
    images, masks, files = _colon_fold(pannuke_writer, tmp_path, n)
    assert 1 not in sample_indices(np.arange(n), check_data=False)
    change(images)
    pannuke_writer.fold(tmp_path, 1, images, masks, np.array(["Colon"] * n))
    data = PanNukeFolds(tmp_path, [1], "Colon")
    data[0]
    with pytest.raises(UserError) as err:
        data[1]
    assert needle in str(err.value) and str(files.images) in str(err.value)


def test_pannuke_mask_outside_startup_sample_is_checked_on_read(tmp_path, pannuke_writer):
    from dataset.pannuke import SAMPLE_ITEMS, PanNukeFolds
    n = 4 * SAMPLE_ITEMS + 3
    images, masks, files = _colon_fold(pannuke_writer, tmp_path, n)
    masks[1, 5, 5, 2] = np.nan
    pannuke_writer.fold(tmp_path, 1, images, masks, np.array(["Colon"] * n))
    with pytest.raises(UserError, match="patch 1 has NaN") as err:
        PanNukeFolds(tmp_path, [1], "Colon")[1]
    assert str(files.masks) in str(err.value)


# --------------------------------------------------------------------------- UniToPatho CSV

UTP_HEADER = ",image_id,top_label_name,top_label,type_name,type,grade_name,grade,wsi,roi,mpp,x,y,w,h\n"


def _utp_row(index, name, label="TA.HG", codes="2,TA,2,HG,1"):
    """One row of the official UniToPatho 800 CSV (an unnamed index column first; names with commas quoted)."""
    return f'{index},"{name}",{label},{codes},CASO 10,12,0.44,61530,11677,1812,1812\n'


def test_utp_duplicate_image_id_names_csv_and_both_lines(tmp_path):
    """Masks are stored by image_id: a second row with the same image_id would overwrite the first's mask."""
    from dataset.unitopatho import read_split
    dup = "TA.HG CASO 10 - 2019-03-04 09.24.36.ndpi_ROI__mpp0.44_reg012_crop_sk00053_(61530,11677,1812,1812).png"
    rows = [_utp_row(0, dup), _utp_row(1, "other_(1,2,1812,1812).png"),
            _utp_row(2, dup, label="HP", codes="0,HP,0,,-1")]
    (tmp_path / "train.csv").write_text(UTP_HEADER + "".join(rows))
    with pytest.raises(UserError) as err:
        read_split(tmp_path, "train")
    message = str(err.value)
    assert str(tmp_path / "train.csv") in message and dup in message
    assert "lines 2 and 4" in message and "\n" not in message


# --------------------------------------------------------------------------- train/test overlap

def _warning_lines(capsys):
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: ")]


def _training_cfg(add_data_args, *argv):
    import config
    return config.training_parser("test data", add_data_args, "runs/x").parse_args([str(a) for a in argv])


def test_pannuke_train_and_test_folds_sharing_a_fold_are_refused(tmp_path, pannuke_folds, train_in_process, capsys):
    argv = train_in_process.argv(pannuke_folds, tmp_path / "run", train_folds=(1, 2), test_folds=(2, 3))
    line = main_error_line(capsys, lambda: train_in_process([a for a in argv if a != "--allow-overlap"]))
    assert "--train-folds 1 2" in line and "--test-folds 2 3" in line and "fold 2" in line
    assert "--allow-overlap" in line


def test_pannuke_allow_overlap_warns_once(tmp_path, pannuke_folds, capsys):
    import train_pannuke
    from config import add_pannuke_training_data_args
    cfg = _training_cfg(add_pannuke_training_data_args, "--data-dir", pannuke_folds, "--train-folds", 1, 2,
                        "--test-folds", 2, 3, "--allow-overlap")
    train_pannuke.build_datasets(cfg)
    warnings = _warning_lines(capsys)
    assert len(warnings) == 1 and "fold 2" in warnings[0], warnings


def test_segmenter_folds_sharing_a_fold_are_refused(tmp_path, pannuke_folds, capsys):
    import train_segmenter
    argv = ["--data-dir", pannuke_folds, "--out-dir", tmp_path / "run", "--train-folds", 3, "--test-folds", 3,
            "--epochs", 1, "--workers", 0, "--device", "cpu", "--wandb", "disabled"]
    line = main_error_line(capsys, lambda: train_segmenter.main(list(map(str, argv))))
    assert "--train-folds 3" in line and "--test-folds 3" in line and "--allow-overlap" in line


def _conic_split(tmp_path):
    """A tiny CoNIC folder and a split file putting crag_10's patches on both sides."""
    from conic_fixtures import NAMES, make_conic
    make_conic(tmp_path / "conic")
    sides = {name: "test" if name.startswith(("glas_3", "crag_10__64_")) else "train" for name in NAMES}
    split = tmp_path / "split.csv"
    split.write_text("patch_info,split\n" + "".join(f"{n},{s}\n" for n, s in sides.items()))
    return tmp_path / "conic", split


def test_conic_split_file_with_a_source_on_both_sides_is_refused(tmp_path, train_conic_in_process, capsys):
    data, split = _conic_split(tmp_path)
    argv = ["--data-dir", data, "--split-file", split, "--out-dir", tmp_path / "run", "--epochs", 1, "--ngf", 8,
            "--ndf", 8, "--workers", 0, "--device", "cpu", "--wandb", "disabled"]
    line = main_error_line(capsys, lambda: train_conic_in_process(argv))
    assert str(split) in line and "'crag_10'" in line and "--allow-overlap" in line


def test_conic_split_file_overlap_allowed_warns_once(tmp_path, capsys):
    from config import add_conic_training_data_args
    from dataset.conic import gan_datasets
    data, split = _conic_split(tmp_path)
    gan_datasets(_training_cfg(add_conic_training_data_args, "--data-dir", data, "--split-file", split,
                               "--out-dir", tmp_path, "--allow-overlap"))
    warnings = _warning_lines(capsys)
    assert len(warnings) == 1 and "'crag_10'" in warnings[0] and str(split) in warnings[0], warnings


def test_segmenter_conic_split_file_overlap_is_refused(tmp_path, capsys):
    import train_segmenter
    data, split = _conic_split(tmp_path)
    argv = ["--dataset", "conic", "--data-dir", data, "--split-file", split, "--out-dir", tmp_path / "run",
            "--epochs", 1, "--workers", 0, "--device", "cpu", "--wandb", "disabled"]
    line = main_error_line(capsys, lambda: train_segmenter.main(list(map(str, argv))))
    assert str(split) in line and "'crag_10'" in line


def test_folder_split_file_with_a_source_on_both_sides_is_refused(tmp_path, capsys):
    """A folder's own D/split.csv is read when --split-file is not given: slide 'a' is on both sides."""
    import train_folder
    from PIL import Image
    root = tmp_path / "folder"
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for name in ("a_00", "a_01", "b_00"):
        labels = np.zeros((64, 64), np.uint8)
        labels[8:20, 8:20] = 1
        Image.fromarray(np.where(labels[..., None] == 1, (60, 20, 110), (235, 200, 225)).astype(np.uint8)).save(
            root / "images" / f"{name}.png")
        Image.fromarray(labels).save(root / "masks" / f"{name}.png")
    (root / "split.csv").write_text("name,split\na_00,train\nb_00,train\na_01,test\n")
    argv = ["--data-dir", root, "--crop-size", 64, "--out-dir", tmp_path / "run", "--epochs", 1, "--ngf", 8,
            "--ndf", 8, "--workers", 0, "--device", "cpu", "--wandb", "disabled"]
    line = main_error_line(capsys, lambda: train_folder.main(list(map(str, argv))))
    assert str(root / "split.csv") in line and "'a'" in line and "--allow-overlap" in line


# --------------------------------------------------------------------------- wandb server that never answers

@pytest.fixture
def silent_server(monkeypatch, tmp_path):
    """A wandb account and WANDB_BASE_URL pointing at a loopback server that accepts TCP connections
    (the kernel's backlog) but never answers; no other address may be reached."""
    import socket
    real = socket.create_connection

    def loopback_only(address, *args, **kwargs):
        assert address[0] in ("127.0.0.1", "localhost", "::1"), f"test tried to reach {address}"
        return real(address, *args, **kwargs)
    monkeypatch.setattr(socket, "create_connection", loopback_only)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        monkeypatch.setenv("WANDB_API_KEY", "k")
        monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
        yield port


def test_wandb_server_that_accepts_but_never_answers_falls_back_within_the_timeout(silent_server, capsys):
    import time

    import utils
    start = time.monotonic()
    assert utils.resolve_wandb_mode("auto") == "offline"
    assert time.monotonic() - start < utils.WANDB_TIMEOUT + 2
    notice = capsys.readouterr().err.strip()
    assert "\n" not in notice and f"127.0.0.1:{silent_server}" in notice and "offline" in notice
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        utils.resolve_wandb_mode("online")
    assert time.monotonic() - start < utils.WANDB_TIMEOUT + 2
    assert "\n" not in str(err.value) and "--wandb offline" in str(err.value)


def test_wandb_name_lookup_that_hangs_is_bounded(monkeypatch):
    import socket
    import time

    import utils

    def hanging_lookup(*args, **kwargs):
        time.sleep(30)
        raise socket.gaierror("too late")
    monkeypatch.setattr(socket, "getaddrinfo", hanging_lookup)
    start = time.monotonic()
    assert not utils.wandb_reachable("wandb.example.org", 443, True, timeout=1)
    assert time.monotonic() - start < 3


def test_wandb_server_that_answers_is_reachable():
    """Any HTTP answer counts (here a 401, as a wandb server gives without credentials)."""
    import http.server
    import threading

    import utils

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args):
            pass
    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert utils.wandb_reachable("127.0.0.1", server.server_port, False, timeout=2)
    finally:
        server.shutdown()
        server.server_close()


def test_wandb_invalid_api_key_is_one_line(monkeypatch, tmp_path):
    """wandb.init's own errors (wandb 0.31 raises AuthenticationError for a malformed key and CommError
    for a key the server refuses) become one line."""
    import logging
    from types import SimpleNamespace

    import wandb

    import runtime

    def refused(**kwargs):
        raise wandb.errors.AuthenticationError("WANDB_API_KEY invalid: API key must have 40+ characters,\nhas 1.")
    monkeypatch.setattr(wandb, "init", refused)
    args = SimpleNamespace(wandb="offline", wandb_project="p", wandb_entity=None, run_name=None, out_dir=str(tmp_path))
    telemetry = logging.getLogger("opentelemetry")
    level = telemetry.level
    try:
        with pytest.raises(UserError) as err:
            runtime.init_wandb(args)
        assert telemetry.getEffectiveLevel() > logging.ERROR, "wandb's telemetry would log its refused uploads at exit"
    finally:
        telemetry.setLevel(level)
    message = str(err.value)
    assert "\n" not in message and "API key must have 40+ characters, has 1" in message and "wandb" in message


# --------------------------------------------------------------------------- option values and checkpoints

@pytest.fixture(scope="module")
def make_masks_main():
    import make_masks
    return make_masks.main


@pytest.mark.parametrize("flags, needle", [
    (["--seed", "-1"], "--seed must be at least 0"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
], ids=["seed", "batch-size"])
def test_test_py_option_values_are_one_line(tmp_path, test_script, capsys, flags, needle):
    argv = ["--checkpoint", tmp_path / "never_read.pt", "--out-dir", tmp_path / "out", "--device", "cpu", *flags]
    assert needle in main_error(test_script.main, argv, capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, needle", [
    (["--seed", "-1"], "--seed must be at least 0"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--model-mpp", "nan"], "--model-mpp must be a finite number"),
    (["--source-mpp", "inf"], "--source-mpp must be a finite number"),
    (["--tile", "0"], "--tile must be at least 1"),
], ids=["seed", "batch-size", "model-mpp-nan", "source-mpp-inf", "tile"])
def test_make_masks_option_values_are_one_line(tmp_path, make_masks_main, capsys, flags, needle):
    argv = ["--checkpoint", tmp_path / "never_read.pt", "--data-dir", tmp_path, "--out-dir", tmp_path / "out",
            "--device", "cpu", *flags]
    assert needle in main_error(make_masks_main, argv, capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, needle", [
    (["--seed", "-1"], "--seed must be at least 0"),
    (["--unet-depth", "20"], "--unet-depth"),
], ids=["seed", "unet-depth"])
def test_training_option_values_are_one_line(tmp_path, pannuke_folds, train_in_process, capsys, flags, needle):
    out = tmp_path / "run"
    line = main_error_line(capsys, lambda: train_in_process(train_in_process.argv(pannuke_folds, out, *flags)))
    assert needle in line


def test_segmenter_infinite_lr_is_one_line(tmp_path, pannuke_folds, capsys):
    import train_segmenter
    argv = ["--data-dir", pannuke_folds, "--out-dir", tmp_path / "run", "--lr", "inf", "--device", "cpu"]
    assert "--lr must be a finite number" in main_error(train_segmenter.main, argv, capsys)
    assert not (tmp_path / "run").exists()


def test_classifier_on_a_csv_without_rows_is_one_line(tmp_path, capsys):
    import classify_utp
    data = tmp_path / "800"
    data.mkdir()
    (data / "train.csv").write_text(UTP_HEADER)
    (data / "test.csv").write_text(UTP_HEADER)
    argv = ["--data-dir", data, "--out-dir", tmp_path / "run", "--epochs", 1, "--device", "cpu", "--workers", 0,
            "--wandb", "disabled"]
    line = main_error(classify_utp.main, argv, capsys)
    assert str(data / "train.csv") in line and "no rows" in line


@pytest.mark.parametrize("kind, script", [("he-pix2pix", "test.py"), ("he-segmenter", "make_masks.py")])
def test_checkpoint_with_a_text_version_is_one_line(tmp_path, test_script, make_masks_main, capsys, kind, script):
    import torch
    path = tmp_path / "text_version.pt"
    torch.save({"kind": kind, "version": "2"}, path)
    main = test_script.main if script == "test.py" else make_masks_main
    argv = ["--checkpoint", path, "--data-dir", tmp_path, "--out-dir", tmp_path / "out", "--device", "cpu"]
    line = main_error(main, argv, capsys)
    assert str(path) in line and "version" in line and "'2'" in line
