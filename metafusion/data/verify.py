"""`metafusion datasets`: what each dataset is, where it expects its files, and whether they are there."""

from __future__ import annotations

from pathlib import Path

from ..config import default_data_root
from .sources import DATASETS, check_files


def describe_datasets(root: str | None = None) -> str:
    root = root or default_data_root()
    lines = [f"data root: {root or '(not set: export METAFUSION_DATA=/path/to/data)'}", ""]
    for name in DATASETS.names():
        status = check_files(name, Path(root)) if root else "data root not set"
        lines.append(f"{name:18s} {DATASETS.info(name).get('expects', '(no description)')}")
        lines.append(f"{'':18s} -> {status}")
    return "\n".join(lines)
