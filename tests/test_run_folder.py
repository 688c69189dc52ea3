"""run_folder.RunFolder, the one owner of every output folder: apart from the inputs both
ways, an exclusive lock naming the holder's pid, a manifest compared on every re-run,
--overwrite deleting only what the tool wrote, and writes checked for links at write time."""
import os
import subprocess
import sys
import textwrap

import pytest

from run_folder import RunFolder, read_manifest
from utils import WRITE_CHECKS, UserError, atomic_save_text


@pytest.fixture(autouse=True)
def no_claims_left():
    yield
    WRITE_CHECKS.clear()


def claim(path, **kwargs):
    kwargs.setdefault("script", "tool.py")
    return RunFolder.claim(path, **kwargs)


@pytest.mark.parametrize("out_inside_input", [True, False])
def test_inputs_and_outputs_are_apart_both_ways(tmp_path, out_inside_input):
    data = tmp_path / "data"
    data.mkdir()
    out = data / "out" if out_inside_input else tmp_path / "out"
    inputs = {"--data-dir": data if out_inside_input else out / "data"}
    with pytest.raises(UserError, match="inside"):
        claim(out, inputs=inputs)
    assert not out.exists()


def test_same_options_continue_other_options_are_refused_and_overwrite_deletes_only_its_own(tmp_path):
    out = tmp_path / "out"
    folder = claim(out, options={"seed": 1})
    atomic_save_text(out / "images" / "a.png", "a")
    folder.release()
    (out / "images" / "user_notes.txt").write_text("mine")
    again = claim(out, options={"seed": 1})
    assert again.run_id == folder.run_id and (out / "images" / "a.png").exists()
    again.release()
    with pytest.raises(UserError, match="seed 1 there, 2 here"):
        claim(out, options={"seed": 2})
    assert (out / "images" / "a.png").exists()
    claim(out, options={"seed": 2}, overwrite=True).release()
    assert not (out / "images" / "a.png").exists()
    assert (out / "images" / "user_notes.txt").read_text() == "mine"
    assert read_manifest(out)["options"] == {"seed": 2}


def test_a_folder_of_other_files_is_refused_even_with_overwrite(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="did not write"):
            claim(tmp_path / "photos", overwrite=overwrite)
    assert (tmp_path / "photos" / "holiday.jpg").exists()


def test_a_second_run_is_refused_naming_the_first_runs_pid(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from run_folder import RunFolder
        RunFolder.claim({str(out)!r}, "tool.py")
        print("claimed", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True, cwd=os.getcwd(),
        env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))})
    try:
        assert holder.stdout.readline().strip() == "claimed"
        with pytest.raises(UserError, match=f"in use by another run \\(pid {holder.pid}\\)"):
            claim(out)
    finally:
        holder.kill()
        holder.wait()
    claim(out).release()


def test_a_link_inside_the_folder_is_refused_at_write_time(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    (data / "masks").mkdir(parents=True)
    (data / "masks" / "a.png").write_text("input")
    folder = claim(out)
    (out / "test").mkdir()
    (out / "test" / "masks").symlink_to(data / "masks")
    with pytest.raises(UserError, match="symbolic link inside the output folder"):
        atomic_save_text(out / "test" / "masks" / "a.png", "output")
    (out / "test.csv").symlink_to(data / "masks" / "a.png")
    with pytest.raises(UserError, match="symbolic link"):
        atomic_save_text(out / "test.csv", "output")
    assert (data / "masks" / "a.png").read_text() == "input"
    folder.release()


def test_a_training_run_continues_only_with_its_own_run_id(tmp_path):
    out = tmp_path / "run"
    first = claim(out, one_run=True)
    run_id = first.run_id
    atomic_save_text(out / "checkpoints" / "last.pt", "weights")
    first.release()
    with pytest.raises(UserError, match="already holds a run"):
        claim(out, one_run=True)
    with pytest.raises(UserError, match="holds another run"):
        claim(out, one_run=True, resume=("someone-else", tmp_path / "other" / "last.pt"))
    again = claim(out, one_run=True, resume=(run_id, out / "checkpoints" / "last.pt"))
    assert again.run_id == run_id
    again.release()


def test_a_run_from_before_manifests_is_adopted_only_by_resuming_its_checkpoint(tmp_path):
    out = tmp_path / "old_run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.pt").write_text("x")
    with pytest.raises(UserError, match="did not write"):
        claim(out, one_run=True)
    adopted = claim(out, one_run=True, resume=(None, out / "checkpoints" / "last.pt"))
    assert adopted.run_id and read_manifest(out)["run_id"] == adopted.run_id
    adopted.release()


def test_a_run_that_failed_before_writing_leaves_nothing_in_the_way(tmp_path):
    """Case 20: a start that failed after its claim (bad data, say) does not block the next run."""
    out = tmp_path / "out"
    claim(out, options={"seed": 1}).release()
    claim(out, options={"seed": 2}).release()
    assert read_manifest(out)["options"] == {"seed": 2}
