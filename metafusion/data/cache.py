"""Decode once, then only index: decoded datasets (Omniglot PNGs and strokes, FSDD wavs, frozen
text-encoder features) are saved as tensors under ``$METAFUSION_CACHE`` (default
``~/.cache/metafusion``), keyed by what they were made from, so a changed source file makes a new entry
instead of a stale hit. Writes are atomic (temporary file + rename): parallel runs can share the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from ..errors import warn


def cache_root() -> Path:
    return Path(os.environ.get("METAFUSION_CACHE", Path.home() / ".cache" / "metafusion"))


def files_key(paths: Iterable[Path], *extra: object) -> str:
    """A short hash of the files' names, sizes and modification times (and ``extra`` settings)."""
    h = hashlib.sha1()
    for p in paths:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    if extra:
        h.update(repr(extra).encode())
    return h.hexdigest()[:12]


def cached(relative: str, build: Callable[[], Any], valid: Callable[[Any], bool] = lambda value: True) -> Any:
    """``build()``'s result, loaded from ``cache_root()/relative`` when present and ``valid``, else built and
    saved. A cache that cannot be written (read-only, full) costs the saving, not the result: a warning."""
    path = cache_root() / relative
    if path.exists():
        try:
            value = torch.load(path, weights_only=True)
            if valid(value):
                return value
        except Exception:  # a truncated or foreign entry (a killed write, a disk fault): built again below
            pass
        with contextlib.suppress(OSError):  # a read-only cache keeps its bad entry; the value is built anyway
            path.unlink(missing_ok=True)
    value = build()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(value, tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        warn(f"cannot write the cache {path} ({e.strerror}); continuing without it (set METAFUSION_CACHE elsewhere)")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return value
