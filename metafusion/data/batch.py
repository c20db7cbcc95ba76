"""Batch and Episode: the explicit data that flows from samplers into models and algorithms."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Batch:
    """A batch of multimodal samples.

    inputs:  modality name -> tensor ``[B, ...]``; rows of an absent modality are zeros.
    mask:    ``[B, M]`` bool, ``mask[b, m]`` is True when modality ``modalities[m]`` is present in sample b.
    labels:  ``[B]`` long.
    """

    inputs: dict[str, Tensor]
    mask: Tensor
    labels: Tensor
    modalities: tuple[str, ...]

    def __post_init__(self) -> None:
        n = self.labels.shape[0]
        assert self.mask.shape == (n, len(self.modalities)), (self.mask.shape, n, self.modalities)
        assert all(self.inputs[m].shape[0] == n for m in self.modalities)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        """On ``device``; with ``dtype``, floating-point inputs also cast to it (labels, masks and token
        ids keep theirs)."""

        def move(x: Tensor) -> Tensor:
            return x.to(device, dtype) if dtype is not None and x.is_floating_point() else x.to(device)

        return Batch(
            {m: move(x) for m, x in self.inputs.items()}, self.mask.to(device), self.labels.to(device), self.modalities
        )

    def index(self, idx: Tensor | slice) -> Batch:
        """Rows ``idx`` of this batch (a sub-batch)."""
        return Batch({m: x[idx] for m, x in self.inputs.items()}, self.mask[idx], self.labels[idx], self.modalities)

    def present(self, modality: str) -> Tensor:
        """``[B]`` bool: which samples carry ``modality``."""
        return self.mask[:, self.modalities.index(modality)]

    @staticmethod
    def cat(batches: list[Batch]) -> Batch:
        first = batches[0]
        return Batch(
            {m: torch.cat([b.inputs[m] for b in batches]) for m in first.inputs},
            torch.cat([b.mask for b in batches]),
            torch.cat([b.labels for b in batches]),
            first.modalities,
        )


@dataclass
class Episode:
    """One N-way K-shot task: support and query batches, labels remapped to 0..ways-1.

    ``classes[i]`` is the dataset's original class id of episode label i (for reports), and
    ``indices`` are the dataset rows used (support first, then query), which fingerprint the episode.
    """

    support: Batch
    query: Batch
    ways: int
    shots: int
    queries: int
    classes: tuple[int, ...]
    indices: tuple[int, ...] = field(default=())

    def fingerprint(self) -> str:
        """A short hash of the rows and classes: equal fingerprints mean identical episodes."""
        text = f"{self.ways},{self.shots},{self.queries}|{self.classes}|{self.indices}"
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Episode:
        return Episode(
            self.support.to(device, dtype),
            self.query.to(device, dtype),
            self.ways,
            self.shots,
            self.queries,
            self.classes,
            self.indices,
        )
