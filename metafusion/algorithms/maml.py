"""MAML (Finn et al. 2017), first-order MAML, ANIL (Raghu et al. 2019) and MetaSGD (Li et al. 2017),
all on learn2learn's ``MAML`` / ``MetaSGD`` wrappers (``clone()`` + differentiable updates)."""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from .._learn2learn import MAML as L2LMAML
from .._learn2learn import MetaSGD as L2LMetaSGD
from .._learn2learn import maml_update, meta_sgd_update
from ..data.batch import Batch, Episode
from ..models.encoders import memory_format
from ..models.model import FusionModel
from .base import ALGORITHMS, MetaAlgorithm, TaskTally, cross_entropy


@ALGORITHMS.register("maml")
class MAML(MetaAlgorithm):
    """Inner loop: ``steps`` SGD steps on the support loss of a learn2learn clone; outer loss: the
    query loss of the adapted clone, averaged over the meta-batch. ``first_order`` drops the
    second-order terms (FOMAML). Only parameters in the adaptation scope move in the inner loop."""

    name = "maml"

    def __init__(self, model: FusionModel, *, first_order: bool = False, learn_inner_lr: bool = False,
                 **kwargs):
        super().__init__(model, **kwargs)
        self.first_order = first_order
        self.wrapper = self._wrap(model)
        self._adapted = model.adapted(self.adapt_scope)
        if not any(self._adapted):
            raise ValueError(f"adaptation scope {self.adapt_scope!r} selects no trainable parameter")
        # Optional learned inner learning rate per layer (one scalar per adapted parameter tensor),
        # meta-learned with the weights; off by default, as in the MAML paper.
        self.layer_lrs = nn.ParameterList(
            [nn.Parameter(torch.tensor(float(self.inner_lr), dtype=p.dtype, device=p.device))
             for p, a in zip(model.parameters(), self._adapted) if a]
        ) if learn_inner_lr else None
        self._module = nn.ModuleDict({"maml": self.wrapper, **({"layer_lrs": self.layer_lrs}
                                                               if learn_inner_lr else {})})

    def _wrap(self, model: FusionModel) -> nn.Module:
        return L2LMAML(model, lr=self.inner_lr, first_order=self.first_order, allow_unused=True)

    @property
    def module(self) -> nn.Module:
        return self._module

    def _step(self, learner: nn.Module, batch: Batch, lr: float, create_graph: bool) -> None:
        # A pass differentiated twice runs its CNNs in NCHW (cheaper double backward through BatchNorm);
        # measured +4 % (1 inner step) and +8 % (5 steps) second-order MAML tasks/s.
        with memory_format(learner, torch.contiguous_format) if create_graph else nullcontext():
            loss = cross_entropy(learner, batch)
        params = [p for p, a in zip(learner.module.parameters(), self._adapted) if a]
        grads = list(torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True))
        if self.layer_lrs is not None:  # learned rates replace inner_lr (and inner_lr_test)
            grads, lr = [None if g is None else r * g for g, r in zip(grads, self.layer_lrs)], 1.0
        it = iter(grads)
        self._update(learner, lr, [next(it) if a else None for a in self._adapted])

    def _update(self, learner: nn.Module, lr: float, grads: list) -> None:
        maml_update(learner.module, lr, grads)

    def _adapt(self, support: Batch, steps: int, lr: float, create_graph: bool) -> nn.Module:
        learner = self.wrapper.clone()
        for _ in range(steps):
            self._step(learner, support, lr, create_graph)
        return learner

    def meta_backward(self, tasks: list[Episode]) -> dict[str, float]:
        tally = TaskTally()
        for task in tasks:
            learner = self._adapt(task.support, self.inner_steps, self.inner_lr, not self.first_order)
            logits = learner(task.query)
            loss = torch.nn.functional.cross_entropy(logits, task.query.labels)
            (loss / len(tasks)).backward()
            tally.add(loss.item(), logits.detach(), task.query.labels)
        return tally.metrics()

    def adapt(self, support: Batch, steps: int | None = None) -> nn.Module:
        steps = self.inner_steps_test if steps is None else steps
        with torch.enable_grad():
            return self._adapt(support, steps, self.inner_lr_test, create_graph=False)


@ALGORITHMS.register("fomaml")
class FOMAML(MAML):
    """First-order MAML: the outer gradient is the query gradient at the adapted parameters."""

    name = "fomaml"

    def __init__(self, model: FusionModel, **kwargs):
        kwargs["first_order"] = True
        super().__init__(model, **kwargs)


@ALGORITHMS.register("anil")
class ANIL(MAML):
    """Almost No Inner Loop: MAML that adapts only the head (the model's ``head`` scope)."""

    name = "anil"

    def __init__(self, model: FusionModel, **kwargs):
        kwargs["adapt_scope"] = "head"
        super().__init__(model, **kwargs)


@ALGORITHMS.register("metasgd")
class MetaSGD(MAML):
    """MAML whose inner learning rate is a learned tensor per parameter (learn2learn ``MetaSGD``).
    The learned rates are meta-parameters: the outer optimizer updates them with the rest."""

    name = "metasgd"

    def _wrap(self, model: FusionModel) -> nn.Module:
        return L2LMetaSGD(model, lr=self.inner_lr, first_order=self.first_order)

    def _update(self, learner: nn.Module, lr: float, grads: list) -> None:
        # learn2learn's meta_sgd_update skips parameters whose gradient is None (unused in this task).
        meta_sgd_update(learner.module, learner.lrs, grads)
