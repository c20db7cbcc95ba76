"""Nearest class mean on frozen features: the baseline every meta-learner must beat.

No trainable parameter and no meta-training. Each sample is represented by what a user has before any
learning: per modality, the pipeline's input as it is -- frozen pretrained features where the modality
has a pretrained encoder (``--encoder text=minilm``), else the standardised raw input flattened (token
ids as a bag of words) -- each modality L2-normalised, concatenated over the model's modalities
(zeros where a modality is absent). A query goes to the nearest support class mean: cosine similarity
by default (SimpleShot's centred-L2-normalised nearest mean, Wang et al. 2019: the standardisation is
the centring), or negative squared Euclidean distance (``algo.metric=euclidean``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import RunConfig
from ..data.batch import Batch, Episode
from ..models.model import FusionModel
from ..models.spec import ModelSpec
from .base import ALGORITHMS, MetaAlgorithm, published
from .protonet import Metric, proto_logits, prototypes

COSINE_SCALE = 10.0  # turns cosine similarities into logits; it changes the loss, never the prediction


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
    """The learner ``Centroid.adapt`` returns: fixed class means over frozen features."""

    def __init__(self, protos: Tensor, modalities: tuple[str, ...], vocab_size: int, metric: str):
        super().__init__()
        self.register_buffer("protos", protos)
        self.modalities, self.vocab_size, self.metric = modalities, vocab_size, metric

    def forward(self, batch: Batch) -> Tensor:  # -> (B, ways)
        z = frozen_features(batch, self.modalities, self.vocab_size)
        scale = z.new_tensor(COSINE_SCALE) if self.metric == "cosine" else None  # None: -||z - c||^2
        return proto_logits(z, self.protos, scale)


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

    @classmethod
    def config_kwargs(cls, cfg: RunConfig, spec: ModelSpec, train_classes: list[int]) -> dict:
        return dict(vocab_size=spec.vocab_size)

    def __init__(self, model: FusionModel, *, metric: Metric = "cosine", vocab_size: int = 0, **kwargs):
        super().__init__(model, **kwargs)
        self.metric, self.vocab_size = metric, vocab_size

    def parameters(self) -> Iterator[nn.Parameter]:
        return iter(())

    def meta_backward(self, tasks: list[Episode]) -> dict[str, float]:
        raise RuntimeError("centroid has no meta-parameter to train")

    def adapt(self, support: Batch, steps: int | None = None) -> nn.Module:
        ways = int(support.labels.max()) + 1
        z = frozen_features(support, self.model.modalities, self.vocab_size)
        return CentroidClassifier(
            prototypes(z, support.labels, ways), self.model.modalities, self.vocab_size, self.metric
        )
