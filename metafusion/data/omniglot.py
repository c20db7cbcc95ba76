"""Omniglot (Lake, Salakhutdinov & Tenenbaum 2015): images, and pen strokes as a second modality.

Reads the upstream files -- ``images_background.zip``, ``images_evaluation.zip``,
``strokes_background.zip``, ``strokes_evaluation.zip`` and the minimal-split stroke zips
``strokes_background_small1.zip`` / ``strokes_background_small2.zip`` -- or their extracted folders,
under ``root`` or ``root/omniglot`` or ``root/omniglot-py`` (torchvision's layout). The zips are read
by path, not by checksum, so rebuilt copies of the upstream zips work. ``download_omniglot`` fetches
the upstream zips when a network exists.

Images: 105x105 1-bit PNGs, resized to ``image_size`` (Lanczos, as learn2learn and MAML do) and
inverted so ink is 1 and paper 0. Decoded once and cached as tensors under
``~/.cache/metafusion/omniglot`` (keyed by the source files' names, sizes and mtimes).

Stroke encoding (``encode_strokes``): the pen trajectory (``x,y,t`` lines, ``BREAK`` at pen-up; y
flipped to image coordinates, t dropped) is resampled to ``length`` points spaced evenly along the
inked arc length of the whole drawing. Step k is ``(dx, dy, pen_up)``: the move from point k-1 to
point k in units of the 105-pixel image width (for k = 0: from the image centre), and ``pen_up = 1``
when the pen lifts after point k (the next step jumps to a new stroke; the last step is always 1).

Drawing videos (``render_drawing``): the recording rendered as the video of the character being drawn, at
its recorded pace -- frame k of T shows the ink laid down by time ``t_start + (k + 1) / T * (t_end -
t_start)`` of the drawing's own clock (pauses between strokes are repeated frames; the last frame is the
whole character). Rendered from the pen recordings, not filmed: lines 5 pixels wide on the 105-pixel
canvas, resized to ``image_size`` as the images are.
"""

from __future__ import annotations

import io
import urllib.request
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from ..config import DataConfig
from ..errors import ConfigError
from .cache import cached, files_key
from .dataset import DataError, MultimodalDataset, split_classes
from .images import check_image_size
from .sources import DATASETS, require_root

IMAGE_SPLITS = ("background", "evaluation")
STROKE_SOURCES = ("strokes_background", "strokes_evaluation", "strokes_background_small1", "strokes_background_small2")
UPSTREAM = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
EXPECTED_CHARACTERS = {"background": 964, "evaluation": 659}


def find_omniglot_root(root: str | Path) -> Path:
    """The folder holding the Omniglot files: ``root``, ``root/omniglot`` or ``root/omniglot-py``."""
    root = Path(root)
    for candidate in (root, root / "omniglot", root / "omniglot-py", root / "omniglot" / "omniglot-py"):
        if any((candidate / f"images_{s}.zip").exists() or (candidate / f"images_{s}").is_dir() for s in IMAGE_SPLITS):
            return candidate
    raise DataError(
        f"no Omniglot images under {root}: expected images_background.zip and "
        f"images_evaluation.zip (or the extracted images_background/ images_evaluation/ folders) "
        f"in {root}, {root / 'omniglot'} or {root / 'omniglot-py'}"
    )


def download_omniglot(root: str | Path, strokes: bool = True) -> Path:
    """Fetch the upstream zips into ``root`` (needs a network; not used by tests)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    names = [f"images_{s}.zip" for s in IMAGE_SPLITS]
    if strokes:
        names += ["strokes_background.zip", "strokes_evaluation.zip"]
    for name in names:
        if not (root / name).exists():
            urllib.request.urlretrieve(UPSTREAM + name, root / name)
    return root


def _members(base: Path, name: str, suffix: str) -> dict[str, bytes | Path]:
    """Files ending in ``suffix`` from ``base/name.zip`` or ``base/name/``, keyed by their path below
    the top folder (``Alphabet/characterNN/id_drawer``). macOS ``__MACOSX``/``.DS_Store`` are ignored."""
    out: dict[str, bytes | Path] = {}
    zpath, folder = base / f"{name}.zip", base / name
    if zpath.exists():
        with zipfile.ZipFile(zpath) as z:
            for info in z.infolist():
                parts = info.filename.split("/")
                if info.is_dir() or "__MACOSX" in parts or not info.filename.endswith(suffix):
                    continue
                out["/".join(parts[1:])[: -len(suffix)]] = z.read(info)
    elif folder.is_dir():
        for path in folder.rglob(f"*{suffix}"):
            out[str(path.relative_to(folder).with_suffix(""))] = path
    return out


def _source_key(base: Path, names: list[str]) -> str:
    return files_key(p for name in names for p in (base / f"{name}.zip", base / name) if p.exists())


def _decode_png(data: bytes | Path, size: int) -> np.ndarray:
    img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data).convert("L")
    if img.size != (size, size):
        img = img.resize((size, size), resample=Image.LANCZOS)
    return 1.0 - np.asarray(img, dtype=np.float32) / 255.0  # ink = 1


def load_images(root: str | Path, split: str, image_size: int = 28) -> tuple[Tensor, list[str]]:
    """All images of one Lake split: ``[N, 1, s, s]`` floats and their keys, sorted by key."""
    base = find_omniglot_root(root)
    name = f"images_{split}"

    def decode() -> dict:
        files = _members(base, name, ".png")
        if not files:
            raise DataError(f"no PNG files found in {base / name}.zip or {base / name}/")
        keys = sorted(files)
        images = torch.from_numpy(np.stack([_decode_png(files[k], image_size) for k in keys]))[:, None]
        return {"images": (images * 255).round().to(torch.uint8), "keys": keys}  # 8-bit: 4x smaller, PNG-exact

    saved = cached(f"omniglot/{name}_{image_size}_{_source_key(base, [name])}.pt", decode)
    return saved["images"].float() / 255, saved["keys"]


def character_of(key: str) -> str:
    """``Alphabet/characterNN/id_drawer`` -> ``Alphabet/characterNN``."""
    return key.rsplit("/", 1)[0]


def parse_strokes(text: str) -> list[np.ndarray]:
    """Upstream stroke file -> list of strokes, each ``[n, 3]`` of (x, y, t)."""
    strokes, current = [], []
    for line in text.splitlines():
        line = line.strip()
        if not line or line == "START":
            continue
        if line == "BREAK":
            if current:
                strokes.append(np.array(current, dtype=np.float64))
            current = []
        else:
            current.append([float(v) for v in line.split(",")])
    if current:
        strokes.append(np.array(current, dtype=np.float64))
    return strokes


def encode_strokes(strokes: list[np.ndarray], length: int = 64, image_width: float = 105.0) -> Tensor:
    """Strokes -> ``[length, 3]`` of (dx, dy, pen_up); see the module docstring for the exact encoding."""
    pts = [np.stack([s[:, 0], -s[:, 1]], 1) for s in strokes if len(s)]  # y flipped to image coords
    if not pts:
        raise ValueError("drawing has no stroke points")
    seg_len = [np.linalg.norm(np.diff(p, axis=0), axis=1) for p in pts]
    stroke_len = np.array([s.sum() for s in seg_len])
    if stroke_len.sum() == 0:  # only dots: give each point equal weight
        seg_len = [np.ones(max(len(p) - 1, 0)) for p in pts]
        stroke_len = np.array([max(len(p) - 1, 0) for p in pts], dtype=float)
        if stroke_len.sum() == 0:
            stroke_len = np.ones(len(pts))
    starts = np.concatenate([[0.0], np.cumsum(stroke_len)])  # arc-length offset of each stroke
    targets = np.linspace(0, starts[-1], length)
    out_pts = np.zeros((length, 2))
    # A point exactly at a stroke boundary belongs to the stroke that ends there (so its pen lifts).
    stroke_id = np.clip(np.searchsorted(starts, targets, side="left") - 1, 0, len(pts) - 1)
    for k, (s, sid) in enumerate(zip(targets, stroke_id)):
        p, lens = pts[sid], seg_len[sid]
        if len(p) == 1 or lens.sum() == 0:
            out_pts[k] = p[0]
            continue
        local = s - starts[sid]
        cum = np.concatenate([[0.0], np.cumsum(lens)])
        j = min(np.searchsorted(cum, local, side="right") - 1, len(lens) - 1)
        frac = 0.0 if lens[j] == 0 else np.clip((local - cum[j]) / lens[j], 0, 1)
        out_pts[k] = p[j] + frac * (p[j + 1] - p[j])
    prev = np.vstack([[image_width / 2, image_width / 2], out_pts[:-1]])
    delta = (out_pts - prev) / image_width
    pen_up = np.append(stroke_id[1:] != stroke_id[:-1], True).astype(np.float64)
    return torch.tensor(np.column_stack([delta, pen_up]), dtype=torch.float32)


def render_drawing(strokes: list[np.ndarray], frames: int, size: int, width: int = 5) -> np.ndarray:
    """Strokes (``[n, 3]`` of x, y, t) -> ``[frames, 1, size, size]`` uint8 frames of the drawing in progress
    (ink = 255), drawn up to each frame's time; see the module docstring."""
    times = np.concatenate([s[:, 2] for s in strokes if len(s)])
    if not len(times):
        raise ValueError("drawing has no stroke points")
    begin, end = times.min(), times.max()
    out = np.zeros((frames, 1, size, size), dtype=np.uint8)
    for k in range(frames):
        until = begin + (k + 1) / frames * (end - begin)
        canvas = Image.new("L", (105, 105), 0)
        draw = ImageDraw.Draw(canvas)
        for s in strokes:
            drawn = s[s[:, 2] <= until]
            xy = [(float(x), float(-y)) for x, y in drawn[:, :2]]  # y flipped to image coordinates
            if len(xy) > 1:
                draw.line(xy, fill=255, width=width, joint="curve")
            if xy:  # round ends (and lone points)
                for x, y in (xy[0], xy[-1]):
                    draw.ellipse((x - width / 2, y - width / 2, x + width / 2, y + width / 2), fill=255)
        out[k, 0] = np.asarray(canvas.resize((size, size), resample=Image.LANCZOS) if size != 105 else canvas)
    return out


def _stroke_files(root: str | Path) -> tuple[Path, list[str]]:
    base = find_omniglot_root(root)
    present = [n for n in STROKE_SOURCES if (base / f"{n}.zip").exists() or (base / n).is_dir()]
    if not present:
        raise DataError(
            f"no Omniglot stroke files under {base}: expected strokes_background.zip / "
            f"strokes_evaluation.zip or strokes_background_small1.zip / _small2.zip"
        )
    return base, present


def _each_recording(base: Path, present: list[str]):
    """(``split/Alphabet/characterNN/id_drawer``, parsed strokes) of every recording, each once."""
    seen = set()
    for name in present:
        split = "evaluation" if "evaluation" in name else "background"
        for key, data in _members(base, name, ".txt").items():
            full = f"{split}/{key}"
            if full not in seen:
                seen.add(full)
                yield full, parse_strokes(data.decode() if isinstance(data, bytes) else Path(data).read_text())


def load_drawing_videos(root: str | Path, frames: int = 8, size: int = 28) -> dict[str, Tensor]:
    """Drawing videos ``[frames, 1, size, size]`` (uint8) keyed as ``load_strokes``' recordings."""
    base, present = _stroke_files(root)

    def render() -> dict[str, Tensor]:
        return {key: torch.from_numpy(render_drawing(s, frames, size)) for key, s in _each_recording(base, present)}

    return cached(f"omniglot/videos_w5_{frames}_{size}_{_source_key(base, present)}.pt", render)


def load_strokes(root: str | Path, length: int = 64) -> dict[str, Tensor]:
    """Encoded strokes keyed by ``split/Alphabet/characterNN/id_drawer`` from every stroke source present
    (full zips and/or the minimal-split zips; duplicates across small1/small2 are read once)."""
    base, present = _stroke_files(root)

    def encode() -> dict[str, Tensor]:
        return {key: encode_strokes(strokes, length) for key, strokes in _each_recording(base, present)}

    return cached(f"omniglot/strokes_v2_{length}_{_source_key(base, present)}.pt", encode)


def _load_all_images(root, image_size) -> tuple[Tensor, list[str]]:
    images, keys = [], []
    for split in IMAGE_SPLITS:
        x, k = load_images(root, split, image_size)
        images.append(x)
        keys += [f"{split}/{key}" for key in k]
    return torch.cat(images), keys


def _class_ids(keys: list[str]) -> tuple[Tensor, list[str]]:
    names = sorted({character_of(k) for k in keys}, key=lambda n: (n.split("/")[0] != "background", n))
    index = {n: i for i, n in enumerate(names)}
    return torch.tensor([index[character_of(k)] for k in keys]), names


def omniglot(
    root: str | Path, image_size: int = 28, split: str = "protocol", rotations: bool = False, seed: int = 0
) -> MultimodalDataset:
    """Image-only Omniglot, 1623 characters (964 background + 659 evaluation), 20 drawers each.

    ``split="protocol"``: all characters shuffled with ``seed``, 1100 train / 100 val / 423 test (the
    MAML / Reptile protocol; the papers' "1200 training characters" include the 100 val).
    ``split="background"``: Lake's split: background alphabets train (100 of them held out as val),
    evaluation alphabets test. ``rotations`` adds 90/180/270-degree rotations as new classes.
    """
    images, keys = _load_all_images(root, image_size)
    targets, names = _class_ids(keys)
    n_bg = sum(1 for n in names if n.startswith("background/"))
    if split == "protocol":
        splits = split_classes(list(range(len(names))), (1100 / 1623, 100 / 1623, 423 / 1623), seed)
    elif split == "background":
        bg = split_classes(list(range(n_bg)), (1 - 100 / n_bg, 100 / n_bg, 0.0), seed)
        splits = {"train": bg["train"], "val": bg["val"], "test": list(range(n_bg, len(names)))}
    else:
        raise DataError(f"unknown Omniglot split {split!r}; choose protocol or background")
    if rotations:
        k = len(names)
        images = torch.cat([torch.rot90(images, r, dims=(2, 3)) for r in range(4)])
        targets = torch.cat([targets + r * k for r in range(4)])
        splits = {s: [c + r * k for r in range(4) for c in cs] for s, cs in splits.items()}
        names = [f"{n}@rot{90 * r}" for r in range(4) for n in names]
    return MultimodalDataset.of_one_modality(
        "image", images, targets, splits, {"class_names": names, "keys": keys}, "omniglot"
    )


def omniglot_strokes(
    root: str | Path,
    image_size: int = 28,
    stroke_length: int = 64,
    video_frames: int = 0,
    frame_order: str = "recorded",
    seed: int = 0,
) -> MultimodalDataset:
    """Image + pen-stroke Omniglot: the characters whose drawings all have strokes, with their own
    disjoint train/val/test class split (60/20/20, shuffled with ``seed``). ``video_frames > 0`` adds the
    drawing videos (``render_drawing``) as modality ``video``; ``frame_order="shuffled"`` permutes each
    video's frames (a fixed permutation per sample): what the temporal order is worth."""
    strokes = load_strokes(root, stroke_length)
    images, keys = _load_all_images(root, image_size)
    have = [i for i, k in enumerate(keys) if k in strokes]
    by_char: dict[str, list[int]] = {}
    for i in have:
        by_char.setdefault(character_of(keys[i]), []).append(i)
    total = {}
    for k in keys:
        total[character_of(k)] = total.get(character_of(k), 0) + 1
    chars = sorted(c for c, rows in by_char.items() if len(rows) == total[c])  # complete characters only
    rows = [i for c in chars for i in sorted(by_char[c])]
    index = {c: j for j, c in enumerate(chars)}
    targets = torch.tensor([index[character_of(keys[i])] for i in rows])
    data = {"image": images[rows], "strokes": torch.stack([strokes[keys[i]] for i in rows])}
    if video_frames:
        videos = load_drawing_videos(root, video_frames, image_size)
        data["video"] = torch.stack([videos[keys[i]] for i in rows]).float() / 255
        if frame_order == "shuffled":
            gen = torch.Generator().manual_seed(seed)
            order = torch.stack([torch.randperm(video_frames, generator=gen) for _ in rows])  # (N, T)
            data["video"] = data["video"][torch.arange(len(rows))[:, None], order]
        elif frame_order != "recorded":
            raise DataError(f"unknown frame_order {frame_order!r}; choose recorded or shuffled")
    splits = split_classes(list(range(len(chars))), (0.6, 0.2, 0.2), seed)
    return MultimodalDataset(
        data,
        torch.ones(len(rows), len(data), dtype=torch.bool),
        targets,
        tuple(data),
        splits,
        {"class_names": chars, "keys": [keys[i] for i in rows]},
        "omniglot-strokes",
    )


def check_omniglot(root: Path, strokes: bool = False) -> str:
    """`metafusion datasets`' verdict on the Omniglot files under ``root``."""
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


@dataclass
class OmniglotOptions:
    image_size: int = 28
    split: Literal["protocol", "background"] = "protocol"  # 1100/100/423 characters, or Lake's background/eval
    rotations: bool = False  # 90/180/270 degree rotations as new classes (the MAML protocol)

    def __post_init__(self) -> None:
        check_image_size(self.image_size)


@DATASETS.register(
    "omniglot",
    options=OmniglotOptions,
    expects="omniglot/images_background.zip, omniglot/images_evaluation.zip (or extracted folders)",
    check=check_omniglot,
)
def omniglot_dataset(cfg: DataConfig, opts: OmniglotOptions) -> MultimodalDataset:
    if "strokes" in (cfg.modalities or []):
        raise DataError(
            "dataset 'omniglot' has images only; its pen strokes are dataset 'omniglot-strokes' (image, strokes)"
        )
    return omniglot(require_root(cfg, ""), opts.image_size, opts.split, opts.rotations, seed=cfg.data_seed)


@dataclass
class OmniglotStrokesOptions:
    image_size: int = 28
    stroke_length: int = 64  # resampled (dx, dy, pen_up) steps
    video_frames: int = 0  # > 0: the drawings rendered as videos of this many frames (modality video)
    frame_order: Literal["recorded", "shuffled"] = "recorded"  # shuffled: each video's frames permuted

    def __post_init__(self) -> None:
        check_image_size(self.image_size)
        if not 0 <= self.video_frames <= 64:
            raise ConfigError(f"data.video_frames takes 0 (no video) to 64 (got {self.video_frames})")


@DATASETS.register(
    "omniglot-strokes",
    options=OmniglotStrokesOptions,
    expects="omniglot/images_background.zip + strokes_background*.zip (full or small1/small2)",
    check=lambda root: check_omniglot(root, strokes=True),
)
def omniglot_strokes_dataset(cfg: DataConfig, opts: OmniglotStrokesOptions) -> MultimodalDataset:
    return omniglot_strokes(require_root(cfg, ""), **asdict(opts), seed=cfg.data_seed)
