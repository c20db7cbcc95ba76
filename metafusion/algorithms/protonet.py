"""Prototypical Networks (Snell et al. 2017) on the fused embedding: no inner loop; a query's logits
are negative squared Euclidean distances to the class means of the support embeddings."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.batch import Batch, Episode
from ..models.model import FusionModel
from .base import ALGORITHMS, MetaAlgorithm, TaskTally


def prototypes(z: Tensor, labels: Tensor, ways: int) -> Tensor:
    """Class means ``[ways, D]`` of embeddings ``z [N, D]``."""
    onehot = F.one_hot(labels, ways).to(z.dtype)  # (N, ways)
    return onehot.T @ z / onehot.sum(0).unsqueeze(1)


def proto_logits(z: Tensor, protos: Tensor) -> Tensor:
    """``-||z_i - p_c||^2``, ``[N, ways]``."""
    return -torch.cdist(z, protos).pow(2)


class PrototypeClassifier(nn.Module):
    """The learner ProtoNet's ``adapt`` returns: the embedding model plus fixed prototypes."""

    def __init__(self, model: FusionModel, protos: Tensor):
        super().__init__()
        self.module = model
        self.register_buffer("protos", protos)

    def forward(self, batch: Batch) -> Tensor:
        return proto_logits(self.module.features(batch), self.protos)


@ALGORITHMS.register("protonet")
class ProtoNet(MetaAlgorithm):
    name = "protonet"

    def meta_backward(self, tasks: list[Episode]) -> dict[str, float]:
        tally = TaskTally()
        for task in tasks:
            protos = prototypes(self.model.features(task.support), task.support.labels, task.ways)
            logits = proto_logits(self.model.features(task.query), protos)
            loss = F.cross_entropy(logits, task.query.labels)
            (loss / len(tasks)).backward()
            tally.add(loss.item(), logits.detach(), task.query.labels)
        return tally.metrics()

    def adapt(self, support: Batch, steps: int | None = None) -> nn.Module:
        ways = int(support.labels.max()) + 1
        with torch.no_grad():
            protos = prototypes(self.model.features(support), support.labels, ways)
        return PrototypeClassifier(self.model, protos)
