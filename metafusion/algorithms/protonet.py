"""Prototypical Networks (Snell et al. 2017) on the fused embedding: no inner loop; a query's logits
are negative squared Euclidean distances to the class means of the support embeddings, or
(``algo.metric=cosine``) cosine similarities times a meta-learned scale (Gidaris & Komodakis 2018;
Chen et al. 2019), which keeps the geometry of L2-normalised pretrained features."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import RunConfig
from ..data.batch import Batch, Episode
from ..errors import ConfigError
from ..models.model import FusionModel
from .base import ALGORITHMS, MetaAlgorithm, TaskTally, published
from .batched import State, functional, model_parameters
from .nearest_mean import proto_logits, prototypes


class Scale(nn.Module):
    """A positive meta-learned scale (temperature) for cosine logits, kept as its logarithm."""

    def __init__(self, init: float = 10.0):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(init)))

    def forward(self) -> Tensor:
        return self.log_scale.exp()


class PrototypeClassifier(nn.Module):
    """The learner ProtoNet's ``adapt`` returns: the embedding model plus fixed prototypes."""

    def __init__(self, model: FusionModel, protos: Tensor, scale: Tensor | None = None):
        super().__init__()
        self.module = model
        self.register_buffer("protos", protos)
        self.scale = scale

    def forward(self, batch: Batch) -> Tensor:
        return proto_logits(self.module.features(batch), self.protos, self.scale)


Metric = Literal["euclidean", "cosine"]


@dataclass
class ProtoNetOptions:
    metric: Metric = "euclidean"  # Snell et al.; cosine keeps the geometry of L2-normalised pretrained features


@ALGORITHMS.register("protonet")
class ProtoNet(MetaAlgorithm):
    name = "protonet"
    defaults = published()
    Options = ProtoNetOptions
    # cosine prototypes over a projection as wide as MiniLM's features (docs/results.md, CLINC150 and fashion)
    pretrained_defaults = {"algo.metric": "cosine", "model.width": 384}
    inner_loop = scoped_adaptation = False
    trains_on_more_ways = True

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        super().check_config(cfg)
        if cfg.model.fusion == "late":
            raise ConfigError("protonet needs a fused embedding; 'late' fusion has none (use attention/concat/...)")

    def __init__(self, model: FusionModel, options: ProtoNetOptions | None = None, **kwargs):
        super().__init__(model, options, **kwargs)
        self.scale = Scale().to(next(model.parameters()).device) if self.options.metric == "cosine" else None
        # The checkpointed module: the model alone for the paper's Euclidean form (as before), the model
        # and its scale for the cosine form.
        self._module = model if self.scale is None else nn.ModuleDict({"model": model, "scale": self.scale})

    @property
    def module(self) -> nn.Module:
        return self._module

    def _scale(self) -> Tensor | None:
        return None if self.scale is None else self.scale()

    def meta_backward(self, tasks: list[Episode]) -> dict[str, float]:
        tally = TaskTally()
        for task in tasks:
            protos = prototypes(self.model.features(task.support), task.support.labels, task.ways)
            logits = proto_logits(self.model.features(task.query), protos, self._scale())
            loss = F.cross_entropy(logits, task.query.labels)
            (loss / len(tasks)).backward()
            tally.add(loss.item(), logits.detach(), task.query.labels)
        return tally.metrics()

    def adapt(self, support: Batch, steps: int | None = None) -> nn.Module:
        ways = int(support.labels.max()) + 1
        with torch.no_grad():
            protos = prototypes(self.model.features(support), support.labels, ways)
            scale = self._scale()
        return PrototypeClassifier(self.model, protos, scale)

    # -- functional form: prototypes from the support features ----------------------------------
    def functional_form(self, episodes: list[Episode]) -> tuple[State, list[State]] | None:
        return {"model": model_parameters(self.model), "scale": self._scale()}, [{} for _ in episodes]

    def functional_adapt(self, state: State, support: Batch, ways: int) -> State:
        z = functional(self.model, state["model"], FusionModel.features, support)
        return {**state, "protos": prototypes(z, support.labels, ways)}

    def functional_logits(self, state: State, batch: Batch) -> Tensor:
        z = functional(self.model, state["model"], FusionModel.features, batch)
        return proto_logits(z, state["protos"], state["scale"])
