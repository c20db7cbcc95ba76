"""Per-modality standardisation with statistics from the meta-train split only."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .dataset import MultimodalDataset

CONSTANT = 1e-4  # a spread below this (relative to the feature's size) counts as constant


@dataclass
class Standardizer:
    """``x -> (x - mean) / std`` per modality, fitted on present samples of the meta-train classes.

    Images, audio and sequences use one scalar mean/std per modality (their axes are not features);
    tabular and feature-vector modalities (2-D tensors) use per-feature statistics. Integer modalities
    (token ids) are left unchanged.
    """

    stats: dict[str, tuple[Tensor, Tensor]]

    @staticmethod
    def fit(dataset: MultimodalDataset, split: str = "train", skip=()) -> Standardizer:
        """Statistics of every floating-point modality but those in ``skip``, on ``split``'s classes."""
        rows = dataset.rows_of_classes(dataset.splits[split])
        stats = {}
        for j, m in enumerate(dataset.modalities):
            x = dataset.data[m]
            if not x.is_floating_point() or m in skip:
                continue
            present = x[rows][dataset.present[rows, j]]
            if present.shape[0] == 0:
                continue
            if x.dim() == 2:
                mean, std = present.mean(0), present.std(0)
            else:
                mean, std = present.mean(), present.std()
            # A feature (nearly) constant on the meta-train split is centred, not scaled: dividing by its
            # tiny spread would blow other splits' values up by orders of magnitude.
            stats[m] = (mean, torch.where(std > CONSTANT * (1 + mean.abs()), std, torch.ones_like(std)))
        return Standardizer(stats)

    def __call__(self, dataset: MultimodalDataset) -> MultimodalDataset:
        data = dict(dataset.data)
        for m, (mean, std) in self.stats.items():
            data[m] = (data[m] - mean) / std  # absent rows are re-zeroed by MultimodalDataset
        return MultimodalDataset(
            data, dataset.present, dataset.targets, dataset.modalities, dataset.splits, dataset.metadata, dataset.name
        )
