"""Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms").

For each task: start from theta, take k inner optimizer steps on mini-batches of the support set,
reach theta~. The outer update is ``theta <- theta + eps * mean_tasks(theta~ - theta)``; it is written
into ``.grad`` as ``-(mean_tasks(theta~ - theta))`` so that any outer optimizer applies it (plain SGD
with lr = eps gives the paper's update; the paper anneals eps linearly to 0: ``train.schedule=linear``).

One working copy of the model is made once and reloaded from theta for every task (no per-task deep
copies or optimizer rebuilds). As in the paper's code, the inner Adam (beta1 = 0) keeps its moment
estimates across tasks; they are part of ``state_dict()`` and so of every checkpoint. Evaluation
adapts a separate copy with a fresh inner optimizer, so it never disturbs training state.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..data.batch import Batch, Episode
from ..models.model import FusionModel
from .base import ALGORITHMS, MetaAlgorithm, TaskTally, cross_entropy


def make_inner_optimizer(name: str, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.0, 0.999), fused=True)  # beta1 = 0 as in the paper
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"unknown inner optimizer {name!r}; choose adam or sgd")


@ALGORITHMS.register("reptile")
class Reptile(MetaAlgorithm):
    name = "reptile"

    def __init__(self, model: FusionModel, *, inner_batch: int = 10, inner_optimizer: str = "adam",
                 seed: int = 0, **kwargs):
        kwargs.pop("first_order", None)
        super().__init__(model, **kwargs)
        self.inner_batch = inner_batch
        self.inner_optimizer = inner_optimizer
        self._adapted = model.adapted(self.adapt_scope)
        self.fast = copy.deepcopy(model)
        self.inner_opt = make_inner_optimizer(inner_optimizer, self._scoped(self.fast), self.inner_lr)
        self.generator = torch.Generator().manual_seed(seed)

    def _scoped(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p, a in zip(model.parameters(), self._adapted) if a]

    @torch.no_grad()
    def _load_meta_weights(self, target: nn.Module) -> None:
        for dst, src in zip(target.parameters(), self.model.parameters()):
            dst.copy_(src)

    def _inner_loop(self, learner: nn.Module, opt: torch.optim.Optimizer, data: Batch, steps: int,
                    generator: torch.Generator) -> float:
        """``steps`` optimizer steps on mini-batches of ``inner_batch`` rows, cycling through a
        shuffled copy of ``data`` (one epoch = ceil(len / inner_batch) steps)."""
        n, loss = len(data), torch.tensor(0.0)
        order = torch.randperm(n, generator=generator)
        pos = 0
        for _ in range(steps):
            if pos >= n:
                order, pos = torch.randperm(n, generator=generator), 0
            rows = order[pos:pos + self.inner_batch]
            pos += self.inner_batch
            loss = cross_entropy(learner, data.index(rows))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return loss.item()

    def meta_backward(self, tasks: list[Episode]) -> dict[str, float]:
        meta = self._scoped(self.model)
        delta = [torch.zeros_like(p) for p in meta]
        tally = TaskTally()
        for task in tasks:
            self._load_meta_weights(self.fast)
            loss = self._inner_loop(self.fast, self.inner_opt, task.support, self.inner_steps, self.generator)
            with torch.no_grad():
                for d, fast, slow in zip(delta, self._scoped(self.fast), meta):
                    d += fast - slow
            # Reptile trains on support sets alone; scoring the query set here would cost a forward pass
            # per task for the logs only, so training logs the inner loss and validation the accuracy.
            tally.add(loss)
        for p, d in zip(meta, delta):
            g = -d / len(tasks)
            p.grad = g if p.grad is None else p.grad + g
        return tally.metrics()

    def adapt(self, support: Batch, steps: int | None = None) -> nn.Module:
        steps = self.inner_steps_test if steps is None else steps
        learner = copy.deepcopy(self.model)
        opt = make_inner_optimizer(self.inner_optimizer, self._scoped(learner), self.inner_lr_test)
        with torch.enable_grad():  # a fixed mini-batch order: evaluation is a function of the weights
            self._inner_loop(learner, opt, support, steps, torch.Generator().manual_seed(0))
        return learner

    def state_dict(self) -> dict:
        return {"inner_optimizer": self.inner_opt.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.inner_opt.load_state_dict(state["inner_optimizer"])
        self.generator.set_state(state["generator"])
