"""Fashion products (the "Fashion Product Images (Small)" catalogue): a real image + text + tabular set.

Reads ``styles.csv`` and ``images.zip`` (``images/<id>.jpg``, 60x80 RGB photos) under ``root`` or
``root/fashion``. The class is ``articleType``; classes with at least ``min_products`` photographed
products are kept (86 at 20), and every product of a kept class is a sample (the few without a photo
carry no image modality: a real missing modality). Modalities:

- ``image``: the RGB photo, padded to a square with white (the photos' background) and resized to
  ``image_size`` (torchvision, bilinear with antialiasing); ``[3, s, s]`` in [0, 1].
- ``text``: the title (``productDisplayName``) with the class names' words removed (``mask_title``):
  titles usually name the article type ("... Men Navy Blue Shirt"), which would make text spell the
  label. Every word of every ``articleType`` name is removed from every title, so neither a word's
  presence nor its absence can tell the class.
- ``tabular``: one-hot ``gender``, ``baseColour``, ``season``, ``usage`` and ``year`` (an empty cell is
  all zeros in its group). ``masterCategory`` / ``subCategory`` are left out: they are the label's
  parents in the catalogue hierarchy.

Images and titles are decoded once and cached as tensors (``data.cache``). Classes are split 60/20/20
with ``seed`` (52/17/17 at 20 products).
"""

from __future__ import annotations

import csv
import io
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ..config import DataConfig
from .cache import cached, files_key
from .dataset import DataError, MultimodalDataset, find_data_folder, split_classes
from .images import check_image_size
from .manifest import token_ids
from .sources import DATASETS, require_root

ATTRIBUTES = ("gender", "baseColour", "season", "usage", "year")
REQUIRED_COLUMNS = ("id", "articleType", "productDisplayName", "has_image", *ATTRIBUTES)


def find_fashion(root: str | Path) -> Path:
    return find_data_folder(root, "fashion", "styles.csv", "styles.csv and images.zip")


def read_styles(base: Path) -> list[dict[str, str]]:
    path = base / "styles.csv"
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise DataError(f"{path} has no rows")
    missing = [c for c in REQUIRED_COLUMNS if c not in rows[0]]
    if missing:
        raise DataError(f"{path} lacks the columns {', '.join(missing)} (has: {', '.join(rows[0])})")
    return rows


def _word(w: str) -> str:
    """Lower case, letters and digits only ("T-Shirt" -> "tshirt"), plural reduced to singular."""
    w = re.sub(r"[^a-z0-9]", "", w.lower())
    if w.endswith("ies") and len(w) > 4:
        return w[:-3] + "y"
    if w.endswith(("sses", "shes", "ches", "xes")):
        return w[:-2]
    if w.endswith("s") and not w.endswith("ss") and len(w) > 3:
        return w[:-1]
    return w


def mask_title(title: str, class_words: set[str]) -> str:
    """``title`` without the words whose singular form (``_word``) is a word of a class name.

    >>> mask_title("Turtle Check Men Navy Blue Shirt", {_word("Shirts"), _word("Tshirts")})
    'Turtle Check Men Navy Blue'
    """
    return " ".join(w for w in title.split() if _word(w) not in class_words)


def class_words(names: list[str]) -> set[str]:
    return {_word(w) for name in names for w in name.split()} - {""}


def _decode(data: bytes, size: int) -> Tensor:
    import torchvision.transforms.functional as TF

    img = Image.open(io.BytesIO(data)).convert("RGB")
    side = max(img.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    x = TF.pil_to_tensor(square)  # (3, side, side) uint8
    return TF.resize(x, [size, size], antialias=True)


def load_images(base: Path, ids: list[str], size: int) -> tuple[Tensor, Tensor]:
    """Photos of products ``ids`` as ``[N, 3, size, size]`` uint8 and a presence mask ``[N]``."""
    out = torch.zeros(len(ids), 3, size, size, dtype=torch.uint8)
    present = torch.zeros(len(ids), dtype=torch.bool)
    zpath = base / "images.zip"
    if not zpath.is_file():
        raise DataError(f"fashion: {zpath} not found (the product photos)")
    with zipfile.ZipFile(zpath) as z:
        names = set(z.namelist())
        for i, pid in enumerate(ids):
            name = f"images/{pid}.jpg"
            if name not in names:
                continue
            try:
                out[i] = _decode(z.read(name), size)
            except (OSError, UnidentifiedImageError) as e:
                raise DataError(f"fashion: cannot decode {zpath}:{name}: {e}") from None
            present[i] = True
    return out, present


def attribute_vector(rows: list[dict[str, str]]) -> tuple[Tensor, list[str]]:
    """One-hot ``ATTRIBUTES`` ``[N, F]`` and the feature names (``attribute=value``)."""
    names = [f"{a}={v}" for a in ATTRIBUTES for v in sorted({r[a] for r in rows} - {""})]
    column = {n: j for j, n in enumerate(names)}
    x = np.zeros((len(rows), len(names)), dtype=np.float32)
    for i, r in enumerate(rows):
        for a in ATTRIBUTES:
            if r[a]:
                x[i, column[f"{a}={r[a]}"]] = 1.0
    return torch.from_numpy(x), names


def fashion(
    root: str | Path, image_size: int = 28, min_products: int = 20, text_length: int = 16, seed: int = 0
) -> MultimodalDataset:
    base = find_fashion(root)
    rows = read_styles(base)
    photographed: dict[str, int] = {}
    for r in rows:
        if r["has_image"] == "1":
            photographed[r["articleType"]] = photographed.get(r["articleType"], 0) + 1
    names = sorted(c for c, n in photographed.items() if n >= min_products)
    if len(names) < 5:
        raise DataError(f"fashion: only {len(names)} article types have {min_products} photographed products")
    index = {c: i for i, c in enumerate(names)}
    kept = [r for r in rows if r["articleType"] in index]
    ids = [r["id"] for r in kept]
    key = files_key([base / "styles.csv", base / "images.zip"], image_size, min_products)
    images, has_image = cached(f"fashion/images_{key}.pt", lambda: load_images(base, ids, image_size))
    words = class_words(sorted({r["articleType"] for r in rows}))
    texts = [mask_title(r["productDisplayName"], words) for r in kept]
    tokens, vocab = token_ids(texts, text_length)
    tabular, features = attribute_vector(kept)
    present = torch.stack(
        [has_image, torch.tensor([bool(t.strip()) for t in texts]), torch.ones(len(kept), dtype=torch.bool)], 1
    )  # (N, 3)
    metadata = {"class_names": names, "texts": texts, "vocabulary": vocab, "tabular_features": features, "ids": ids}
    return MultimodalDataset(
        {"image": images.float() / 255.0, "text": tokens, "tabular": tabular},
        present,
        torch.tensor([index[r["articleType"]] for r in kept]),
        ("image", "text", "tabular"),
        split_classes(list(range(len(names))), (0.6, 0.2, 0.2), seed),
        metadata,
        "fashion",
    )


def check_fashion(root: Path) -> str:
    rows = read_styles(find_fashion(root))
    return f"ok: {len(rows)} products, {sum(r['has_image'] == '1' for r in rows)} with a photo"


@dataclass
class FashionOptions:
    image_size: int = 28  # the photos (60x80) are padded to a square and resized to this

    def __post_init__(self) -> None:
        check_image_size(self.image_size)


@DATASETS.register(
    "fashion",
    options=FashionOptions,
    expects="fashion/styles.csv + fashion/images.zip (images/<id>.jpg)",
    check=check_fashion,
)
def fashion_dataset(cfg: DataConfig, opts: FashionOptions) -> MultimodalDataset:
    return fashion(require_root(cfg, ""), opts.image_size, seed=cfg.data_seed)
