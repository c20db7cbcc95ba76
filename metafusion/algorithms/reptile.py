"""Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms").

For each task: start from theta, take k inner optimizer steps on mini-batches of the support set,
reach theta~. The outer update is ``theta <- theta + eps * mean_tasks(theta~ - theta)``; it is written
into ``.grad`` as ``-(mean_tasks(theta~ - theta))`` so that any outer optimizer applies it (plain SGD
with lr = eps gives the paper's update; the paper anneals eps linearly to 0: ``train.schedule=linear``).

The inner loop is written once, as a pure function of the adapted parameters and the optimizer's state
(``inner_loop``): meta-training, test-time adaptation and the batched evaluation of many episodes under
vmap all run it. As in the paper's code, the training inner Adam (beta1 = 0) keeps its second moments
and step count across tasks; they are part of ``state_dict()`` and so of every checkpoint. Test-time
adaptation starts a state of its own: fresh, or (``algo.warm_test_optimizer``) a copy of the training
one, as the paper's code evaluates (its evaluation steps the training Adam, then restores its state).
A parameter with no gradient in a mini-batch (its modality absent from every row) keeps its value, and
its moments decay.
"""

from __future__ import annotations

import copy
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
from ..models.spec import ModelSpec
from .base import ALGORITHMS, MetaAlgorithm, TaskTally
from .batched import State, functional, model_parameters

ADAM_BETA2, ADAM_EPS = 0.999, 1e-8  # torch's defaults; beta1 = 0 as in the paper


def inner_update(p: Tensor, g: Tensor, v: Tensor, step: float, lr: float, optimizer: str) -> tuple[Tensor, Tensor]:
    """One inner step of a parameter: SGD, or Adam with beta1 = 0 (its first moment is the gradient), whose
    second moment ``v`` and step count (after this step) ``step`` give ``p - lr g / (sqrt(v / (1 - b2^t)) + eps)``."""
    if optimizer == "sgd":
        return p - lr * g, v
    v = v * ADAM_BETA2 + (1 - ADAM_BETA2) * g * g
    return p - lr * g / (v.sqrt() / math.sqrt(1 - ADAM_BETA2**step) + ADAM_EPS), v


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
    defaults = dict(
        inner_lr=1e-3,
        inner_steps=5,
        inner_steps_test=50,
        meta_batch=5,
        meta_lr=1.0,
        optimizer="sgd",
        schedule="linear",
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
        self.names = [n for n, _ in model.named_parameters() if n in scope]  # the adapted parameters
        # the training inner Adam's second moments and step counts, kept across tasks (the paper's code)
        self.moments = {n: torch.zeros_like(p) for n, p in model.named_parameters() if n in scope}
        self.steps = dict.fromkeys(self.moments, 0.0)
        self.generator = torch.Generator().manual_seed(seed)

    def inner_loop(
        self, params: dict[str, Tensor], support: Batch, batches: list[Tensor], lr: float, state: tuple[dict, dict]
    ) -> tuple[dict[str, Tensor], tuple[dict, dict], Tensor]:
        """One inner optimizer step per mini-batch (``batches``: rows of ``support``) from ``params`` (the adapted
        parameters; the others are the model's) and ``state`` (Adam's second moment and step count of each):
        the adapted parameters, the state after the steps and the last step's loss. A pure function of its
        tensors, which vmap maps over episodes."""
        moments, steps = dict(state[0]), dict(state[1])
        params, loss = dict(params), torch.zeros(())
        for rows in batches:
            batch = support.index(rows.to(support.mask.device))

            def batch_loss(adapted: dict, batch: Batch = batch) -> Tensor:
                return F.cross_entropy(functional(self.model, adapted, nn.Module.__call__, batch), batch.labels)

            grads, loss = torch.func.grad_and_value(batch_loss)(params)
            for n in params:
                steps[n] += 1
                params[n], moments[n] = inner_update(
                    params[n], grads[n], moments[n], steps[n], lr, self.inner_optimizer
                )
        return params, (moments, steps), loss

    def _test_state(self) -> tuple[dict, dict]:
        """Where a test-time adaptation's Adam starts: a copy of the training one (``warm_test_optimizer``, where
        each moment fits its parameter: a head resized for another task starts fresh), else zeros."""
        params = dict(self.model.named_parameters())
        moments, steps = {n: torch.zeros_like(params[n]) for n in self.names}, dict.fromkeys(self.names, 0.0)
        for n, v in self.moments.items() if self.warm_test_optimizer else ():
            if v.shape == params[n].shape:
                moments[n], steps[n] = v.clone(), self.steps[n]
        return moments, steps

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

    def _adapted_parameters(self) -> dict[str, Tensor]:
        params = dict(self.model.named_parameters())
        return {n: params[n].detach() for n in self.names}

    def meta_backward(self, tasks: list[Episode]) -> dict[str, float]:
        theta = self._adapted_parameters()
        delta = {n: torch.zeros_like(p) for n, p in theta.items()}
        tally = TaskTally()
        state = (self.moments, self.steps)
        for task in tasks:
            batches = self._minibatches(len(task.support), self.inner_steps, self.generator)
            adapted, state, loss = self.inner_loop(theta, task.support, batches, self.inner_lr, state)
            for n in delta:
                delta[n] += adapted[n] - theta[n]
            # Reptile's objective has no query set: its "loss" is the support loss of the last inner step
            # (scoring queries would cost a forward pass per task for the logs alone; docs/architecture.md).
            tally.add(loss.item())
        self.moments, self.steps = state
        params = dict(self.model.named_parameters())
        for n, d in delta.items():
            g = -d / len(tasks)
            params[n].grad = g if params[n].grad is None else params[n].grad + g
        return tally.metrics()

    def adapt(self, support: Batch, steps: int | None = None) -> nn.Module:
        steps = self.inner_steps_test if steps is None else steps
        batches = self._minibatches(len(support), steps, torch.Generator().manual_seed(0))  # a fixed order:
        with torch.enable_grad():  # evaluation is a function of the weights
            adapted, _, _ = self.inner_loop(
                self._adapted_parameters(), support, batches, self.inner_lr_test, self._test_state()
            )
        learner = copy.deepcopy(self.model)
        with torch.no_grad():
            for n, p in learner.named_parameters():
                if n in adapted:
                    p.copy_(adapted[n])
        return learner

    # -- functional form: the same inner loop, vmapped over episodes ------------------------------
    def functional_form(self, episodes: list[Episode]) -> tuple[State, list[State]] | None:
        # The mini-batch rows are drawn here (vmap allows no random op inside): the same for every
        # episode of a support size, as ``adapt``'s fixed generator draws them.
        batches = {
            n: self._minibatches(n, self.inner_steps_test, torch.Generator().manual_seed(0))
            for n in {len(e.support) for e in episodes}
        }
        moments, steps = self._test_state()
        state = {"model": model_parameters(self.model), "batches": batches, "moments": moments, "steps": steps}
        return state, [{} for _ in episodes]

    def functional_adapt(self, state: State, support: Batch, ways: int) -> State:
        params = {n: state["model"][n] for n in self.names}
        batches, start = state["batches"][len(support)], (state["moments"], state["steps"])
        adapted, _, _ = self.inner_loop(params, support, batches, self.inner_lr_test, start)
        return {**state, "model": {**state["model"], **adapted}}

    def state_dict(self) -> dict:
        return {"moments": self.moments, "steps": self.steps, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if "inner_optimizer" in state:  # metafusion 0.1 kept a torch Adam: its state per adapted parameter
            kept = state["inner_optimizer"]["state"]
            for i, n in enumerate(self.names):
                if i in kept:
                    self.moments[n], self.steps[n] = kept[i]["exp_avg_sq"], float(kept[i]["step"])
        else:
            self.moments, self.steps = dict(state["moments"]), dict(state["steps"])
        self.generator.set_state(state["generator"])
