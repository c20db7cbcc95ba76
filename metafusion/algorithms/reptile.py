"""Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms").

For each task: start from theta, take k inner optimizer steps on mini-batches of the support set,
reach theta~. The outer update is ``theta <- theta + eps * mean_tasks(theta~ - theta)``; it is written
into ``.grad`` as ``-(mean_tasks(theta~ - theta))`` so that any outer optimizer applies it (plain SGD
with lr = eps gives the paper's update; the paper anneals eps linearly to 0: ``train.schedule=linear``).

The inner loop is written once (``inner_loop``): a pure function of the adapted parameters, flattened into
one vector, and the inner optimizer's state, which meta-training, test-time adaptation and the batched
evaluation of many episodes under vmap all run. The inner optimizer is Adam with beta1 = 0 (the paper's;
its first moment is the gradient) or plain SGD. As in the paper's code, the training Adam keeps its second
moments and step counts across tasks; they are part of ``state_dict()`` and so of every checkpoint.
Test-time adaptation starts a state of its own: fresh, or (``algo.warm_test_optimizer``) a copy of the
training one, as the paper's code evaluates (its evaluation steps the training Adam, then restores it).
A parameter no mini-batch row reaches (its modality absent from every row) has a zero gradient there: its
value stays, its second moment decays and its step counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import RunConfig
from ..data.batch import Batch, Episode
from ..errors import ConfigError
from ..models.model import FusionModel
from ..models.spec import ModelSpec
from .base import ALGORITHMS, MetaAlgorithm, TaskTally, published
from .batched import State, functional, model_parameters, with_parameters

ADAM_BETA2, ADAM_EPS = 0.999, 1e-8  # torch's defaults; beta1 = 0 as in the paper


class AdamState(NamedTuple):
    """The inner Adam's state, one entry per element of the flat adapted-parameter vector: the second moment
    and the step count (per element, so that parameters that joined at different times, e.g. a head resized
    for another task, each keep their own bias correction)."""

    second_moment: Tensor
    steps: Tensor

    @staticmethod
    def fresh(like: Tensor) -> AdamState:
        return AdamState(torch.zeros_like(like), torch.zeros_like(like))


def inner_update(theta: Tensor, grad: Tensor, state: AdamState, lr: float, optimizer: str) -> tuple[Tensor, AdamState]:
    """One inner step on the flat parameter vector: SGD, or Adam with beta1 = 0,
    ``theta - lr g / (sqrt(v / (1 - beta2^t)) + eps)`` with ``v`` the running mean of ``g^2`` and ``t`` the step."""
    if optimizer == "sgd":
        return theta - lr * grad, state
    v = torch.addcmul(state.second_moment * ADAM_BETA2, grad, grad, value=1 - ADAM_BETA2)
    t = state.steps + 1
    denominator = (v / (1 - torch.pow(ADAM_BETA2, t))).sqrt_().add_(ADAM_EPS)
    return torch.addcdiv(theta, grad, denominator, value=-lr), AdamState(v, t)


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

    def __init__(self, model: FusionModel, options: ReptileOptions | None = None, *, seed: int = 0, **kwargs):
        super().__init__(model, options, **kwargs)
        self.inner_batch = self.options.inner_batch
        self.inner_optimizer = self.options.inner_optimizer
        self.warm_test_optimizer = self.options.warm_test_optimizer
        # the training inner Adam's state, over the adapted parameters as meta-training sees them
        self.layout = self._layout()
        self.adam = AdamState.fresh(self._flat_parameters())
        self.generator = torch.Generator().manual_seed(seed)

    # -- the adapted parameters as one flat vector ------------------------------------------------
    def _layout(self) -> list[tuple[str, torch.Size]]:
        """Name and shape of each adapted parameter, in the model's order (the flat vector's segments)."""
        scope = self.model.adapted(self.adapt_scope)
        return [(n, p.shape) for n, p in self.model.named_parameters() if n in scope]

    def _flat_parameters(self) -> Tensor:
        params = dict(self.model.named_parameters())
        return torch.cat([params[n].detach().flatten() for n, _ in self._layout()])

    @staticmethod
    def _unflatten(flat: Tensor, layout: list[tuple[str, torch.Size]]) -> dict[str, Tensor]:
        sizes = [shape.numel() for _, shape in layout]
        return {n: piece.view(shape) for (n, shape), piece in zip(layout, flat.split(sizes, dim=-1))}

    def inner_loop(
        self, theta: Tensor, support: Batch, batches: list[Tensor], lr: float, state: AdamState, vmapped: bool = False
    ) -> tuple[Tensor, AdamState, Tensor]:
        """One inner optimizer step per mini-batch (``batches``: rows of ``support``) from the flat adapted
        parameters ``theta`` (the others are the model's) and the optimizer ``state``: the adapted parameters,
        the state after the steps and the last step's loss. A pure function of its tensors, which vmap maps
        over episodes (``vmapped``: it runs under vmap)."""
        layout, loss = self._layout(), torch.zeros(())
        with torch.no_grad():
            for rows in batches:
                batch = support.index(rows.to(support.mask.device))
                grad, loss = self._gradient(theta, batch, layout, vmapped)
                theta, state = inner_update(theta, grad, state, lr, self.inner_optimizer)
        return theta, state, loss

    def _gradient(
        self, theta: Tensor, batch: Batch, layout: list[tuple[str, torch.Size]], vmapped: bool
    ) -> tuple[Tensor, Tensor]:
        """The loss on ``batch`` and its gradient with respect to the flat adapted parameters: by torch.func.grad
        under vmap, else by torch.autograd.grad (the same numbers at about half the CPU time)."""

        def loss_of(flat: Tensor) -> Tensor:
            logits = functional(self.model, self._unflatten(flat, layout), nn.Module.__call__, batch)
            return F.cross_entropy(logits, batch.labels)

        if vmapped:
            return torch.func.grad_and_value(loss_of)(theta)
        with torch.enable_grad():
            theta = theta.detach().requires_grad_()
            loss = loss_of(theta)
            return torch.autograd.grad(loss, theta)[0], loss.detach()

    def _test_state(self) -> AdamState:
        """Where a test-time adaptation's Adam starts: fresh, or a copy of the training one
        (``warm_test_optimizer``) for each parameter whose shape it was trained with (a head resized for
        another task starts fresh)."""
        layout, trained, device = self._layout(), dict(self.layout), next(self.model.parameters()).device

        def start(values: Tensor) -> Tensor:  # one field of the state: the trained segment where it fits, else 0
            pieces = self._unflatten(values, self.layout)
            fits = {n: self.warm_test_optimizer and trained.get(n) == shape for n, shape in layout}
            return torch.cat([pieces[n].flatten() if fits[n] else values.new_zeros(s.numel()) for n, s in layout])

        return AdamState(*(start(values).to(device) for values in self.adam))

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

    def meta_backward(self, tasks: list[Episode]) -> dict[str, float]:
        theta = self._flat_parameters()
        delta, tally = torch.zeros_like(theta), TaskTally()
        state = AdamState(*(x.to(theta.device) for x in self.adam))  # a model moved after it was built
        for task in tasks:
            batches = self._minibatches(len(task.support), self.inner_steps, self.generator)
            adapted, state, loss = self.inner_loop(theta, task.support, batches, self.inner_lr, state)
            delta += adapted - theta
            # Reptile's objective has no query set: its "loss" is the support loss of the last inner step
            # (scoring queries would cost a forward pass per task for the logs alone; docs/architecture.md).
            tally.add(loss.item())
        self.adam = state
        params = dict(self.model.named_parameters())
        for n, d in self._unflatten(-delta / len(tasks), self.layout).items():
            params[n].grad = d.clone() if params[n].grad is None else params[n].grad + d
        return tally.metrics()

    def adapt(self, support: Batch, steps: int | None = None) -> nn.Module:
        steps = self.inner_steps_test if steps is None else steps
        batches = self._minibatches(len(support), steps, torch.Generator().manual_seed(0))  # a fixed order:
        adapted, _, _ = self.inner_loop(  # evaluation is a function of the weights
            self._flat_parameters(), support, batches, self.inner_lr_test, self._test_state()
        )
        return with_parameters(self.model, self._unflatten(adapted, self._layout()))

    # -- functional form: the same inner loop, vmapped over episodes ------------------------------
    def functional_form(self, episodes: list[Episode]) -> tuple[State, list[State]] | None:
        # The mini-batch rows are drawn here (vmap allows no random op inside): the same for every
        # episode of a support size, as ``adapt``'s fixed generator draws them.
        batches = {
            n: self._minibatches(n, self.inner_steps_test, torch.Generator().manual_seed(0))
            for n in {len(e.support) for e in episodes}
        }
        state = {"model": model_parameters(self.model), "batches": batches, "start": self._test_state()}
        return state, [{} for _ in episodes]

    def functional_adapt(self, state: State, support: Batch, ways: int) -> State:
        layout = self._layout()
        theta = torch.cat([state["model"][n].flatten() for n, _ in layout])
        batches = state["batches"][len(support)]
        adapted, _, _ = self.inner_loop(theta, support, batches, self.inner_lr_test, state["start"], vmapped=True)
        return {**state, "model": {**state["model"], **self._unflatten(adapted, layout)}}

    def state_dict(self) -> dict:
        return {"adam": dict(self.adam._asdict()), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if "inner_optimizer" in state:  # metafusion 0.1 kept a torch Adam: its state per adapted parameter
            kept = state["inner_optimizer"]["state"]
            v, t = [], []
            for i, (_, shape) in enumerate(self.layout):
                moment = kept.get(i, {}).get("exp_avg_sq", torch.zeros(shape))
                v.append(moment.flatten().to(self.adam.second_moment.dtype))
                t.append(torch.full((shape.numel(),), float(kept.get(i, {}).get("step", 0.0))))
            self.adam = AdamState(torch.cat(v), torch.cat(t).to(self.adam.steps.dtype))
        else:
            self.adam = AdamState(**state["adam"])
        self.generator.set_state(state["generator"])
