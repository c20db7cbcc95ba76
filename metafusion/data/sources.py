"""The dataset registry and its entries: name -> builder(DataConfig, options) -> MultimodalDataset.

Each entry says where it expects its files (``expects``), where it has files how to verify them
(``check``: root -> a one-line verdict; `metafusion datasets` shows both), and which options of its own
it takes (``options``: a dataclass; ``data.<key>`` in a config sets them, checked when it is resolved).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Literal

from ..config import DataConfig, NoOptions
from ..errors import ConfigError
from ..registry import Registry
from .dataset import DataError, MultimodalDataset
from .synthetic import make_synthetic

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


def _load(module: str, function: str, cfg: DataConfig, opts) -> MultimodalDataset:
    """``module.function(root, **options, seed=data_seed)``, its module imported only when the dataset is used."""
    load = getattr(importlib.import_module(f".{module}", __package__), function)
    return load(require_root(cfg, ""), **asdict(opts), seed=cfg.data_seed)


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


@dataclass
class SyntheticOptions:
    num_classes: int = 300
    samples_per_class: int = 20
    noise: float = 1.0  # scales every modality's noise
    nuisance: float = 0.0  # variation without class information that raw inputs cannot see past (0 to 1)
    prototypes: int | None = None  # per modality, shared by num_classes / prototypes classes (None: num_classes // 10)

    def __post_init__(self) -> None:
        if (
            self.num_classes < 10
            or self.samples_per_class < 1
            or not self.noise >= 0
            or not 0 <= self.nuisance <= 1
            or (self.prototypes or 2) < 2
        ):
            raise ConfigError(
                f"synthetic data needs data.num_classes >= 10, data.samples_per_class >= 1, data.noise >= 0 and "
                f"0 <= data.nuisance <= 1, data.prototypes >= 2 (got {self.num_classes}, {self.samples_per_class}, "
                f"{self.noise}, {self.nuisance}, {self.prototypes})"
            )


@DATASETS.register("synthetic", options=SyntheticOptions, expects="(built in; no files)", check=lambda root: "ok")
def synthetic(cfg: DataConfig, opts: SyntheticOptions) -> MultimodalDataset:
    return make_synthetic(
        opts.num_classes, opts.samples_per_class, opts.noise, opts.nuisance, opts.prototypes, seed=cfg.data_seed
    )


@dataclass
class OmniglotOptions:
    image_size: int = 28
    split: Literal["protocol", "background"] = "protocol"  # 1100/100/423 characters, or Lake's background/eval
    rotations: bool = False  # 90/180/270 degree rotations as new classes (the MAML protocol)


@DATASETS.register(
    "omniglot",
    options=OmniglotOptions,
    expects="omniglot/images_background.zip, omniglot/images_evaluation.zip (or extracted folders)",
    check=_check_omniglot,
)
def omniglot(cfg: DataConfig, opts: OmniglotOptions) -> MultimodalDataset:
    from .omniglot import omniglot as load

    if "strokes" in (cfg.modalities or []):
        raise DataError(
            "dataset 'omniglot' has images only; its pen strokes are dataset 'omniglot-strokes' (image, strokes)"
        )
    return load(require_root(cfg, ""), opts.image_size, opts.split, opts.rotations, seed=cfg.data_seed)


@dataclass
class OmniglotStrokesOptions:
    image_size: int = 28
    stroke_length: int = 64  # resampled (dx, dy, pen_up) steps
    video_frames: int = 0  # > 0: the drawings rendered as videos of this many frames (modality video)
    frame_order: Literal["recorded", "shuffled"] = "recorded"  # shuffled: each video's frames permuted

    def __post_init__(self) -> None:
        if not 0 <= self.video_frames <= 64:
            raise ConfigError(f"data.video_frames takes 0 (no video) to 64 (got {self.video_frames})")


@DATASETS.register("fsdd", expects="fsdd/recordings/{digit}_{speaker}_{index}.wav", check=_check_fsdd)
def fsdd(cfg: DataConfig, opts: NoOptions) -> MultimodalDataset:
    from .fsdd import fsdd as load

    return load(require_root(cfg, ""))


@dataclass
class Clinc150Options:
    # intents shuffled with data_seed, 90/30/30; or cross-domain: the 10 domains, 6/2/2 (test intents come
    # from domains never seen in meta-training)
    split: Literal["protocol", "cross-domain"] = "protocol"


@dataclass
class FashionOptions:
    image_size: int = 28  # the photos (60x80) are padded to a square and resized to this


# Datasets a loader of their own module reads from files (imported only when the dataset is used): name ->
# (module, loader, options, the files expected, a check of them). The loader is
# ``loader(root, **options, seed=data.data_seed)``.
_FROM_FILES = {
    "omniglot-strokes": (
        "omniglot",
        "omniglot_strokes",
        OmniglotStrokesOptions,
        "omniglot/images_background.zip + strokes_background*.zip (full or small1/small2); video rendered from strokes",
        lambda root: _check_omniglot(root, strokes=True),
    ),
    "clinc150": (
        "clinc150",
        "clinc150",
        Clinc150Options,
        "clinc150/data_full.json + clinc150/domains.json",
        _check_clinc150,
    ),
    "fashion": (
        "fashion",
        "fashion",
        FashionOptions,
        "fashion/styles.csv + fashion/images.zip (images/<id>.jpg)",
        _check_fashion,
    ),
}
for _name, (_module, _loader, _options, _expects, _check) in _FROM_FILES.items():
    DATASETS.register(_name, options=_options, expects=_expects, check=_check)(partial(_load, _module, _loader))


@dataclass
class ManifestOptions:
    image_size: int = 28  # images are resized to this
    skip_unreadable: bool = False  # mask corrupt files (and count them) instead of failing
    video_frames: int = 8  # frames sampled from each clip
    video_size: int = 64  # video frames are resized to this
    frame_rate: float | None = None  # sample frames at this rate from a clip's start (None: spread over the clip)

    def __post_init__(self) -> None:
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
    from .manifest import load_user_data

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
