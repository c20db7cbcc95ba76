"""MultimodalDataset: every dataset decoded once into tensors, so episode sampling only indexes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import InputError
from .batch import Batch


class DataError(InputError):
    """A dataset, split or episode request that cannot be served; the message says what and why."""


@dataclass(eq=False)
class MultimodalDataset(Dataset):
    """Samples held as tensors.

    data:     modality -> ``[N, ...]`` tensor; rows where the modality is absent are zeros.
    present:  ``[N, M]`` bool presence mask, columns in ``modalities`` order.
    targets:  ``[N]`` long class ids.
    splits:   split name ("train", "val", "test") -> class ids; disjoint, checked here.
    metadata: free-form per-dataset facts (class names, speakers, vocabulary, sample rate...).

    ``dataset.batch(rows)`` gathers rows in one indexing op (learn2learn sees only the labels).
    """

    data: dict[str, Tensor]
    present: Tensor
    targets: Tensor
    modalities: tuple[str, ...]
    splits: dict[str, list[int]] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    name: str = "dataset"

    @classmethod
    def of_one_modality(
        cls, modality: str, data: Tensor, targets: Tensor, splits: dict, metadata: dict, name: str
    ) -> MultimodalDataset:
        """A dataset whose every sample has the one ``modality`` (Omniglot images, FSDD audio, CLINC150 text)."""
        return cls(
            {modality: data},
            torch.ones(len(targets), 1, dtype=torch.bool),
            targets,
            (modality,),
            splits,
            metadata,
            name,
        )

    def __post_init__(self) -> None:
        self.modalities = tuple(self.modalities)
        n = self.targets.shape[0]
        if set(self.data) != set(self.modalities):
            raise DataError(f"{self.name}: data has modalities {sorted(self.data)}, expected {self.modalities}")
        if self.present.shape != (n, len(self.modalities)):
            raise DataError(f"{self.name}: presence mask {tuple(self.present.shape)} != ({n}, {len(self.modalities)})")
        for i, m in enumerate(self.modalities):
            if self.data[m].shape[0] != n:
                raise DataError(f"{self.name}: modality {m!r} has {self.data[m].shape[0]} rows, labels have {n}")
            absent = ~self.present[:, i]
            if absent.any():  # absent rows are zeros by contract: nothing can read stale values
                self.data[m][absent] = 0
        self.present = self.present.bool()
        self.targets = self.targets.long()
        check_disjoint(self.splits, self.name)

    def __len__(self) -> int:
        return self.targets.shape[0]

    # -- fast paths ---------------------------------------------------------------------------
    @property
    def labels(self) -> list[int]:
        return self.targets.tolist()

    @property
    def labelled(self) -> bool:
        """Does every sample have a label (a user's files for ``predict`` may have none: targets -1)?"""
        return bool((self.targets >= 0).all())

    def batch(self, rows: Tensor) -> Batch:
        """Rows ``rows`` as a Batch (labels are the original class ids)."""
        return Batch(
            {m: self.data[m][rows] for m in self.modalities}, self.present[rows], self.targets[rows], self.modalities
        )

    def class_counts(self) -> dict[int, int]:
        ids, counts = torch.unique(self.targets, return_counts=True)
        return dict(zip(ids.tolist(), counts.tolist()))

    # -- derived datasets (each returns a new dataset; tensors are shared where unchanged) -------
    def select_modalities(self, names: list[str] | tuple[str, ...]) -> MultimodalDataset:
        unknown = [n for n in names if n not in self.modalities]
        if unknown:
            raise DataError(
                f"{self.name} has no modality {', '.join(map(repr, unknown))}; "
                f"it provides: {', '.join(self.modalities)}"
            )
        if not names:
            raise DataError("select at least one modality")
        cols = [self.modalities.index(n) for n in names]
        present = self.present[:, cols]
        keep = present.any(dim=1)  # samples left with no modality at all carry nothing: drop them
        return MultimodalDataset(
            {n: self.data[n][keep] for n in names},
            present[keep],
            self.targets[keep],
            tuple(names),
            self.splits,
            self.metadata,
            self.name,
        )

    def with_missing(self, rate: float, seed: int = 0) -> MultimodalDataset:
        """Drop each modality of each sample with probability ``rate``, keeping at least one per sample."""
        if rate <= 0:
            return self
        g = torch.Generator().manual_seed(seed)
        drop = torch.rand(self.present.shape, generator=g) < rate
        present = self.present & ~drop
        empty = ~present.any(dim=1)
        if empty.any():  # restore one of the originally present modalities, chosen at random
            scores = torch.rand(self.present.shape, generator=g).masked_fill(~self.present, -1.0)
            keep = scores.argmax(dim=1)
            present[empty, keep[empty]] = True
        data = {m: x.clone() for m, x in self.data.items()}
        return MultimodalDataset(data, present, self.targets, self.modalities, self.splits, self.metadata, self.name)

    def without_modality(self, modality: str, rate: float, classes: list[int], seed: int = 0) -> MultimodalDataset:
        """Mask ``modality`` in each sample of ``classes`` with probability ``rate`` (e.g. most meta-train
        samples without their photo, as in SMIL, Ma et al. 2021); a sample never loses its last modality."""
        j = self._column(modality)
        g = torch.Generator().manual_seed(seed)
        others = torch.cat([self.present[:, :j], self.present[:, j + 1 :]], dim=1).any(dim=1)
        drop = self.in_classes(classes) & others & (torch.rand(len(self), generator=g) < rate)
        present = self.present.clone()
        present[drop, j] = False
        data = {**self.data, modality: self.data[modality].clone()}  # absent rows are zeroed in the copy
        return MultimodalDataset(data, present, self.targets, self.modalities, self.splits, self.metadata, self.name)

    def with_corruption(
        self, rate: float, seed: int = 0, hide: bool = False
    ) -> tuple[MultimodalDataset, Tensor | None]:
        """Replace, with probability ``rate`` independently per sample and present modality, the modality's
        content by that modality of a random sample of another class of the same split (a wrong photo, title
        or attribute row: the fault of catalogue data). Returns the dataset and which entries were replaced
        (``[N, M]`` bool; None where ``rate`` is 0). ``hide``: the same entries are masked as missing
        instead, except in a sample whose every present modality is corrupted (nothing clean to fall back on):
        what a fusion that knew which entries are wrong, and gave them zero weight, would see."""
        if rate <= 0:
            return self, None
        g = torch.Generator().manual_seed(seed)
        corrupted = (torch.rand(self.present.shape, generator=g) < rate) & self.present
        data = {m: x.clone() for m, x in self.data.items()}
        splits = [self.in_classes(classes) for classes in self.splits.values()]
        for j, m in enumerate(self.modalities):
            for in_split in splits:
                rows = torch.nonzero(corrupted[:, j] & in_split).flatten()
                donors = torch.nonzero(self.present[:, j] & in_split).flatten()
                # one random donor per row; offsets into the donors ordered by class skip the row's own class
                donors = donors[torch.argsort(self.targets[donors], stable=True)]
                labels = self.targets[donors]
                start = torch.searchsorted(labels, self.targets[rows])
                own = torch.searchsorted(labels, self.targets[rows], right=True) - start
                alone = own == len(donors)  # no other class of the split has the modality: nothing to swap in
                corrupted[rows[alone], j] = False
                rows, start, own = rows[~alone], start[~alone], own[~alone]
                if len(rows) == 0:
                    continue
                pick = (torch.rand(len(rows), generator=g) * (len(donors) - own)).long()
                data[m][rows] = self.data[m][donors[torch.where(pick < start, pick, pick + own)]]
        present = self.present
        if hide:
            present = present & ~(corrupted & (present & ~corrupted).any(1, keepdim=True))
        out = MultimodalDataset(data, present, self.targets, self.modalities, self.splits, self.metadata, self.name)
        return out, corrupted

    def _column(self, modality: str) -> int:
        if modality not in self.modalities:
            raise DataError(f"{self.name} has no modality {modality!r}; it provides: {', '.join(self.modalities)}")
        return self.modalities.index(modality)

    def map_modality(self, modality: str, fn: Callable[[Tensor], Tensor]) -> MultimodalDataset:
        """Replace one modality's tensor by ``fn(tensor)`` (e.g. frozen encoder features)."""
        data = dict(self.data)
        data[modality] = fn(self.data[modality])
        return MultimodalDataset(
            data, self.present, self.targets, self.modalities, self.splits, self.metadata, self.name
        )

    def unlabelled(self, rows: Tensor) -> MultimodalDataset:
        """Rows ``rows`` as a user's unlabelled files load (``predict``'s input; ids are the row numbers)."""
        metadata = {**self.metadata, "texts": None, "ids": [str(i) for i in rows.tolist()]}
        return MultimodalDataset(
            {m: x[rows] for m, x in self.data.items()},
            self.present[rows],
            torch.full((len(rows),), -1),
            self.modalities,
            metadata=metadata,
            name=self.name,
        )

    def in_classes(self, classes: list[int]) -> Tensor:
        """``[N]`` bool: which samples belong to one of ``classes``."""
        wanted = torch.zeros(int(self.targets.max()) + 1, dtype=torch.bool)
        wanted[torch.tensor(classes, dtype=torch.long)] = True
        return wanted[self.targets]

    def rows_of_classes(self, classes: list[int]) -> Tensor:
        return torch.nonzero(self.in_classes(classes)).flatten()


def check_disjoint(splits: dict[str, list[int]], name: str = "dataset") -> None:
    seen: dict[int, str] = {}
    for split, classes in splits.items():
        for c in classes:
            if c in seen and seen[c] != split:
                raise DataError(f"{name}: class {c} is in both the {seen[c]!r} and {split!r} splits")
            seen[c] = split


def split_classes(classes: list[int], fractions: tuple[float, float, float], seed: int) -> dict[str, list[int]]:
    """Shuffle ``classes`` with ``seed`` and cut them into train/val/test by ``fractions``."""
    g = torch.Generator().manual_seed(seed)
    order = [classes[i] for i in torch.randperm(len(classes), generator=g).tolist()]
    n_train = round(fractions[0] * len(order))
    n_val = round(fractions[1] * len(order))
    return {
        "train": sorted(order[:n_train]),
        "val": sorted(order[n_train : n_train + n_val]),
        "test": sorted(order[n_train + n_val :]),
    }


def find_data_folder(root: str | Path, name: str, marker: str, expects: str) -> Path:
    """``root`` or ``root/name``, whichever holds the file ``marker``; else a DataError saying what
    dataset ``name`` ``expects`` there."""
    root = Path(root)
    for candidate in (root, root / name):
        if (candidate / marker).is_file():
            return candidate
    raise DataError(f"no {name} data under {root}: expected {expects} in {root} or {root / name}")
