"""Class means and the logits against them; the nearest class mean on frozen features (no training), and
a learner's logits mixed with it.

A sample's frozen features are what a user has before any learning: per modality, the pipeline's input as
it is -- frozen pretrained features where the modality has a pretrained encoder, else the standardised raw
input flattened (token ids as a bag of words) -- each modality L2-normalised, concatenated (zeros where a
modality is absent). The ``centroid`` algorithm is this classifier alone; every other algorithm can mix its
logits with it (``WithCentroid``, weight chosen on validation: ``engine.selection``), so that a run whose
meta-training only hurt can fall back to the features it started from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.batch import Batch


def prototypes(z: Tensor, labels: Tensor, ways: int) -> Tensor:
    """Class means ``[ways, D]`` of embeddings ``z [N, D]`` (zeros for a class with no embedding)."""
    onehot = F.one_hot(labels, ways).to(z.dtype)  # (N, ways)
    return onehot.T @ z / onehot.sum(0).clamp_min(1).unsqueeze(1)


def proto_logits(z: Tensor, protos: Tensor, scale: Tensor | None = None) -> Tensor:
    """``-||z_i - p_c||^2`` (``scale`` None), else ``scale * cos(z_i, p_c)``; ``[N, ways]``."""
    if scale is None:
        return -torch.cdist(z, protos).pow(2)
    return scale * F.normalize(z, dim=-1) @ F.normalize(protos, dim=-1).T


COSINE_SCALE = 10.0  # turns cosine similarities into logits (a softmax temperature of 0.1)


def frozen_features(batch: Batch, modalities: tuple[str, ...], vocab_size: int) -> Tensor:
    """``[B, sum of flattened widths]``: each modality flattened, L2-normalised, zeros where absent."""
    blocks = []
    for m in modalities:
        x = batch.inputs[m]
        if not x.is_floating_point():  # token ids (0 = padding) -> word counts
            dtype = torch.get_default_dtype()
            counts = x.new_zeros(x.shape[0], max(vocab_size, int(x.max()) + 1), dtype=dtype)
            x = counts.scatter_add_(1, x, torch.ones_like(x, dtype=dtype))[:, 1:]  # (B, V - 1)
        x = F.normalize(x.flatten(1), dim=1)  # (B, F_m)
        present = batch.mask[:, batch.modalities.index(m)].unsqueeze(1)  # (B, 1)
        blocks.append(x * present)
    return torch.cat(blocks, 1)


class CentroidClassifier(nn.Module):
    """Fixed class means over frozen features; ``metric``: cosine (SimpleShot) or euclidean."""

    def __init__(self, protos: Tensor, modalities: tuple[str, ...], vocab_size: int, metric: str = "cosine"):
        super().__init__()
        self.register_buffer("protos", protos)
        self.modalities, self.vocab_size, self.metric = modalities, vocab_size, metric

    @staticmethod
    def fit(support: Batch, modalities: tuple[str, ...], vocab_size: int, metric: str = "cosine") -> CentroidClassifier:
        ways = int(support.labels.max()) + 1
        z = frozen_features(support, modalities, vocab_size)
        return CentroidClassifier(prototypes(z, support.labels, ways), modalities, vocab_size, metric)

    def forward(self, batch: Batch) -> Tensor:  # -> (B, ways)
        z = frozen_features(batch, self.modalities, self.vocab_size)
        scale = z.new_tensor(COSINE_SCALE) if self.metric == "cosine" else None  # None: -||z - c||^2
        return proto_logits(z, self.protos, scale)


def mix(learned: Tensor, centroid: Tensor, weight: float) -> Tensor:
    """``(1 - w) log_softmax(learned) + w log_softmax(centroid)``: a product of the two experts' class
    probabilities. ``w = 0`` is the learned model's prediction, ``w = 1`` the centroid's."""
    if weight == 0.0:
        return learned
    if weight == 1.0:
        return centroid.log_softmax(-1)
    return (1 - weight) * learned.log_softmax(-1) + weight * centroid.log_softmax(-1)


class WithCentroid(nn.Module):
    """A task learner whose logits are mixed with the nearest class mean on the same support set
    (``mix``). ``module`` is the learner, so code that looks for the fused model inside finds it."""

    def __init__(self, learner: nn.Module, centroid: CentroidClassifier, weight: float):
        super().__init__()
        self.module, self.centroid, self.weight = learner, centroid, weight

    def forward(self, batch: Batch) -> Tensor:  # -> (B, ways)
        return mix(self.module(batch), self.centroid(batch), self.weight)
