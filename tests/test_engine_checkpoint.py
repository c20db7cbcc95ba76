"""Files metafusion opens never run code: a crafted model file is refused by every command that reads one
(and its payload does not run); truncated, foreign and future-format files are one-line errors."""

import os
import shutil
from pathlib import Path

import pytest
import torch
from test_cli import TINY, run_cli

import metafusion
from metafusion.engine.checkpoint import CheckpointError, load_checkpoint, read_file

DATA = Path(__file__).resolve().parent / "data"


class Payload:
    """What an attacker puts in a shared model file: unpickling it runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One tiny meta-trained and fine-tuned run, shared by the tests here (copied before any edit)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert run_cli("meta-train", *TINY, "--iterations", 2, "--out", run) == 0
    assert run_cli("fine-tune", "--run", run, "--quiet") == 0
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def _crafted(path: Path, marker: Path, **fields) -> Path:
    torch.save(
        {"format": "metafusion.adapted-model/1", "module": {}, "config": {}, "x": Payload(marker), **fields}, path
    )
    return path


@pytest.mark.slow
@pytest.mark.parametrize("command", ["predict", "meta-test", "fine-tune", "resume", "load"])
def test_a_file_that_carries_code_is_refused_and_the_code_never_runs(trained, tmp_path, capsys, command):
    run, marker = _copy(trained, tmp_path), tmp_path / "owned"
    model = _crafted(run / "finetune" / "model.pt", marker)
    for name in ("last.pt", "best.pt", "start.pt", "selected.pt"):
        _crafted(run / name, marker)
    if command == "load":
        with pytest.raises(CheckpointError, match="refused to open"):
            metafusion.load(model)
    else:
        argv = {
            "predict": [
                "predict",
                "--model",
                model,
                "--data",
                DATA / "tiny_unlabelled.csv",
                "--out",
                tmp_path / "p.csv",
            ],
            "meta-test": ["meta-test", "--run", run],
            "fine-tune": ["fine-tune", "--run", run, "--out", tmp_path / "ft"],
            "resume": ["meta-train", "--resume", run],
        }[command]
        assert run_cli(*argv) == 2
        err = capsys.readouterr().err
        assert "refused to open" in err and "posix.system" in err and len(err.strip().splitlines()) == 1, err
    assert not marker.exists(), "the file's code ran"


@pytest.mark.parametrize(
    "content,message",
    [
        (lambda good: good[: len(good) // 2], "truncated, or not a PyTorch file"),
        (lambda good: b"label,image\ncat,cat0.png\n", "not a PyTorch file"),
        (lambda good: (DATA / "tiny_folder" / "cat" / "cat0.png").read_bytes(), "not a PyTorch file"),
        (lambda good: b"", "truncated, or not a PyTorch file"),
    ],
)
def test_truncated_and_foreign_files_are_one_line_errors(trained, tmp_path, capsys, content, message):
    run = _copy(trained, tmp_path)
    (run / "last.pt").write_bytes(content((trained / "last.pt").read_bytes()))
    assert run_cli("meta-train", "--resume", run) == 2
    err = capsys.readouterr().err
    assert message in err and str(run / "last.pt") in err and len(err.strip().splitlines()) == 1, err
    model = tmp_path / "model.pt"
    model.write_bytes((run / "last.pt").read_bytes())
    assert run_cli("predict", "--model", model, "--data", DATA / "tiny_unlabelled.csv") == 2
    assert message in capsys.readouterr().err


def test_files_of_another_format_version_or_kind_say_what_they_are(trained, tmp_path):
    state = read_file(trained / "finetune" / "model.pt")
    future = tmp_path / "future.pt"
    torch.save({**state, "format": "metafusion.adapted-model/2"}, future)
    with pytest.raises(CheckpointError, match="format 'metafusion.adapted-model/2', written by another metafusion"):
        metafusion.load(future)
    with pytest.raises(CheckpointError, match="is a 'metafusion.adapted-model' file, not a metafusion checkpoint"):
        load_checkpoint(trained / "finetune" / "model.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not one metafusion wrote"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(trained)


def test_what_metafusion_writes_loads_with_weights_only(trained):
    for path in (trained / "last.pt", trained / "best.pt", trained / "finetune" / "model.pt"):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
        torch.load(path, weights_only=True)  # no allow-list needed


def test_runs_of_metafusion_0_1_still_open(trained, tmp_path):
    """0.1 wrote numpy's RNG key as an array and torch's version as a TorchVersion: data, allowed by name."""
    import numpy as np

    state = load_checkpoint(trained / "last.pt")
    state.pop("format")
    state["rng"]["numpy"] = np.random.get_state()
    state["versions"]["torch"] = torch.__version__
    torch.save(state, tmp_path / "old.pt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "old.pt")  # not plain data
    assert load_checkpoint(tmp_path / "old.pt")["step"] == state["step"]
