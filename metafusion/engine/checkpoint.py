"""Self-describing, atomically written checkpoints (config, versions, step, RNG states, all state).

Every file metafusion writes holds tensors and plain data only (dicts, lists, tuples, strings, numbers),
and every file it reads is loaded with ``torch.load(weights_only=True)``: a model file someone shares
cannot run code when it is opened. A file that needs more than that is refused, never unpickled.
"""

from __future__ import annotations

import os
import pickle
import platform
import random
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError, MissingFileError

# What each kind of file says it is; a reader refuses another kind, or a newer version of its own.
CHECKPOINT_FORMAT = "metafusion.checkpoint/1"


class CheckpointError(InputError):
    """A file given as a checkpoint or model that cannot be opened: not one, truncated, of a newer
    format, or carrying more than tensors and plain data (which is never unpickled)."""


def library_versions() -> dict[str, str]:
    import torchaudio
    import torchvision
    import transformers

    from .._learn2learn import __version__ as l2l_version
    from ..version import __version__

    return {
        "metafusion": __version__,
        "torch": str(torch.__version__),  # a str subclass that weights_only loading does not take
        "torchvision": torchvision.__version__,
        "torchaudio": torchaudio.__version__,
        "transformers": transformers.__version__,
        "learn2learn": l2l_version,
        "numpy": np.__version__,
    }


def hardware(device: str) -> str:
    """What ran it: the GPU's name, or the CPU model and core count (kernel speeds differ between CPU
    makes, so timings are only comparable on the same one)."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def rng_state() -> dict[str, Any]:
    """The global RNG states as tensors and plain data (numpy's key array as a tensor)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = [kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss]
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))  # a list after a round trip through some loaders
    kind, key, pos, has_gauss, cached_gauss = state["numpy"]
    key = key.numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
    np.random.set_state((kind, key.astype(np.uint32), pos, has_gauss, cached_gauss))


def run_checkpoint(run_dir: str | os.PathLike) -> Path:
    """A run folder's checkpoint to evaluate: ``selected.pt`` (what selection on validation kept:
    ``engine.selection``), else ``best.pt`` (by meta-val accuracy, the start included), else ``last.pt``."""
    run_dir = Path(run_dir)
    for name in ("selected.pt", "best.pt"):
        if (run_dir / name).exists():
            return run_dir / name
    return run_dir / "last.pt"


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically: a temp file in the same folder, then rename, so an
    interrupted run never leaves a truncated checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# Files of metafusion 0.1 hold numpy's RNG key as an array and torch's version as a TorchVersion (a str):
# data, not code. They are allowed by name so those runs still open; nothing else outside torch's own
# list of safe types is.
_LEGACY_SAFE = [
    np.core.multiarray._reconstruct,
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
    torch.torch_version.TorchVersion,
]


def read_file(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors for every way a user's file can be
    wrong: missing, a folder, not a PyTorch file, truncated, or carrying objects beyond tensors and
    plain data (refused before anything in it runs)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a {what} file")
    if not path.is_file():
        raise MissingFileError(f"{what} not found: {path}")
    try:
        with torch.serialization.safe_globals(_LEGACY_SAFE):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        found = _unsafe_globals(path)
        if found:
            raise CheckpointError(
                f"{path}: refused to open: it carries Python objects ({', '.join(found[:3])}) beyond tensors and "
                f"plain data, which could run code; metafusion never unpickles them. Open model files only from "
                f"people you trust, and ask for one written by metafusion"
            ) from None
        raise CheckpointError(f"{path} is not a {what} (not a PyTorch file)") from None
    except (RuntimeError, EOFError, ValueError, KeyError, IndexError, AttributeError):
        raise CheckpointError(f"{path} is not a readable {what}: truncated, or not a PyTorch file") from None


def _unsafe_globals(path: Path) -> list[str]:
    """The names of the Python objects a PyTorch file would import to load (read, never imported)."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a PyTorch zip file at all
        return []


def file_format(state: Any) -> str | None:
    """What a loaded file says it is (``"kind/version"``); checkpoints from before files named their format
    are recognised by their keys. None: not a file metafusion wrote."""
    if not isinstance(state, dict):
        return None
    found = state.get("format")
    if found is None and {"module", "config"} <= set(state):
        return CHECKPOINT_FORMAT
    return found if isinstance(found, str) else None


def check_format(state: Any, path: Path, expected: str, what: str) -> dict[str, Any]:
    """``state`` if it is a file of kind ``expected`` (``"kind/version"``), else a CheckpointError that says
    what it is instead (another kind, another version, not metafusion's)."""
    found = file_format(state)
    if found is None:
        raise CheckpointError(f"{path} is not a {what} (a PyTorch file, but not one metafusion wrote)")
    kind, found_kind = expected.rpartition("/")[0], found.rpartition("/")[0]
    if found_kind != kind:
        raise CheckpointError(f"{path} is a {found_kind!r} file, not a {what} ({kind!r})")
    if found != expected:
        raise CheckpointError(
            f"{path} is a {what} of format {found!r}, written by another metafusion version ({state.get('versions')}); "
            f"this one reads {expected!r}: open it with the version that wrote it"
        )
    return state


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A meta-training checkpoint (``last.pt``, ``best.pt``), checked to be one."""
    return check_format(read_file(path), Path(path), CHECKPOINT_FORMAT, "metafusion checkpoint")
