"""Fine-tuning baseline (Chen et al. 2019, "A Closer Look at Few-shot Classification"): supervised
pre-training on all meta-train classes, then a fresh N-way head fitted on the frozen features of
the support set (their "Baseline"). Every meta-learning claim should beat it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import RunConfig
from ..data.batch import Batch, Episode
from ..models.model import FusionModel
from ..models.spec import ModelSpec
from .base import ALGORITHMS, MetaAlgorithm, published
from .batched import State, functional, model_parameters

# The head is fitted as Chen et al. fit theirs: full-batch SGD with momentum and weight decay.
MOMENTUM, WEIGHT_DECAY = 0.9, 1e-3


def fused_features(model: FusionModel, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused feature z and the modality mask a head consumes (the model's ``forward_features``)."""
    features = model.forward_features(batch)
    return features.z, features.mask


class FeatureHeadClassifier(nn.Module):
    """Frozen fused features -> a task head (the learner this baseline's ``adapt`` returns)."""

    def __init__(self, model: FusionModel, head: nn.Module):
        super().__init__()
        self.module, self.head = model, head

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.head(*fused_features(self.module, batch))


@ALGORITHMS.register("finetune")
class FineTuneBaseline(MetaAlgorithm):
    name = "finetune"
    defaults = published(inner_lr=0.01, inner_steps_test=100, meta_batch=4)
    scoped_adaptation = False
    step_keys = ("inner_steps_test",)  # the head fit; pre-training has no inner loop

    @classmethod
    def config_kwargs(cls, cfg: RunConfig, spec: ModelSpec, train_classes: list[int]) -> dict:
        return dict(train_classes=train_classes, seed=cfg.train.seed)

    def __init__(self, model: FusionModel, options=None, *, train_classes: list[int], seed: int = 0, **kwargs):
        super().__init__(model, options, **kwargs)
        self.seed = seed
        self.class_index = {c: i for i, c in enumerate(sorted(train_classes))}
        model.reset_head(len(self.class_index))  # one head over every meta-train class

    def meta_backward(self, tasks: list[Episode]) -> dict[str, float]:
        """Plain supervised learning on the episodes' samples with their global class labels."""
        batch = Batch.cat([Batch.cat([t.support, t.query]) for t in tasks])
        labels = torch.cat(
            [
                torch.tensor(
                    [self.class_index[t.classes[y]] for y in torch.cat([t.support.labels, t.query.labels]).tolist()]
                )
                for t in tasks
            ]
        ).to(batch.labels.device)
        logits = self.model(batch)
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        return {"loss": loss.item(), "accuracy": (logits.argmax(1) == labels).float().mean().item()}

    def fit_head(
        self, head: nn.Module, params: dict[str, Tensor], z: Tensor, mask: Tensor, labels: Tensor, steps: int
    ) -> dict[str, Tensor]:
        """The head fit, a pure function of the head's parameters and the support features (so vmap maps it over
        episodes): ``steps`` full-batch SGD steps with momentum and weight decay (Chen et al.)."""
        momentum = None

        def loss(h: dict) -> Tensor:
            return F.cross_entropy(functional(head, h, nn.Module.__call__, z, mask), labels)

        for _ in range(steps):
            grads = torch.func.grad(loss)(params)
            step = {n: grads[n] + WEIGHT_DECAY * params[n] for n in params}
            momentum = step if momentum is None else {n: MOMENTUM * momentum[n] + step[n] for n in params}
            params = {n: params[n] - self.inner_lr_test * momentum[n] for n in params}
        return params

    def adapt(self, support: Batch, steps: int | None = None) -> nn.Module:
        """Fit a new head on frozen support features (``fit_head``)."""
        steps = self.inner_steps_test if steps is None else steps
        with torch.no_grad():
            z, mask = fused_features(self.model, support)
        head = self.new_head(int(support.labels.max()) + 1)
        with torch.enable_grad():
            fitted = self.fit_head(head, model_parameters(head), z, mask, support.labels, steps)
        with torch.no_grad():
            for n, p in head.named_parameters():
                p.copy_(fitted[n])
        return FeatureHeadClassifier(self.model, head)

    def new_head(self, ways: int) -> nn.Module:
        """The task head every adaptation starts from: drawn from ``seed``, not the global RNG, so an
        evaluation depends on the weights and the episode only (not on what ran before it)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return self.model.new_head(ways)

    # -- functional form: the same head fit, vmapped over episodes ----------------------------
    def functional_form(self, episodes: list[Episode]) -> tuple[State, list[State]] | None:
        heads = [self.new_head(e.ways) for e in episodes]
        return {"model": model_parameters(self.model), "head_module": heads[0]}, [
            {"head": model_parameters(h)} for h in heads
        ]

    def functional_adapt(self, state: State, support: Batch, ways: int) -> State:
        z, mask = functional(self.model, state["model"], fused_features, support)
        return {
            **state,
            "head": self.fit_head(
                state["head_module"], dict(state["head"]), z, mask, support.labels, self.inner_steps_test
            ),
        }

    def functional_logits(self, state: State, batch: Batch) -> torch.Tensor:
        z, mask = functional(self.model, state["model"], fused_features, batch)
        return functional(state["head_module"], state["head"], nn.Module.__call__, z, mask)
