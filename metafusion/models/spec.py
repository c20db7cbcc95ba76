"""ModelSpec: what a model needs to know of the data it will read."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelSpec:
    """What a model needs to know of the data: its modalities' sample shapes and a few facts."""

    input_shapes: dict[str, tuple[int, ...]]
    vocab_size: int = 201
    sample_rate: int = 8000
