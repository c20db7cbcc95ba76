"""The dataset registry's entries: name -> builder(DataConfig) -> MultimodalDataset. Each entry also
says where it expects its files (``expects``) and, where it has files, how to verify them (``check``:
root -> a one-line verdict); `metafusion datasets` shows both."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import DataConfig
from . import DATASETS
from .dataset import DataError, MultimodalDataset
from .synthetic import make_synthetic


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


def _check_omniglot(root: Path, strokes: bool = False) -> str:
    from .omniglot import EXPECTED_CHARACTERS, STROKE_SOURCES, _members, character_of, find_omniglot_root

    base = find_omniglot_root(root)
    parts = []
    for split, expected in EXPECTED_CHARACTERS.items():
        keys = _members(base, f"images_{split}", ".png")
        chars = {character_of(k) for k in keys}
        ok = len(chars) == expected and len(keys) == 20 * expected
        parts.append(f"{split}: {len(chars)} characters, {len(keys)} images{'' if ok else ' (UNEXPECTED)'}")
    if strokes:
        found = [s for s in STROKE_SOURCES if (base / f"{s}.zip").exists() or (base / s).is_dir()]
        parts.append("strokes: " + (", ".join(found) if found else "MISSING"))
    return "ok: " + "; ".join(parts)


def _check_fsdd(root: Path) -> str:
    from .fsdd import find_recordings

    n = len(list(find_recordings(root).glob("*_*_*.wav")))
    return f"ok: {n} recordings" + ("" if n == 3000 else " (upstream has 3000)")


def _check_clinc150(root: Path) -> str:
    from .clinc150 import find_clinc150

    data = json.loads((find_clinc150(root) / "data_full.json").read_text())
    return f"ok: {sum(len(data.get(s, [])) for s in ('train', 'val', 'test'))} utterances"


def _check_fashion(root: Path) -> str:
    from .fashion import find_fashion, read_styles

    rows = read_styles(find_fashion(root))
    return f"ok: {len(rows)} products, {sum(r['has_image'] == '1' for r in rows)} with a photo"


@DATASETS.register("synthetic", expects="(built in; no files)", check=lambda root: "ok (built in)")
def synthetic(cfg: DataConfig) -> MultimodalDataset:
    return make_synthetic(cfg.num_classes, cfg.samples_per_class, cfg.noise, cfg.missing_rate, seed=cfg.data_seed)


@DATASETS.register(
    "omniglot",
    expects="omniglot/images_background.zip, omniglot/images_evaluation.zip (or extracted folders)",
    check=_check_omniglot,
)
def omniglot(cfg: DataConfig) -> MultimodalDataset:
    from .omniglot import omniglot as load

    if "strokes" in (cfg.modalities or []):
        raise DataError(
            "dataset 'omniglot' has images only; its pen strokes are dataset 'omniglot-strokes' (image, strokes)"
        )
    return load(require_root(cfg, ""), cfg.image_size, cfg.split, cfg.rotations, seed=cfg.data_seed)


@DATASETS.register(
    "omniglot-strokes",
    expects="omniglot/images_background.zip + strokes_background*.zip (full or small1/small2)",
    check=lambda root: _check_omniglot(root, strokes=True),
)
def omniglot_strokes(cfg: DataConfig) -> MultimodalDataset:
    from .omniglot import omniglot_strokes as load

    return load(require_root(cfg, ""), cfg.image_size, cfg.stroke_length, seed=cfg.data_seed)


@DATASETS.register("fsdd", expects="fsdd/recordings/{digit}_{speaker}_{index}.wav", check=_check_fsdd)
def fsdd(cfg: DataConfig) -> MultimodalDataset:
    from .fsdd import fsdd as load

    return load(require_root(cfg, ""))


@DATASETS.register("clinc150", expects="clinc150/data_full.json + clinc150/domains.json", check=_check_clinc150)
def clinc150(cfg: DataConfig) -> MultimodalDataset:
    from .clinc150 import clinc150 as load

    return load(require_root(cfg, ""), cfg.split, seed=cfg.data_seed)


@DATASETS.register("fashion", expects="fashion/styles.csv + fashion/images.zip (images/<id>.jpg)", check=_check_fashion)
def fashion(cfg: DataConfig) -> MultimodalDataset:
    from .fashion import fashion as load

    return load(require_root(cfg, ""), cfg.image_size, seed=cfg.data_seed)


@DATASETS.register(
    "manifest",
    expects="a CSV/JSONL manifest or a root/<class>/<sample>.<ext> folder, given as data.root",
    check=lambda root: "given per run as data.root (a manifest file or class folders)",
)
def manifest(cfg: DataConfig) -> MultimodalDataset:
    from .manifest import load_user_data

    ds = load_user_data(
        require_root(cfg, ""), image_size=cfg.image_size, skip_errors=cfg.skip_unreadable, seed=cfg.data_seed
    )
    if not ds.splits:
        raise DataError(f"{cfg.root}: meta-training needs at least 5 classes to split into train/val/test")
    return ds
