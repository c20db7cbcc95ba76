"""Run folders: what metafusion may replace, and one writer at a time.

A run folder is marked by the file ``.metafusion-run`` it gets when it is made. ``--overwrite`` replaces a
folder only if it is one (or if it is empty), and only one of the same kind (a fine-tune never replaces
a meta-training run, nor the reverse): a folder of the user's own files is refused, naming what is in
it, and files the user put into a run folder are kept (and named) when metafusion replaces its own.
While a process writes a run folder it holds an exclusive lock on that marker (``flock``); a second
writer gets a clear error instead of mixing its files with the first one's. The lock goes with the
process, so a killed run leaves no stale lock behind.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import InputError, warn

MARKER = ".metafusion-run"
# Folders of metafusion 0.1 have no marker; one whose every entry is a name a run writes is one too.
RUN_ENTRIES = {
    "config.yaml", "metrics.jsonl", "last.pt", "best.pt", "start.pt", "selected.pt", "selection.json",
    "train.json", "tensorboard", "finetune", "task_weights.csv", "task_weights.png", "corrupted_weights.png",
    "learning_curve.png", "attention.png", "compare.md", "compare.csv", "model.pt", "finetune.json",
    "predictions.csv", "predictions.jsonl", "predictions.png",
}  # fmt: skip


# What a folder's own files say it is: the first kind whose files it holds.
KINDS = {
    "fine-tune": ("finetune.json", "model.pt"),
    "compare": ("compare.md", "compare.csv"),
    "meta-train": ("config.yaml", "train.json", "last.pt", "best.pt", "metrics.jsonl"),
}


def kind_of(folder: Path) -> str | None:
    """``meta-train``, ``fine-tune`` or ``compare``, from the files the folder holds; None if none says."""
    return next((k for k, names in KINDS.items() if any((Path(folder) / n).exists() for n in names)), None)


def _written_by_metafusion(entry: Path) -> bool:
    return entry.name in RUN_ENTRIES or entry.name.startswith("results") or entry.name == MARKER


class RunFolderError(InputError, FileExistsError):
    """A run folder would be overwritten, is in use, or is missing what a stage needs."""


def is_run_folder(folder: Path, count_marker: bool = True) -> bool:
    """Made by metafusion: it has the marker, or (older runs) holds only what runs write."""
    if not folder.is_dir():
        return False
    if count_marker and (folder / MARKER).is_file():
        return True
    entries = [e for e in folder.iterdir() if e.name != MARKER]
    return bool(entries) and all(_written_by_metafusion(e) or (e.is_dir() and is_run_folder(e)) for e in entries)


def check_out(out: str | Path, overwrite: bool = False, count_marker: bool = True, kind: str | None = None) -> Path:
    """Refuse ``out`` unless it is new, empty, or (with ``overwrite``) a run folder of ``kind`` (any kind where
    None); writes nothing. ``count_marker=False``: the marker is this process's own, just made, and proves
    nothing."""
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"--out {folder} is a file, not a folder")
    if not folder.is_dir() or not any(e.name != MARKER for e in folder.iterdir()):
        return folder
    if not is_run_folder(folder, count_marker):
        shown = sorted(e.name for e in folder.iterdir() if e.name != MARKER)
        raise RunFolderError(
            f"--out {folder} holds files metafusion did not write ({', '.join(shown[:5])}"
            f"{', ...' if len(shown) > 5 else ''}); it is not a run folder, so it is never emptied, "
            f"--overwrite or not: choose another --out"
        )
    if not overwrite:
        raise RunFolderError(f"run folder {folder} already exists; pass --overwrite or choose another --out")
    found = kind_of(folder)
    if kind is not None and found is not None and found != kind:
        raise RunFolderError(
            f"--out {folder} is a {found} folder; a {kind} replaces only a {kind} folder, --overwrite or not: "
            f"choose another --out"
        )
    return folder


@contextmanager
def new_run_folder(out: str | Path, overwrite: bool = False, kind: str | None = None) -> Iterator[Path]:
    """``out`` locked, checked again under the lock (another process may have written it meanwhile) and
    emptied of what metafusion wrote: a fresh run folder of ``kind`` for the block."""
    folder = Path(out)
    marked = (folder / MARKER).is_file()
    with locked(folder):
        check_out(folder, overwrite, count_marker=marked, kind=kind)
        empty(folder)
        yield folder


_held: dict[Path, list] = {}  # folder -> [open marker file, depth]: a process re-enters its own lock


@contextmanager
def locked(folder: str | Path) -> Iterator[Path]:
    """Hold ``folder``'s lock (making the folder and its marker if needed) for the block."""
    folder = Path(folder).resolve()
    if folder in _held:
        _held[folder][1] += 1
        try:
            yield folder
        finally:
            _held[folder][1] -= 1
        return
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / MARKER, "a+")  # noqa: SIM115  (held open for the lock's lifetime)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        handle.seek(0)
        owner = _owner(handle.read())
        handle.close()
        if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            raise
        raise RunFolderError(
            f"run folder {folder} is in use by another metafusion process{owner}; wait for it to finish, "
            f"or choose another --out"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"written_by": "metafusion", "pid": os.getpid()}) + "\n")
    handle.flush()
    _held[folder] = [handle, 1]
    try:
        yield folder
    finally:
        _held.pop(folder)
        handle.close()  # releases the lock


def _owner(text: str) -> str:
    try:
        return f" (pid {json.loads(text)['pid']})"
    except (ValueError, KeyError, TypeError):
        return ""


def empty(folder: Path) -> None:
    """Remove what metafusion wrote in a run folder but its marker (the caller holds the lock); the user's
    own files stay, and a warning names them."""
    kept = []
    for entry in sorted(Path(folder).iterdir()):
        if entry.name == MARKER:
            continue
        if not _written_by_metafusion(entry):
            kept.append(entry.name)
            continue
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    if kept:
        warn(f"{folder}: replaced what metafusion wrote; kept your own {', '.join(kept)}")
