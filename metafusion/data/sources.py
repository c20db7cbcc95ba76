"""The dataset registry's entries: name -> builder(DataConfig) -> MultimodalDataset, plus where each
expects its files (shown by `metafusion datasets`)."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import DataConfig
from . import DATASETS
from .dataset import DataError, MultimodalDataset
from .synthetic import make_synthetic

# Where each dataset looks under the data root, for `metafusion datasets` and error messages.
EXPECTED_FILES = {
    "synthetic": "(built in; no files)",
    "omniglot": "omniglot/images_background.zip, omniglot/images_evaluation.zip (or extracted folders)",
    "omniglot-strokes": "omniglot/images_background.zip + strokes_background*.zip (full or small1/small2)",
    "fsdd": "fsdd/recordings/{digit}_{speaker}_{index}.wav",
    "clinc150": "clinc150/data_full.json + clinc150/domains.json",
    "fashion": "fashion/styles.csv + fashion/images.zip (images/<id>.jpg)",
    "manifest": "a CSV/JSONL manifest or a root/<class>/<sample>.<ext> folder, given as data.root",
}


def require_root(cfg: DataConfig, sub: str) -> Path:
    if not cfg.root:
        raise DataError(
            f"dataset {cfg.dataset!r} needs a data root: set METAFUSION_DATA or data.root "
            f"(expects {EXPECTED_FILES[cfg.dataset]})"
        )
    path = Path(cfg.root) / sub if sub else Path(cfg.root)
    if not path.exists():
        raise DataError(
            f"dataset {cfg.dataset!r}: {path} does not exist (expects {EXPECTED_FILES[cfg.dataset]} "
            f"under the data root {cfg.root})"
        )
    return path


@DATASETS.register("synthetic")
def synthetic(cfg: DataConfig) -> MultimodalDataset:
    return make_synthetic(cfg.num_classes, cfg.samples_per_class, cfg.noise, cfg.missing_rate, seed=cfg.data_seed)


@DATASETS.register("omniglot")
def omniglot(cfg: DataConfig) -> MultimodalDataset:
    from .omniglot import omniglot as load

    if "strokes" in (cfg.modalities or []):
        raise DataError(
            "dataset 'omniglot' has images only; its pen strokes are dataset 'omniglot-strokes' (image, strokes)"
        )
    return load(require_root(cfg, ""), cfg.image_size, cfg.split, cfg.rotations, seed=cfg.data_seed)


@DATASETS.register("omniglot-strokes")
def omniglot_strokes(cfg: DataConfig) -> MultimodalDataset:
    from .omniglot import omniglot_strokes as load

    return load(require_root(cfg, ""), cfg.image_size, cfg.stroke_length, seed=cfg.data_seed)


@DATASETS.register("fsdd")
def fsdd(cfg: DataConfig) -> MultimodalDataset:
    from .fsdd import fsdd as load

    return load(require_root(cfg, ""))


@DATASETS.register("clinc150")
def clinc150(cfg: DataConfig) -> MultimodalDataset:
    from .clinc150 import clinc150 as load

    return load(require_root(cfg, ""), cfg.split, seed=cfg.data_seed)


@DATASETS.register("fashion")
def fashion(cfg: DataConfig) -> MultimodalDataset:
    from .fashion import fashion as load

    return load(require_root(cfg, ""), cfg.image_size, seed=cfg.data_seed)


@DATASETS.register("manifest")
def manifest(cfg: DataConfig) -> MultimodalDataset:
    from .manifest import load_user_data

    ds = load_user_data(
        require_root(cfg, ""), image_size=cfg.image_size, skip_errors=cfg.skip_unreadable, seed=cfg.data_seed
    )
    if ds.metadata["skipped"]:
        print(
            f"{cfg.root}: skipped {ds.metadata['skipped']} unreadable files (data.skip_unreadable=true); "
            f"those modalities are masked"
        )
    if not ds.splits:
        raise DataError(f"{cfg.root}: meta-training needs at least 5 classes to split into train/val/test")
    return ds


def check_files(name: str, root: Path) -> str:
    """A one-line verdict on whether dataset ``name``'s files are under ``root`` (counts verified)."""
    try:
        if name == "synthetic":
            return "ok (built in)"
        if name == "manifest":
            return "given per run as data.root (a manifest file or class folders)"
        if name == "clinc150":
            from .clinc150 import find_clinc150

            data = json.loads((find_clinc150(root) / "data_full.json").read_text())
            return f"ok: {sum(len(data.get(s, [])) for s in ('train', 'val', 'test'))} utterances"
        if name == "fashion":
            from .fashion import find_fashion, read_styles

            rows = read_styles(find_fashion(root))
            return f"ok: {len(rows)} products, {sum(r['has_image'] == '1' for r in rows)} with a photo"
        if name == "fsdd":
            from .fsdd import find_recordings

            n = len(list(find_recordings(root).glob("*_*_*.wav")))
            return f"ok: {n} recordings" + ("" if n == 3000 else " (upstream has 3000)")
        from .omniglot import EXPECTED_CHARACTERS, _members, character_of, find_omniglot_root

        base = find_omniglot_root(root)
        parts = []
        for split, expected in EXPECTED_CHARACTERS.items():
            keys = _members(base, f"images_{split}", ".png")
            chars = {character_of(k) for k in keys}
            ok = len(chars) == expected and len(keys) == 20 * expected
            parts.append(f"{split}: {len(chars)} characters, {len(keys)} images{'' if ok else ' (UNEXPECTED)'}")
        if name == "omniglot-strokes":
            from .omniglot import STROKE_SOURCES

            found = [s for s in STROKE_SOURCES if (base / f"{s}.zip").exists() or (base / s).is_dir()]
            parts.append("strokes: " + (", ".join(found) if found else "MISSING"))
        return "ok: " + "; ".join(parts)
    except DataError as e:
        return f"missing: {e}"
