"""The dataset registry: name -> builder(DataConfig, options) -> MultimodalDataset.

Each dataset registers itself in its own module (``@DATASETS.register``, beside its loader and its options
dataclass; ``data/__init__.py`` imports every module): it says where it expects its files (``expects``),
where it has files how to verify them (``check``: root -> a one-line verdict; `metafusion datasets` shows
both), and which options of its own it takes (``options``: a dataclass; ``data.<key>`` in a config sets
them, checked when it is resolved).
"""

from __future__ import annotations

from pathlib import Path

from ..config import DataConfig
from ..registry import Registry
from .dataset import DataError

DATASETS: Registry = Registry("dataset")


def require_root(cfg: DataConfig, sub: str) -> Path:
    expects = DATASETS.info(cfg.dataset).get("expects", "its files")
    if not cfg.root:
        raise DataError(
            f"dataset {cfg.dataset!r} needs a data root: set METAFUSION_DATA or data.root (expects {expects})"
        )
    path = Path(cfg.root) / sub if sub else Path(cfg.root)
    if not path.exists():
        raise DataError(
            f"dataset {cfg.dataset!r}: {path} does not exist (expects {expects} under the data root {cfg.root})"
        )
    return path


def check_files(name: str, root: Path) -> str:
    """A one-line verdict on whether dataset ``name``'s files are under ``root`` (its entry's ``check``)."""
    check = DATASETS.info(name).get("check")
    if check is None:
        return "(no file check)"
    try:
        return check(Path(root))
    except DataError as e:
        return f"missing: {e}"
