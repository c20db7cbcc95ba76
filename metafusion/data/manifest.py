"""Bring your own data: a CSV/JSONL manifest, or a folder ``root/<class>/<sample>.<ext>``.

Manifest: one row per sample, a ``label`` column plus one column per modality holding a file path
(relative to the manifest's folder) or, for ``text``, inline text. An empty cell means that modality is
missing for that sample. Optional columns: ``split`` (``train`` / ``val`` / ``test``: the class split,
instead of the seeded 60/20/20 one) and ``id`` (names the sample in predictions).
Folder: files with the same stem in a class folder are one sample; the extension picks the modality:
png/jpg/jpeg -> image, mp4/avi/mov/mkv/webm/gif -> video (``video.read_video``: ``video_frames`` frames,
``video_size`` pixels a side, colour), wav/flac -> audio, txt -> text, npy/csv -> sequence (2-D, ``[T, C]``)
or tabular (1-D). ``root/{train,val,test}/<class>/...`` gives the class split; files directly in ``root`` are
unlabelled samples (for ``predict``). A missing file masks that modality for that sample. A corrupt or
unreadable file is an error naming the file and the reason, unless ``skip_errors=True``: then that
modality is masked for that sample and the count is reported in ``metadata["skipped"]``.
See docs/datasets.md for the format and tests/data/tiny_manifest.csv for an example.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..config import DataConfig
from ..errors import ConfigError, warn
from .dataset import DataError, MultimodalDataset, split_classes
from .fsdd import read_wav
from .images import check_image_size, read_image
from .input_format import TEXT_LENGTH, InputFormat
from .sources import DATASETS, require_root
from .video import VIDEO_EXTENSIONS, read_video

EXTENSIONS = {
    ".png": "image",
    ".jpg": "image",
    ".jpeg": "image",
    ".wav": "audio",
    ".flac": "audio",
    ".txt": "text",
    ".npy": "array",
    ".csv": "array",
    **{ext: "video" for ext in VIDEO_EXTENSIONS},
}
MODALITY_ORDER = ("image", "video", "audio", "text", "sequence", "tabular")
RESERVED_COLUMNS = ("label", "split", "id")  # manifest columns that are not modalities
SPLITS = ("train", "val", "test")


# Scripts written without spaces between words (Chinese, Japanese kana and kanji): one token per character.
_UNSPACED = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN = re.compile(rf"[{_UNSPACED}]|(?:[^\W_{_UNSPACED}]|')+")


def tokenize(text: str) -> list[str]:
    """Lower-cased words of any script (letters and digits, apostrophes kept inside), and single characters
    of scripts written without spaces."""
    return _TOKEN.findall(text.lower())


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
    if path.suffix != ".npy":
        return np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=1)
    array = np.load(path, allow_pickle=False)
    if np.iscomplexobj(array):
        raise DataError(f"{path} holds complex numbers; save their real and imaginary parts as two channels")
    if array.dtype.kind not in "biuf":  # datetimes, strings, records: not numbers a model reads
        raise DataError(f"{path} holds {array.dtype} values, not numbers; save a numeric array")
    return array


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a name too long for the file system: inline text, not a path
        return False


def _why_not_a_file(path: Path) -> str:
    if path.is_symlink() and not path.exists():
        return "a broken link or a link loop"
    if path.is_dir():
        return "a folder"
    return "does not exist"


class _NotAFile(Exception):
    """A cell names a file that is not there (the sample then lacks that modality)."""


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None


def _read(modality: str, value: str | Path, base: Path, opts: dict[str, Any], column: str | None = None) -> Any:
    """One cell -> a numpy array (or text). Raises ``_NotAFile`` where the cell names no file, and
    DataError naming the file (and the manifest column) where it cannot be read, non-finite values (NaN,
    inf) included."""
    path = base / str(value)
    if modality == "text":
        if _is_file(path):
            return _read_text(path)
        if str(value).endswith(".txt"):
            raise _NotAFile(path)
        return str(value)  # inline text
    if not _is_file(path):
        raise _NotAFile(path)
    what = column or modality
    if modality == "image":
        array = read_image(path, opts["image_channels"], opts["image_size"])
    elif modality == "video":
        array = read_video(path, opts["video_frames"], opts["video_size"], opts["video_channels"], opts["frame_rate"])
    else:
        try:
            if modality == "audio":
                array = read_wav(path, opts["audio_length"], opts["sample_rate"])[None]
            else:
                values = _read_array(path)
                big = np.isfinite(values) & (np.abs(values) > np.finfo(np.float32).max)
                if big.any():
                    raise DataError(f"{int(big.sum())} values beyond float32's range (±3.4e38): {values[big][0]:g}")
                array = np.asarray(values, dtype=np.float32)
        except (OSError, ValueError, DataError) as e:
            raise DataError(f"cannot read {path} as {what}: {e}") from None
    bad = int(array.size - np.isfinite(array).sum())
    if bad:
        raise DataError(
            f"{path} ({what}) holds {bad} non-finite values (NaN or inf); fix the file, or set "
            f"data.skip_unreadable=true to mask it"
        )
    return array


def _rows_from_manifest(path: Path, labelled: bool) -> list[dict[str, str]]:
    if path.suffix not in (".csv", ".jsonl"):
        raise DataError(f"{path}: a manifest must be .csv or .jsonl (or give a folder of class folders)")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Excel's UTF-8 CSV) is not a column name
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}); save the manifest as UTF-8") from None
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line, object_pairs_hook=partial(_unique_keys, f"{path}:{i}"))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i}: not valid JSON ({e})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{i}: expected a JSON object (column -> value), got {type(row).__name__}")
                rows.append({str(k): "" if v is None else str(v) for k, v in row.items()})
    else:
        try:
            reader = csv.DictReader(io.StringIO(text, newline=""))
            header = reader.fieldnames or []
            if len(header) == 1 and any(sep in header[0] for sep in ";\t|"):
                sep = next(sep for sep in ";\t|" if sep in header[0])
                raise DataError(f"{path}:1: the header is separated by {sep!r}, not commas; save a comma-separated CSV")
            _unique_keys(f"{path}:1", [(name, None) for name in header])
            rows = list(reader)
        except csv.Error as e:
            raise DataError(f"{path}: not a valid CSV file ({e})") from None
        short = next((i for i, r in enumerate(rows, 2) if None in r.values() or None in r), None)
        if short is not None:
            raise DataError(f"{path}:{short}: the row has another number of cells than the header")
    if not rows:
        raise DataError(f"{path}: manifest has no rows")
    if labelled and "label" not in rows[0]:
        raise DataError(f"{path}: manifest needs a 'label' column (columns: {', '.join(rows[0])})")
    return rows


def _unique_keys(where: str, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``dict(pairs)``, or a DataError where a column is named twice (the last would silently win)."""
    names = [k for k, _ in pairs]
    twice = sorted({k for k in names if names.count(k) > 1})
    if twice:
        raise DataError(f"{where}: column {', '.join(map(repr, twice))} appears twice; name each column once")
    return dict(pairs)


def _rows_from_folder(root: Path) -> list[dict[str, str]]:
    """Samples of ``root/<class>/``, of ``root/{train,val,test}/<class>/`` (with their split), or, for
    files directly in ``root``, unlabelled samples."""
    rows: dict[tuple[str, str], dict[str, str]] = {}

    def add(folder: Path, **fields: str) -> None:
        samples = 0
        for f in sorted(folder.iterdir()):
            kind = EXTENSIONS.get(f.suffix.lower())
            if kind is not None and f.is_file():
                row = rows.setdefault((str(folder), f.stem), {**fields, "id": str(f.relative_to(root).with_suffix(""))})
                row[kind] = str(f.relative_to(root))
                samples += 1
        nested = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if fields and not samples and nested:  # a class whose files sit one level too deep
            warn(
                f"{folder}: class {fields['label']!r} has no sample files, only subfolders ({', '.join(nested[:3])}); "
                f"put its files directly in {folder}/ (it is left out)"
            )

    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if folders and all(p.name in SPLITS for p in folders):
        for split_dir in folders:
            for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
                add(class_dir, label=class_dir.name, split=split_dir.name)
    else:
        for class_dir in folders:
            add(class_dir, label=class_dir.name)
        add(root)  # files directly in root: samples without a label
    if not rows:
        raise DataError(f"{root}: no samples found (expected {root}/<class>/<sample>.<png|mp4|wav|txt|npy|csv>)")
    return list(rows.values())


def _splits_of(rows: list[dict[str, str]], names: list[str], path: Path) -> dict[str, list[int]] | None:
    """The class split a ``split`` column (or split folders) gives, None where there is none."""
    if not any(r.get("split") for r in rows):
        return None
    where: dict[str, str] = {}
    for i, r in enumerate(rows, 1):
        split, label = (r.get("split") or "").strip(), str(r["label"])
        if split not in SPLITS:
            raise DataError(f"{path}: row {i} ({label!r}) has split {split!r}; use one of: {', '.join(SPLITS)}")
        if where.setdefault(label, split) != split:
            raise DataError(f"{path}: class {label!r} is in both the {where[label]!r} and {split!r} splits")
    return {s: sorted(names.index(c) for c, w in where.items() if w == s) for s in SPLITS}


def load_user_data(
    path: str | Path,
    modalities: tuple[str, ...] | None = None,
    like: MultimodalDataset | InputFormat | None = None,
    image_size: int = 28,
    seconds: float = 1.0,
    sample_rate: int = 8000,
    text_length: int = TEXT_LENGTH,
    skip_errors: bool = False,
    seed: int = 0,
    labelled: bool = True,
    video_frames: int = 8,
    video_size: int = 64,
    frame_rate: float | None = None,
) -> MultimodalDataset:
    """Load a manifest file or a folder tree as a MultimodalDataset.

    ``like``: the input format (or a dataset of it) to match: image size and channels, audio length,
    text vocabulary, video frames and their sampling (e.g. the model's, when fine-tuning on or predicting a
    user's files). Video: ``video_frames`` frames of ``video_size`` pixels a side, spread uniformly over each
    clip, or at ``frame_rate`` frames per second from its start. With ``like``,
    a modality the files lack entirely is masked for every sample (``metadata["absent"]`` names it),
    and columns that are not among ``modalities`` are left unread (``metadata["ignored"]``).
    ``labelled=False``: labels are optional (``targets`` -1 where none; ``dataset.labelled`` says).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"no such manifest or folder: {path}")
    fmt = InputFormat.of(like) if isinstance(like, MultimodalDataset) else like
    rows = _rows_from_folder(path) if path.is_dir() else _rows_from_manifest(path, labelled)
    base = path if path.is_dir() else path.parent
    # A manifest's columns in its order; a folder's modalities (file kinds) in name order.
    keys = rows[0] if not path.is_dir() else sorted({k for r in rows for k in r})
    found = [c for c in keys if c not in RESERVED_COLUMNS]
    has_label = [bool(str(r.get("label") or "").strip()) for r in rows]
    if not all(has_label) and (labelled or any(has_label)):
        i = has_label.index(False)
        raise DataError(f"{path}: sample {i + 1} ({_sample_id(rows[i], i)}) has no label; label every sample or none")
    ignored = [c for c in found if fmt is not None and modalities and c not in modalities and c != "array"]
    columns = [c for c in found if c not in ignored]
    rate = fmt.sample_rate if fmt is not None else sample_rate
    opts = {"image_size": image_size, "image_channels": 1, "audio_length": int(seconds * rate), "sample_rate": rate}
    opts |= {"video_frames": video_frames, "video_size": video_size, "video_channels": 3, "frame_rate": frame_rate}
    opts |= _format_options(fmt)
    raw, skipped = _read_cells(path, rows, columns, opts, skip_errors)
    _warn_duplicates(path, rows, columns)
    labelled_rows = all(has_label)
    names = sorted({str(r["label"]) for r in rows}) if labelled_rows else []
    targets = torch.tensor([names.index(str(r["label"])) if labelled_rows else -1 for r in rows])
    wanted = modalities or tuple(m for m in MODALITY_ORDER if m in raw) + tuple(
        m for m in raw if m not in MODALITY_ORDER
    )
    missing = [m for m in wanted if m not in raw]
    if missing and fmt is None:
        raise DataError(f"{path} has no {', '.join(missing)} data (it has: {', '.join(raw) or 'no modality'})")
    for m in missing:  # matching a model's format: a modality the files lack is masked everywhere
        warn(f"{path} has no {m} data; the model sees {m} as missing for every sample")
        raw[m] = [None] * len(rows)
    metadata = {
        "class_names": names,
        "skipped": skipped,
        "sample_rate": rate,
        "frame_rate": opts["frame_rate"],
        "ids": [_sample_id(r, i) for i, r in enumerate(rows)],
        "absent": missing,
        "ignored": [c for c in ignored + [c for c in raw if c not in wanted] if c != "array"],
        "files": sorted(
            {str((base / r[c]).resolve()) for r in rows for c in columns if r.get(c) and _is_file(base / r[c])}
        ),
    }
    for c in metadata["ignored"]:
        warn(f"{path}: column {c!r} ignored: the model takes {', '.join(wanted)}")
    data, present = {}, []
    for m in wanted:
        present.append(torch.tensor([v is not None for v in raw[m]]))
        if m == "text":
            texts = [v or "" for v in raw[m]]
            length = fmt.text_length if fmt is not None else text_length
            data[m], metadata["vocabulary"] = token_ids(texts, length, fmt.vocabulary if fmt is not None else None)
            metadata["texts"] = texts
        else:
            data[m] = _stack(raw[m], m, path, fmt.shapes.get(m) if fmt is not None else None, metadata["ids"])
    present_t = torch.stack(present, 1) if present else torch.zeros(len(rows), 0, dtype=torch.bool)
    empty = ~present_t.any(1)
    if empty.any():
        first = int(torch.nonzero(empty)[0])
        raise DataError(
            f"{path}: {int(empty.sum())} samples have no readable modality among {', '.join(wanted)} "
            f"(first: {_sample_id(rows[first], first)})"
        )
    splits = _splits_of(rows, names, path) if labelled_rows else None
    if splits is None:
        splits = split_classes(list(range(len(names))), (0.6, 0.2, 0.2), seed) if len(names) >= 5 else {}
    return MultimodalDataset(data, present_t, targets, tuple(wanted), splits, metadata, path.name)


def _format_options(fmt: InputFormat | None) -> dict[str, Any]:
    """The readers' options a model's input format fixes (image size and channels, video frames and their
    sampling, audio length)."""
    if fmt is None:
        return {}
    opts: dict[str, Any] = {}
    if "image" in fmt.shapes:
        opts["image_channels"], opts["image_size"] = fmt.shapes["image"][0], fmt.shapes["image"][-1]
    if "video" in fmt.shapes:
        opts["video_frames"], opts["video_channels"], _, opts["video_size"] = fmt.shapes["video"]
        opts["frame_rate"] = fmt.frame_rate
    if "audio" in fmt.shapes:
        opts["audio_length"] = fmt.shapes["audio"][-1]
    return opts


def _read_cells(
    path: Path, rows: list[dict[str, str]], columns: list[str], opts: dict[str, Any], skip_errors: bool
) -> tuple[dict[str, list[Any]], int]:
    """Every cell of ``columns`` read (None where empty, naming no file, or unreadable and skipped), per
    modality (a folder's arrays split into sequence or tabular), and how many unreadable files were skipped."""
    base = path if path.is_dir() else path.parent
    raw: dict[str, list[Any]] = {c: [] for c in columns}
    skipped = 0
    not_files: dict[str, list[tuple[int, Path]]] = {c: [] for c in columns}  # cells naming no file
    for i, row in enumerate(rows):
        for c in columns:
            value = row.get(c)
            if value in (None, ""):
                raw[c].append(None)
                continue
            try:
                reader = c if c in ("image", "video", "audio", "text") else "array"
                raw[c].append(_read(reader, value, base, opts, column=c))
            except _NotAFile as e:
                raw[c].append(None)
                not_files[c].append((i, e.args[0]))
            except DataError:
                if not skip_errors:
                    raise
                skipped += 1
                raw[c].append(None)
    _check_paths(path, rows, not_files)
    if skipped:
        warn(f"{path}: skipped {skipped} unreadable files (skip_unreadable); those samples lack that modality")
    if "array" in raw:  # folder layout: arrays become "sequence" (2-D) or "tabular" (1-D)
        arrays = raw.pop("array")
        dims = {a.ndim for a in arrays if a is not None}
        if len(dims) > 1:
            raise DataError(f"{path}: .npy/.csv files mix 1-D and 2-D arrays; keep one shape per dataset")
        raw["sequence" if dims == {2} else "tabular"] = arrays
    return raw, skipped


def _check_paths(path: Path, rows: list[dict[str, str]], not_files: dict[str, list[tuple[int, Path]]]) -> None:
    """A column whose every path names no file is an error (a wrong column or base folder, not missing
    data); a few such paths are a warning with the count and the first one."""
    for column, bad in not_files.items():
        if not bad:
            continue
        given = sum(1 for r in rows if r.get(column) not in (None, ""))
        i, first = bad[0]
        example = f"first: {first}, {_why_not_a_file(first)} (sample {_sample_id(rows[i], i)})"
        if len(bad) == given:
            raise DataError(
                f"{path}: none of the {given} {column!r} paths is a file ({example}); paths are relative to "
                f"{path if path.is_dir() else path.parent}"
            )
        warn(f"{path}: {len(bad)} of {given} {column!r} paths are not files ({example}); those samples lack {column}")


def _warn_duplicates(path: Path, rows: list[dict[str, str]], columns: list[str]) -> None:
    """Rows with the same files and text as an earlier row: one sample counted twice (it can land in a
    task's support and query set at once, which inflates accuracy)."""
    seen: dict[tuple, int] = {}
    duplicates = []
    for i, row in enumerate(rows):
        key = tuple(row.get(c) or "" for c in columns)
        if any(key):
            if key in seen:
                duplicates.append((i, seen[key]))
            seen.setdefault(key, i)
    if duplicates:
        i, j = duplicates[0]
        warn(
            f"{path}: {len(duplicates)} samples repeat an earlier one's files and text (first: "
            f"{_sample_id(rows[i], i)} = {_sample_id(rows[j], j)}); a repeat can be support and query of one task"
        )


def _sample_id(row: dict[str, str], i: int) -> str:
    """The sample's name in messages and predictions: its ``id``, else its first file, else its row."""
    if row.get("id"):
        return str(row["id"])
    files = [v for k, v in row.items() if k not in RESERVED_COLUMNS and k != "text" and v]
    return str(files[0]) if files else f"row {i + 1}"


def _stack(values: list[np.ndarray | None], modality: str, path: Path, shape: tuple | None, ids: list[str]) -> Tensor:
    arrays = [v for v in values if v is not None]
    if not arrays and shape is None:
        raise DataError(f"{path}: modality {modality!r} has no readable sample")
    dims = Counter(a.ndim for a in arrays)
    if len(dims) > 1:
        common = dims.most_common(1)[0][0]
        odd = next(i for i, v in enumerate(values) if v is not None and v.ndim != common)
        raise DataError(
            f"{path}: {modality} mixes {' and '.join(f'{d}-D' for d in sorted(dims))} arrays (sample {ids[odd]} is "
            f"{values[odd].ndim}-D); keep one shape per modality"
        )
    if shape is None:
        shape = Counter(a.shape for a in arrays).most_common(1)[0][0]  # the odd sample out is the one named
        if modality == "sequence":  # pad/trim sequences to the longest one
            shape = (max(a.shape[0] for a in arrays), *arrays[0].shape[1:])
    out = torch.zeros(len(values), *shape)
    for i, v in enumerate(values):
        if v is None:
            continue
        if modality == "sequence":
            if v.shape[1:] != tuple(shape[1:]):
                raise DataError(f"{path}: sample {ids[i]} ({modality}) has {v.shape[1]} channels, expected {shape[1]}")
            t = min(v.shape[0], shape[0])
            out[i, :t] = torch.from_numpy(v[:t])
        elif tuple(v.shape) != tuple(shape):
            raise DataError(f"{path}: sample {ids[i]} ({modality}) has shape {tuple(v.shape)}, expected {tuple(shape)}")
        else:
            out[i] = torch.from_numpy(v)
    return out


@dataclass
class ManifestOptions:
    image_size: int = 28  # images are resized to this
    skip_unreadable: bool = False  # mask corrupt files (and count them) instead of failing
    video_frames: int = 8  # frames sampled from each clip
    video_size: int = 64  # video frames are resized to this
    frame_rate: float | None = None  # sample frames at this rate from a clip's start (None: spread over the clip)

    def __post_init__(self) -> None:
        check_image_size(self.image_size)
        if self.video_frames < 1 or self.video_size < 8 or (self.frame_rate is not None and not self.frame_rate > 0):
            raise ConfigError(
                f"manifest data needs data.video_frames >= 1, data.video_size >= 8 and data.frame_rate > 0 or null "
                f"(got {self.video_frames}, {self.video_size}, {self.frame_rate})"
            )


@DATASETS.register(
    "manifest",
    options=ManifestOptions,
    expects="a CSV/JSONL manifest or a root/<class>/<sample>.<ext> folder, given as data.root",
    check=lambda root: "given per run as data.root (a manifest file or class folders)",
)
def manifest(cfg: DataConfig, opts: ManifestOptions) -> MultimodalDataset:
    ds = load_user_data(
        require_root(cfg, ""),
        image_size=opts.image_size,
        skip_errors=opts.skip_unreadable,
        seed=cfg.data_seed,
        video_frames=opts.video_frames,
        video_size=opts.video_size,
        frame_rate=opts.frame_rate,
    )
    if not ds.splits:
        raise DataError(f"{cfg.root}: meta-training needs at least 5 classes to split into train/val/test")
    return ds
