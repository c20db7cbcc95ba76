"""Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms").

For each task: start from theta, take k inner optimizer steps on mini-batches of the support set,
reach theta~. The outer update is ``theta <- theta + eps * mean_tasks(theta~ - theta)``; it is written
into ``.grad`` as ``-(mean_tasks(theta~ - theta))`` so that any outer optimizer applies it (plain SGD
with lr = eps gives the paper's update; the paper anneals eps linearly to 0: ``train.schedule=linear``).

One working copy of the model is made once and reloaded from theta for every task (no per-task deep
copies or optimizer rebuilds). As in the paper's code, the inner Adam (beta1 = 0) keeps its moment
estimates across tasks; they are part of ``state_dict()`` and so of every checkpoint. Evaluation
adapts a separate copy with its own inner optimizer, so it never disturbs training state: a fresh one, or
(``algo.warm_test_optimizer``) one that starts from the training inner optimizer's moments, as the paper's
code evaluates (its evaluation steps the training Adam, then restores its state).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RunConfig
from ..data.batch import Batch, Episode
from ..errors import ConfigError, InputError
from ..models.model import FusionModel
from ..models.spec import ModelSpec
from .base import ALGORITHMS, MetaAlgorithm, TaskTally, cross_entropy, published
from .batched import State, functional, model_parameters

ADAM_BETA2, ADAM_EPS = 0.999, 1e-8  # torch's defaults; beta1 = 0 as in the paper


def make_inner_optimizer(name: str, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """``ReptileOptions.inner_optimizer`` ``name``: Adam with beta1 = 0 (the paper's), or plain SGD."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.0, ADAM_BETA2), eps=ADAM_EPS, fused=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise InputError(f"unknown inner optimizer {name!r}; choose one of: adam, sgd")


@dataclass
class ReptileOptions:
    """``algo.*`` keys of Reptile (Nichol et al. 2018: inner Adam with beta1 = 0, mini-batches of 10)."""

    inner_batch: int = 10  # rows per inner mini-batch
    inner_optimizer: Literal["adam", "sgd"] = "adam"
    # the test-time inner Adam starts from the moments (and step count) that meta-training's inner loop
    # left, as the Reptile paper's code evaluates, instead of from a fresh optimizer
    warm_test_optimizer: bool = False

    def __post_init__(self) -> None:
        if self.inner_batch < 1:
            raise ConfigError(f"algo.inner_batch must be >= 1, got {self.inner_batch}")
        if self.warm_test_optimizer and self.inner_optimizer == "sgd":
            raise ConfigError("algo.warm_test_optimizer needs algo.inner_optimizer=adam (plain SGD keeps no state)")


@ALGORITHMS.register("reptile")
class Reptile(MetaAlgorithm):
    name = "reptile"
    Options = ReptileOptions
    step_keys = ("inner_steps", "inner_steps_test")
    # Nichol et al. 2018: inner Adam (beta1 = 0) lr 1e-3, inner batch 10, 5 steps (50 at test); outer SGD
    # step 1.0 annealed linearly to 0, meta-batch 5.
    defaults = published(
        inner_lr=1e-3, inner_steps=5, inner_steps_test=50, meta_batch=5, meta_lr=1.0, optimizer="sgd", schedule="linear"
    )

    @classmethod
    def config_kwargs(cls, cfg: RunConfig, spec: ModelSpec, train_classes: list[int]) -> dict:
        return dict(seed=cfg.train.seed)

    def __init__(
        self,
        model: FusionModel,
        *,
        inner_batch: int = 10,
        inner_optimizer: str = "adam",
        warm_test_optimizer: bool = False,
        seed: int = 0,
        **kwargs,
    ):
        super().__init__(model, **kwargs)
        self.inner_batch = inner_batch
        self.inner_optimizer = inner_optimizer
        self.warm_test_optimizer = warm_test_optimizer
        scope = model.adapted(self.adapt_scope)
        self._adapted = [n in scope for n, _ in model.named_parameters()]  # in parameters() order
        self.fast = copy.deepcopy(model)
        self.inner_opt = make_inner_optimizer(inner_optimizer, self._scoped(self.fast), self.inner_lr)
        self.generator = torch.Generator().manual_seed(seed)

    def _scoped(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p, a in zip(model.parameters(), self._adapted) if a]

    def _trained_moments(self) -> list[dict[str, torch.Tensor]]:
        """Per adapted parameter (in ``_scoped`` order), the training inner Adam's state to start a test-time
        adaptation from: empty where it keeps none, or none that fits (a head resized for another task)."""
        if not self.warm_test_optimizer:
            return [{} for _ in self._scoped(self.model)]
        out = []
        for fast, meta in zip(self._scoped(self.fast), self._scoped(self.model)):
            state = self.inner_opt.state.get(fast, {})
            fits = "exp_avg_sq" in state and state["exp_avg_sq"].shape == meta.shape
            # copies (evaluation never steps the training state); Adam's ``step`` stays a float32 count, the
            # moments follow the parameters' dtype
            out.append(
                {k: v.to(v.dtype if k == "step" else meta.dtype, copy=True) for k, v in state.items()} if fits else {}
            )
        return out

    @torch.no_grad()
    def _load_meta_weights(self, target: nn.Module) -> None:
        for dst, src in zip(target.parameters(), self.model.parameters()):
            dst.copy_(src)

    def _minibatches(self, n: int, steps: int, generator: torch.Generator) -> list[torch.Tensor]:
        """The rows of each of ``steps`` mini-batches of ``inner_batch`` rows, cycling through shuffled
        copies of ``range(n)`` (one epoch = ceil(n / inner_batch) steps)."""
        order, pos, out = torch.randperm(n, generator=generator), 0, []
        for _ in range(steps):
            if pos >= n:
                order, pos = torch.randperm(n, generator=generator), 0
            out.append(order[pos : pos + self.inner_batch])
            pos += self.inner_batch
        return out

    def _inner_loop(
        self, learner: nn.Module, opt: torch.optim.Optimizer, data: Batch, steps: int, generator: torch.Generator
    ) -> float:
        """``steps`` optimizer steps on the mini-batches of ``_minibatches``."""
        loss = torch.tensor(0.0)
        for rows in self._minibatches(len(data), steps, generator):
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
            # Reptile's objective has no query set: its "loss" is the support loss of the last inner step
            # (scoring queries would cost a forward pass per task for the logs alone; docs/architecture.md).
            tally.add(loss)
        for p, d in zip(meta, delta):
            g = -d / len(tasks)
            p.grad = g if p.grad is None else p.grad + g
        return tally.metrics()

    def adapt(self, support: Batch, steps: int | None = None) -> nn.Module:
        steps = self.inner_steps_test if steps is None else steps
        learner = copy.deepcopy(self.model)
        params = self._scoped(learner)
        opt = make_inner_optimizer(self.inner_optimizer, params, self.inner_lr_test)
        for p, state in zip(params, self._trained_moments()):
            if state:
                opt.state[p] = state
        with torch.enable_grad():  # a fixed mini-batch order: evaluation is a function of the weights
            self._inner_loop(learner, opt, support, steps, torch.Generator().manual_seed(0))
        return learner

    # -- functional form: the test-time inner loop as Adam/SGD steps on a dict of parameters -----
    def functional_form(self, episodes: list[Episode]) -> tuple[State, list[State]] | None:
        # The mini-batch rows are drawn here (vmap allows no random op inside): the same for every
        # episode of a support size, as ``adapt``'s fixed generator draws them.
        batches = {
            n: self._minibatches(n, self.inner_steps_test, torch.Generator().manual_seed(0))
            for n in {len(e.support) for e in episodes}
        }
        # torch's Adam skips a parameter whose gradient is None (its step count stays); a functional
        # gradient is zero instead. They differ only when a mini-batch carries none of a modality, so
        # then the episodes adapt one by one.
        for e in episodes:
            columns = [e.support.modalities.index(m) for m in self.model.modalities]
            for rows in batches[len(e.support)]:
                mask = e.support.mask[rows.to(e.support.mask.device)][:, columns]
                if self.inner_optimizer == "adam" and not bool(mask.any(0).all()):
                    return None
        names = [n for (n, _), a in zip(self.model.named_parameters(), self._adapted) if a]
        params = model_parameters(self.model)
        # Adam's v and step count to start from (beta1 = 0: m is the gradient): zeros, or the trained ones
        start = {
            n: (m["exp_avg_sq"], float(m["step"])) if m else (torch.zeros_like(params[n]), 0.0)
            for n, m in zip(names, self._trained_moments())
        }
        return {"model": params, "names": names, "batches": batches, "start": start}, [{} for _ in episodes]

    def functional_adapt(self, state: State, support: Batch, ways: int) -> State:
        params, names, lr = dict(state["model"]), state["names"], self.inner_lr_test
        second = {n: v for n, (v, _) in state["start"].items()}
        for t, rows in enumerate(state["batches"][len(support)], 1):
            batch = support.index(rows.to(support.mask.device))

            def loss(adapted: dict, frozen: dict = params, batch: Batch = batch) -> torch.Tensor:
                return F.cross_entropy(
                    functional(self.model, {**frozen, **adapted}, nn.Module.__call__, batch), batch.labels
                )

            grads = torch.func.grad(loss)({n: params[n] for n in names})
            for n in names:
                if self.inner_optimizer == "sgd":
                    params[n] = params[n] - lr * grads[n]
                    continue
                second[n] = second[n] * ADAM_BETA2 + (1 - ADAM_BETA2) * grads[n] * grads[n]
                denom = second[n].sqrt() / math.sqrt(1 - ADAM_BETA2 ** (state["start"][n][1] + t)) + ADAM_EPS
                params[n] = params[n] - lr * grads[n] / denom
        return {**state, "model": params}

    def state_dict(self) -> dict:
        return {"inner_optimizer": self.inner_opt.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.inner_opt.load_state_dict(state["inner_optimizer"])
        self.generator.set_state(state["generator"])
