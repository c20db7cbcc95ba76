"""Fine-tuning baseline (Chen et al. 2019, "A Closer Look at Few-shot Classification"): supervised
pre-training on all meta-train classes, then a fresh N-way head fitted on the frozen features of
the support set (their "Baseline"). Every meta-learning claim should beat it."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batch import Batch, Episode
from ..models.model import FusionModel
from .base import ALGORITHMS, MetaAlgorithm


class FeatureHeadClassifier(nn.Module):
    """Frozen fused features -> a task head (the learner this baseline's ``adapt`` returns)."""

    def __init__(self, model: FusionModel, head: nn.Module):
        super().__init__()
        self.module, self.head = model, head

    def forward(self, batch: Batch) -> torch.Tensor:
        h, mask = self.module.encode(batch)
        z, _ = self.module.fusion(h, mask)
        return self.head(z, mask)


@ALGORITHMS.register("finetune")
class FineTuneBaseline(MetaAlgorithm):
    name = "finetune"

    def __init__(self, model: FusionModel, *, train_classes: list[int], **kwargs):
        super().__init__(model, **kwargs)
        self.class_index = {c: i for i, c in enumerate(sorted(train_classes))}
        model.reset_head(len(self.class_index))  # one head over every meta-train class

    def meta_backward(self, tasks: list[Episode]) -> dict[str, float]:
        """Plain supervised learning on the episodes' samples with their global class labels."""
        batch = Batch.cat([Batch.cat([t.support, t.query]) for t in tasks])
        labels = torch.cat([torch.tensor([self.class_index[t.classes[y]] for y in
                                          torch.cat([t.support.labels, t.query.labels]).tolist()])
                            for t in tasks])
        logits = self.model(batch)
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        return {"loss": loss.item(), "accuracy": (logits.argmax(1) == labels).float().mean().item()}

    def adapt(self, support: Batch, steps: int | None = None) -> nn.Module:
        """Fit a new head on frozen support features: SGD, momentum 0.9, full batch (Chen et al.)."""
        steps = self.inner_steps_test if steps is None else steps
        ways = int(support.labels.max()) + 1
        with torch.no_grad():
            h, mask = self.model.encode(support)
            z, _ = self.model.fusion(h, mask)
        head = self.model.fusion.make_head(ways)
        opt = torch.optim.SGD(head.parameters(), lr=self.inner_lr_test, momentum=0.9, weight_decay=1e-3)
        with torch.enable_grad():
            for _ in range(steps):
                loss = F.cross_entropy(head(z, mask), support.labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return FeatureHeadClassifier(self.model, head)
