"""Bring your own data: a CSV/JSONL manifest, or a folder ``root/<class>/<sample>.<ext>``.

Manifest: one row per sample, a ``label`` column plus one column per modality holding a file path
(relative to the manifest's folder) or, for ``text``, inline text. An empty cell means that modality is
missing for that sample. Folder: files with the same stem in a class folder are one sample; the
extension picks the modality: png/jpg/jpeg -> image, wav/flac -> audio, txt -> text, npy/csv -> sequence
(2-D, ``[T, C]``) or tabular (1-D). A missing file masks that modality for that sample. A corrupt or
unreadable file is an error naming the file and the reason, unless ``skip_errors=True``: then that
modality is masked for that sample and the count is reported in ``metadata["skipped"]``.
See docs/datasets.md for the format and tests/data/tiny_manifest for an example.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from .dataset import DataError, MultimodalDataset, split_classes
from .fsdd import read_wav

EXTENSIONS = {
    ".png": "image",
    ".jpg": "image",
    ".jpeg": "image",
    ".wav": "audio",
    ".flac": "audio",
    ".txt": "text",
    ".npy": "array",
    ".csv": "array",
}
MODALITY_ORDER = ("image", "audio", "text", "sequence", "tabular")


def tokenize(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def token_ids(texts: list[str], length: int, vocabulary: list[str] | None = None) -> tuple[Tensor, list[str]]:
    """Texts -> token ids ``[N, length]`` (0 = padding; words outside ``vocabulary`` dropped) and the
    vocabulary (``["<pad>", *sorted words of texts]`` when none is given)."""
    vocab = vocabulary or ["<pad>"] + sorted({w for t in texts for w in tokenize(t)})
    index = {w: i for i, w in enumerate(vocab)}
    ids = torch.zeros(len(texts), length, dtype=torch.long)
    for i, t in enumerate(texts):
        tok = [index[w] for w in tokenize(t) if w in index][:length]
        ids[i, : len(tok)] = torch.tensor(tok, dtype=torch.long)
    return ids, vocab


def _read_array(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    return np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=1)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a name too long for the file system: inline text, not a path
        return False


def _read(modality: str, value: str | Path, base: Path, opts: dict[str, Any], column: str | None = None) -> Any:
    """One cell -> a numpy array (or text). Raises DataError naming the file (and the manifest column)
    on failure, non-finite values (NaN, inf) included."""
    if modality == "text":
        path = base / str(value)
        if str(value).endswith(".txt") or _is_file(path):
            return path.read_text(encoding="utf-8")
        return str(value)  # inline text
    path = base / str(value)
    if not _is_file(path):
        raise FileNotFoundError(path)
    what = column or modality
    try:
        if modality == "image":
            size = opts["image_size"]
            img = Image.open(path).convert("L").resize((size, size), resample=Image.LANCZOS)
            array = np.asarray(img, dtype=np.float32)[None] / 255.0
        elif modality == "audio":
            array = read_wav(path, opts["audio_length"])[None]
        else:
            array = np.asarray(_read_array(path), dtype=np.float32)
    except (OSError, ValueError, UnidentifiedImageError, DataError) as e:
        raise DataError(f"cannot read {path} as {what}: {e}") from None
    bad = int(array.size - np.isfinite(array).sum())
    if bad:
        raise DataError(
            f"{path} ({what}) holds {bad} non-finite values (NaN or inf); fix the file, or set "
            f"data.skip_unreadable=true to mask it"
        )
    return array


def _rows_from_manifest(path: Path) -> list[dict[str, str]]:
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i}: not valid JSON ({e})") from None
    elif path.suffix == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        raise DataError(f"{path}: a manifest must be .csv or .jsonl")
    if not rows:
        raise DataError(f"{path}: manifest has no rows")
    if "label" not in rows[0]:
        raise DataError(f"{path}: manifest needs a 'label' column (columns: {', '.join(rows[0])})")
    return rows


def _rows_from_folder(root: Path) -> list[dict[str, str]]:
    rows: dict[tuple[str, str], dict[str, str]] = {}
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(class_dir.iterdir()):
            kind = EXTENSIONS.get(f.suffix.lower())
            if kind is None or not f.is_file():
                continue
            row = rows.setdefault((class_dir.name, f.stem), {"label": class_dir.name})
            row[kind] = str(f.relative_to(root))
    if not rows:
        raise DataError(f"{root}: no samples found (expected {root}/<class>/<sample>.<png|wav|txt|npy|csv>)")
    return list(rows.values())


def load_user_data(
    path: str | Path,
    modalities: tuple[str, ...] | None = None,
    like: MultimodalDataset | None = None,
    image_size: int = 28,
    seconds: float = 1.0,
    sample_rate: int = 8000,
    text_length: int = 32,
    skip_errors: bool = False,
    seed: int = 0,
) -> MultimodalDataset:
    """Load a manifest file or a class-folder tree as a MultimodalDataset.

    ``like``: a dataset whose shapes and vocabulary must be matched (e.g. the one a model was
    meta-trained on, when fine-tuning on the user's task).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"no such manifest or folder: {path}")
    rows = _rows_from_folder(path) if path.is_dir() else _rows_from_manifest(path)
    base = path if path.is_dir() else path.parent
    columns = (
        [c for c in rows[0] if c != "label"]
        if not path.is_dir()
        else sorted({k for r in rows for k in r if k != "label"})
    )
    opts = {"image_size": image_size, "audio_length": int(seconds * sample_rate)}
    if like is not None:
        if "image" in like.data:
            opts["image_size"] = like.data["image"].shape[-1]
        if "audio" in like.data:
            opts["audio_length"] = like.data["audio"].shape[-1]
    raw: dict[str, list[Any]] = {c: [] for c in columns}
    skipped = 0
    for row in rows:
        for c in columns:
            value = row.get(c)
            reader = c if c in ("image", "audio", "text") else "array"
            if value in (None, ""):
                raw[c].append(None)
                continue
            try:
                raw[c].append(_read(reader, value, base, opts, column=c))
            except FileNotFoundError:
                raw[c].append(None)  # a missing file masks that modality for that sample
            except DataError:
                if not skip_errors:
                    raise
                skipped += 1
                raw[c].append(None)
    # Folder layout: arrays become "sequence" (2-D) or "tabular" (1-D).
    if "array" in raw:
        arrays = raw.pop("array")
        dims = {a.ndim for a in arrays if a is not None}
        if len(dims) > 1:
            raise DataError(f"{path}: .npy/.csv files mix 1-D and 2-D arrays; keep one shape per dataset")
        raw["sequence" if dims == {2} else "tabular"] = arrays
    names = sorted({str(r["label"]) for r in rows})
    targets = torch.tensor([names.index(str(r["label"])) for r in rows])
    wanted = modalities or tuple(m for m in MODALITY_ORDER if m in raw) + tuple(
        m for m in raw if m not in MODALITY_ORDER
    )
    missing = [m for m in wanted if m not in raw]
    if missing:
        raise DataError(f"{path} has no {', '.join(missing)} data (it has: {', '.join(raw)})")
    data, present, metadata = {}, [], {"class_names": names, "skipped": skipped, "sample_rate": sample_rate}
    for m in wanted:
        values = raw[m]
        present.append(torch.tensor([v is not None for v in values]))
        if m == "text":
            texts = [v or "" for v in values]
            vocab = like.metadata.get("vocabulary") if like is not None else None
            ids = like.data.get("text") if like is not None else None
            length = ids.shape[-1] if ids is not None and not ids.is_floating_point() else text_length
            data[m], metadata["vocabulary"] = token_ids(texts, length, vocab)
            metadata["texts"] = texts
        else:
            data[m] = _stack(values, m, path, like.data[m].shape[1:] if like is not None and m in like.data else None)
    present_t = torch.stack(present, 1) if present else torch.zeros(len(rows), 0, dtype=torch.bool)
    empty = ~present_t.any(1)
    if empty.any():
        raise DataError(
            f"{path}: {int(empty.sum())} samples have no readable modality "
            f"(first: label {rows[int(torch.nonzero(empty)[0])]['label']!r})"
        )
    splits = split_classes(list(range(len(names))), (0.6, 0.2, 0.2), seed) if len(names) >= 5 else {}
    return MultimodalDataset(data, present_t, targets, tuple(wanted), splits, metadata, path.name)


def _stack(values: list[np.ndarray | None], modality: str, path: Path, shape: tuple | None) -> Tensor:
    arrays = [v for v in values if v is not None]
    if not arrays:
        raise DataError(f"{path}: modality {modality!r} has no readable sample")
    if shape is None:
        shape = arrays[0].shape
        if modality == "sequence":  # pad/trim sequences to the longest one
            shape = (max(a.shape[0] for a in arrays), *arrays[0].shape[1:])
    out = torch.zeros(len(values), *shape)
    for i, v in enumerate(values):
        if v is None:
            continue
        if modality == "sequence":
            if v.shape[1:] != tuple(shape[1:]):
                raise DataError(f"{path}: sample {i} of {modality!r} has {v.shape[1]} channels, expected {shape[1]}")
            t = min(v.shape[0], shape[0])
            out[i, :t] = torch.from_numpy(v[:t])
        elif tuple(v.shape) != tuple(shape):
            raise DataError(f"{path}: sample {i} of {modality!r} has shape {tuple(v.shape)}, expected {tuple(shape)}")
        else:
            out[i] = torch.from_numpy(v)
    return out
