"""Nothing the user owns is deleted or overwritten by surprise, one process writes a run folder at a time,
and a run that fails before its first checkpoint leaves nothing half-written."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli import TINY, run_cli

from metafusion.engine import train
from metafusion.engine.run_folder import MARKER, RunFolderError, locked
from metafusion.errors import InputError

DATA = Path(__file__).resolve().parent / "data"


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_folder_of_the_users_own_files_is_never_emptied(tmp_path, capsys, overwrite):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("three years of work")
    assert run_cli("meta-train", *TINY, "--iterations", 1, "--out", notes, *overwrite) == 2
    err = capsys.readouterr().err
    assert "holds files metafusion did not write (thesis.tex)" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in notes.iterdir()] == ["thesis.tex"]
    assert (notes / "thesis.tex").read_text() == "three years of work"


@pytest.mark.slow
def test_overwrite_replaces_a_run_folder_and_an_empty_folder_is_used(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()  # an empty folder the user made for it
    assert run_cli("meta-train", *TINY, "--iterations", 1, "--out", run) == 0
    assert (run / MARKER).is_file() and (run / "last.pt").is_file()
    assert run_cli("meta-train", *TINY, "--iterations", 1, "--out", run) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    (run / "results_last.json").write_text("{}")  # what an earlier meta-test of the run wrote: replaced
    assert run_cli("meta-train", *TINY, "--iterations", 1, "--out", run, "--overwrite") == 0
    assert not (run / "results_last.json").exists() and (run / "last.pt").is_file()


@pytest.mark.slow
def test_a_run_folder_of_an_older_version_without_marker_is_recognised(tmp_path):
    run = tmp_path / "old"
    assert run_cli("meta-train", *TINY, "--iterations", 1, "--out", run) == 0
    (run / MARKER).unlink()
    assert run_cli("meta-train", *TINY, "--iterations", 1, "--out", run, "--overwrite") == 0


@pytest.mark.slow
def test_a_second_writer_is_refused_while_the_first_holds_the_folder(tmp_path, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from metafusion.engine.run_folder import locked\n"
            f"with locked({str(run)!r}):\n    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run_cli("meta-train", *TINY, "--iterations", 1, "--out", run, "--overwrite") == 2
        err = capsys.readouterr().err
        assert f"in use by another metafusion process (pid {holder.pid})" in err
        assert [p.name for p in run.iterdir()] == [MARKER]  # nothing mixed in
    finally:
        holder.kill()
        holder.wait()
    assert run_cli("meta-train", *TINY, "--iterations", 1, "--out", run) == 0  # the lock went with the process


def test_a_process_reenters_its_own_lock(tmp_path):
    import fcntl

    def free() -> bool:  # can another holder (a new open file) take the lock now?
        with open(tmp_path / "run" / MARKER) as other:
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False
            fcntl.flock(other, fcntl.LOCK_UN)
            return True

    with locked(tmp_path / "run"):
        with locked(tmp_path / "run"):  # re-entered, not deadlocked
            assert not free()
        assert not free()  # the outer block still holds it
    assert free()  # released with the outer block
    with locked(tmp_path / "run"):  # and taken again
        assert not free()


def test_a_run_that_fails_before_its_first_checkpoint_removes_what_it_wrote(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise InputError("the data ran out")

    monkeypatch.setattr(train, "_loop", broken)
    new = tmp_path / "new"
    assert run_cli("meta-train", *TINY, "--iterations", 3, "--out", new) == 2
    assert not new.exists() and "removed" in capsys.readouterr().err
    made = tmp_path / "made"
    made.mkdir()  # the user's empty folder stays, empty
    assert run_cli("meta-train", *TINY, "--iterations", 3, "--out", made) == 2
    assert made.is_dir() and not any(made.iterdir())


def test_resume_without_a_checkpoint_says_what_to_do(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    assert run_cli("meta-train", "--resume", run) == 2
    assert "stopped before its first checkpoint); start it again with --overwrite" in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_right_after_start_leaves_a_resumable_folder(tmp_path):
    """The signal arrives as soon as the run folder exists: the run ends after one step with last.pt."""
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "metafusion", "meta-train", *map(str, TINY), "--iterations", "50", "--out", str(run)],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (run / MARKER).exists():
        time.sleep(0.01)
    proc.terminate()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and f"--resume {run}" in err, err
    assert (run / "last.pt").is_file()


@pytest.mark.slow
def test_fine_tune_keeps_an_earlier_adapted_model(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli("meta-train", *TINY, "--iterations", 1, "--out", run) == 0
    assert run_cli("fine-tune", "--run", run, "--quiet") == 0
    first = (run / "finetune" / "model.pt").read_bytes()
    assert run_cli("fine-tune", "--run", run, "--seed", 1, "--quiet") == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (run / "finetune" / "model.pt").read_bytes() == first
    assert run_cli("fine-tune", "--run", run, "--seed", 1, "--out", tmp_path / "other", "--quiet") == 0
    assert (tmp_path / "other" / "model.pt").is_file() and (run / "finetune" / "model.pt").read_bytes() == first
    assert run_cli("fine-tune", "--run", run, "--seed", 1, "--overwrite", "--quiet") == 0
    assert (run / "finetune" / "model.pt").read_bytes() != first
    assert run_cli("fine-tune", "--run", run, "--out", run, "--overwrite") == 2  # never over the run itself
    assert "would hold the run folder" in capsys.readouterr().err


@pytest.mark.slow
def test_a_command_replaces_only_a_folder_of_its_own_kind_and_keeps_the_users_files(tmp_path, capsys):
    run, other = tmp_path / "run", tmp_path / "other"
    for folder in (run, other):
        assert run_cli("meta-train", *TINY, "--iterations", 1, "--out", folder) == 0
    before = sorted(p.name for p in other.iterdir())
    assert run_cli("fine-tune", "--run", run, "--out", other, "--overwrite", "--quiet") == 2  # another run
    assert "is a meta-train folder; a fine-tune replaces only a fine-tune folder" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == before and (other / "best.pt").is_file()
    assert run_cli("fine-tune", "--run", run, "--quiet") == 0
    assert run_cli("meta-train", *TINY, "--iterations", 1, "--out", run / "finetune", "--overwrite") == 2
    assert (run / "finetune" / "model.pt").is_file()  # an adapted model is not a meta-training run's to replace
    (run / "notes.md").write_text("mine")
    (run / "mine").mkdir()
    capsys.readouterr()
    assert run_cli("meta-train", *TINY, "--iterations", 1, "--out", run, "--overwrite") == 0
    assert "kept your own mine, notes.md" in capsys.readouterr().err
    assert (run / "notes.md").read_text() == "mine" and (run / "mine").is_dir() and (run / "best.pt").is_file()


@pytest.fixture(scope="module")
def adapted(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("adapted") / "run"
    tiny = ["--dataset", "manifest", "--data-root", DATA / "tiny_manifest.csv", "--ways", "2", "--queries", "1"]
    args = [*tiny, "--set", "data.val_episodes=2", "--episodes", "2", "--set", "model.width=8", "--meta-batch", "2"]
    assert run_cli("meta-train", *args, "--iterations", 1, "--out", run, "--quiet") == 0
    assert run_cli("fine-tune", "--run", run, "--task", DATA / "tiny_task.csv", "--quiet") == 0
    return run / "finetune" / "model.pt"


def test_predict_out_never_replaces_a_file_unless_told_and_never_the_model_or_data(adapted, tmp_path, capsys):
    data = DATA / "tiny_unlabelled.csv"
    out = tmp_path / "p.csv"
    out.write_text("the user's spreadsheet")
    assert run_cli("predict", "--model", adapted, "--data", data, "--out", out) == 2
    assert "already exists; pass --force" in capsys.readouterr().err and out.read_text() == "the user's spreadsheet"
    assert run_cli("predict", "--model", adapted, "--data", data, "--out", out, "--force") == 0
    assert out.read_text().startswith("id,predicted")
    model_bytes = adapted.read_bytes()
    assert run_cli("predict", "--model", adapted, "--data", data, "--out", adapted, "--force") == 2
    assert "is the model or one of the files it predicts" in capsys.readouterr().err
    assert adapted.read_bytes() == model_bytes
    manifest = tmp_path / "mine.csv"
    manifest.write_text(data.read_text().replace("tiny_folder/", f"{DATA}/tiny_folder/"))
    before = manifest.read_text()
    assert run_cli("predict", "--model", adapted, "--data", manifest, "--out", manifest, "--force") == 2
    assert manifest.read_text() == before
    assert (
        run_cli("predict", "--model", adapted, "--data", DATA / "tiny_folder", "--out", DATA / "tiny_folder" / "p.csv")
        == 2
    )
    assert "inside the data folder" in capsys.readouterr().err and not (DATA / "tiny_folder" / "p.csv").exists()
    assert run_cli("predict", "--model", adapted, "--data", data, "--out", tmp_path / "p.xlsx") == 2
    assert "written as .csv or .jsonl, not '.xlsx'" in capsys.readouterr().err
    assert not (tmp_path / "p.xlsx").exists()


def test_run_folder_errors_are_input_errors():
    assert issubclass(RunFolderError, InputError)
