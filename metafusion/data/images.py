"""Reading one image file the way every dataset does: safely, at any bit depth, to a fixed size.

Images larger than PIL's decompression-bomb limit are refused before they are decoded; EXIF orientation
is applied; 16-bit grey images are scaled to [0, 1] (converted to 8-bit the PIL way they would clip to
white), as are float images whose values are on a 0-255 or 0-65535 scale; transparent pixels are
composited onto white.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ConfigError
from .dataset import DataError

_HIGH_DEPTH = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}


def check_image_size(size: int) -> None:
    """A dataset option's image size, checked where it is set (not later, by blaming an image file)."""
    if not 4 <= size <= 4096:
        raise ConfigError(f"data.image_size must be in [4, 4096] pixels (got {size})")


def read_image(source: str | Path | bytes, channels: int, size: int, where: str | None = None) -> np.ndarray:
    """``[channels, size, size]`` float32 in [0, 1] (grey replicated for RGB, RGB averaged to grey by
    PIL's luma) from a file path or its bytes. Raises DataError naming ``where`` (default: the path)."""
    where = where or str(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            img.load()
            img = ImageOps.exif_transpose(img)  # a phone photo's EXIF orientation: upright, as viewers show it
        return _to_array(img, channels, size)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise DataError(
            f"{where}: refused, more than {Image.MAX_IMAGE_PIXELS:,} pixels (a decompression bomb, or an image "
            f"far larger than a model reads); shrink it first"
        ) from None
    except (OSError, ValueError, UnidentifiedImageError, SyntaxError) as e:
        raise DataError(f"cannot read {where} as an image: {e}") from None


def _to_array(img: Image.Image, channels: int, size: int) -> np.ndarray:
    if img.mode in _HIGH_DEPTH:  # one channel of more than 8 bits: scale in float, resize in float
        grey = np.asarray(img, dtype=np.float32)
        full = _HIGH_DEPTH[img.mode]
        if img.mode == "F" and np.nanmax(grey, initial=0.0) > 1.0:  # float pixels on an 8- or 16-bit scale
            full = 255.0 if np.nanmax(grey) <= 255.0 else 65535.0
        grey = grey / full
        resized = Image.fromarray(np.clip(grey, 0.0, 1.0), mode="F").resize((size, size), resample=Image.LANCZOS)
        out = np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)[None]
        return np.repeat(out, channels, axis=0)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    img = img.convert("RGB" if channels == 3 else "L").resize((size, size), resample=Image.LANCZOS)
    array = np.asarray(img, dtype=np.float32) / 255.0
    return array.transpose(2, 0, 1) if channels == 3 else array[None]
