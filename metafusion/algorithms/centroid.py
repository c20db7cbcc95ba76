"""Nearest class mean on frozen features: the baseline every meta-learner must beat.

No trainable parameter and no meta-training: each sample is represented by its frozen features
(``nearest_mean.frozen_features``: what a user has before any learning) and a query goes to the nearest
support class mean: cosine similarity by default (SimpleShot's centred-L2-normalised nearest mean, Wang
et al. 2019: the standardisation is the centring), or negative squared Euclidean distance
(``algo.metric=euclidean``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from ..data.batch import Batch, Episode
from ..models.model import FusionModel
from .base import ALGORITHMS, MetaAlgorithm, published
from .nearest_mean import CentroidClassifier
from .protonet import Metric


@dataclass
class CentroidOptions:
    metric: Metric = "cosine"  # SimpleShot's nearest mean on centred, L2-normalised features


@ALGORITHMS.register("centroid")
class Centroid(MetaAlgorithm):
    """Frozen features + nearest class mean (see the module docstring). ``meta_backward`` is never
    called: the algorithm has no meta-parameter, so meta-training only records the run."""

    name = "centroid"
    defaults = published(meta_lr=0.0, optimizer="sgd")
    Options = CentroidOptions
    inner_loop = scoped_adaptation = meta_parameters = False

    def __init__(self, model: FusionModel, options: CentroidOptions | None = None, **kwargs):
        super().__init__(model, options, **kwargs)
        self.metric = self.options.metric

    def parameters(self) -> Iterator[nn.Parameter]:
        return iter(())

    def meta_backward(self, tasks: list[Episode]) -> dict[str, float]:
        raise RuntimeError("centroid has no meta-parameter to train")

    def adapt(self, support: Batch, steps: int | None = None) -> nn.Module:
        return CentroidClassifier.fit(support, self.model.modalities, self.vocab_size, self.metric)
