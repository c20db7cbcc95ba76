"""MAML (Finn et al. 2017), first-order MAML, ANIL (Raghu et al. 2019) and MetaSGD (Li et al. 2017),
all on learn2learn's ``MAML`` / ``MetaSGD`` wrappers (``clone()`` + differentiable updates)."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._learn2learn import MAML as L2LMAML
from .._learn2learn import MetaSGD as L2LMetaSGD
from .._learn2learn import maml_update, meta_sgd_update
from ..config import NoOptions, RunConfig
from ..data.batch import Batch, Episode
from ..errors import ConfigError, InputError
from ..models.fusion import LinearHead
from ..models.model import FusionModel
from .base import ALGORITHMS, MetaAlgorithm, TaskTally, cross_entropy, published
from .batched import State, functional, model_parameters, stacked
from .nearest_mean import prototypes

# Finn et al. 2017, Omniglot 5-way: inner SGD lr 0.4, 1 step (10 at test), meta-batch 32, Adam 1e-3.
MAML_DEFAULTS = published(inner_lr=0.4, inner_steps=1, inner_steps_test=10, meta_batch=32)


@dataclass
class FirstOrderOptions:
    """``algo.*`` keys of the MAML family."""

    learn_inner_lr: bool = False  # meta-learn one inner learning rate per adapted tensor (replaces inner_lr)
    task_batched: bool = False  # all tasks of a meta-batch in one vmapped network (pays on GPUs)
    proto_init: bool = False  # the head starts each task at the support prototypes (Proto-MAML)


@dataclass
class MAMLOptions(FirstOrderOptions):
    # The first fraction of the run (by iterations or budget, whichever is further along) meta-trains
    # first-order, the rest second-order: FOMAML's speed early, MAML's gradient at the end.
    first_order_warmup: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.first_order_warmup < 1:
            raise ConfigError(
                f"algo.first_order_warmup={self.first_order_warmup} is a fraction of the run in [0, 1) "
                f"(for first-order throughout use --algo fomaml)"
            )


@ALGORITHMS.register("maml")
class MAML(MetaAlgorithm):
    """Inner loop: ``steps`` SGD steps on the support loss of a learn2learn clone; outer loss: the
    query loss of the adapted clone, averaged over the meta-batch. ``first_order`` drops the
    second-order terms (FOMAML). Only parameters in the adaptation scope move in the inner loop."""

    name = "maml"
    defaults = MAML_DEFAULTS
    # On pretrained features the paper's 0.4 overshoots, and a meta-trained pretrained top does better fixed in
    # the inner loop, at half the time (docs/results.md, fashion); the variants inherit the recipe.
    pretrained_defaults = {"algo.inner_lr": 0.1, "model.adapt": "all-but-pretrained"}
    Options = MAMLOptions
    step_keys = ("inner_steps", "inner_steps_test")
    first_order = False  # FOMAML: True
    per_parameter_rates = False  # MetaSGD: True (a learned rate per parameter; the task-batched engine has none)

    def __init__(self, model: FusionModel, options: FirstOrderOptions | None = None, **kwargs):
        super().__init__(model, options, **kwargs)
        o = MAMLOptions(**asdict(self.options))  # a variant's Options are a subset of the family's
        learn_inner_lr, task_batched, proto_init = o.learn_inner_lr, o.task_batched, o.proto_init
        self.first_order = type(self).first_order
        self.first_order_warmup = o.first_order_warmup
        self.first_order_now = self.first_order or o.first_order_warmup > 0  # set_progress moves it on
        self.task_batched = task_batched
        self.proto_init = proto_init
        if proto_init and (task_batched or not isinstance(model.head, LinearHead)):
            raise InputError(
                "algo.proto_init needs one linear head on the fused feature (not 'late' fusion) "
                "and the per-task loop (not algo.task_batched)"
            )
        if task_batched and (learn_inner_lr or self.per_parameter_rates):
            raise InputError(
                "algo.task_batched runs plain MAML/FOMAML/ANIL inner SGD steps; it does not "
                "support learned inner learning rates (learn_inner_lr, metasgd)"
            )
        self.wrapper = self._wrap(model)
        scope = model.adapted(self.adapt_scope)
        self._adapted = [n in scope for n, _ in model.named_parameters()]  # in parameters() order
        if not scope:
            raise InputError(f"adaptation scope {self.adapt_scope!r} selects no trainable parameter")
        # Optional learned inner learning rate per layer (one scalar per adapted parameter tensor),
        # meta-learned with the weights; off by default, as in the MAML paper.
        self.layer_lrs = (
            nn.ParameterList(
                [
                    nn.Parameter(torch.tensor(float(self.inner_lr), dtype=p.dtype, device=p.device))
                    for p, a in zip(model.parameters(), self._adapted)
                    if a
                ]
            )
            if learn_inner_lr
            else None
        )
        self._module = nn.ModuleDict(
            {"maml": self.wrapper, **({"layer_lrs": self.layer_lrs} if learn_inner_lr else {})}
        )

    def _wrap(self, model: FusionModel) -> nn.Module:
        return L2LMAML(model, lr=self.inner_lr, first_order=self.first_order, allow_unused=True)

    @property
    def module(self) -> nn.Module:
        return self._module

    def set_progress(self, fraction: float) -> None:
        self.first_order_now = self.first_order or fraction < self.first_order_warmup

    def _step(self, learner: nn.Module, batch: Batch, lr: float, create_graph: bool) -> None:
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
        if self.proto_init:
            init_head_from_prototypes(learner.module, support)
        # Support passes differentiated twice run the CNNs in NCHW (cheaper double backward through
        # BatchNorm, docs/performance.md); the query pass stays channels_last.
        with learner.module.differentiated_twice() if create_graph else nullcontext():
            for _ in range(steps):
                self._step(learner, support, lr, create_graph)
        return learner

    def meta_backward(self, tasks: list[Episode]) -> dict[str, float]:
        if self.task_batched:
            return self._meta_backward_task_batched(tasks)
        tally = TaskTally()
        for task in tasks:
            learner = self._adapt(task.support, self.inner_steps, self.inner_lr, not self.first_order_now)
            logits = learner(task.query)
            loss = torch.nn.functional.cross_entropy(logits, task.query.labels)
            (loss / len(tasks)).backward()
            tally.add(loss.item(), logits.detach(), task.query.labels)
        return tally.metrics()

    def adapt(self, support: Batch, steps: int | None = None) -> nn.Module:
        steps = self.inner_steps_test if steps is None else steps
        with torch.enable_grad():
            return self._adapt(support, steps, self.inner_lr_test, create_graph=False)

    # -- functional form: the test-time inner loop as SGD on a dict of parameters ---------------
    def functional_form(self, episodes: list[Episode]) -> tuple[State, list[State]] | None:
        if self.proto_init:
            return None
        names = [n for (n, _), a in zip(self.model.named_parameters(), self._adapted) if a]
        if self.layer_lrs is not None:
            rates = dict(zip(names, (r.detach() for r in self.layer_lrs)))
        elif isinstance(self.wrapper, L2LMetaSGD):  # one rate per parameter of the model, in order
            every = [n for n, _ in self.model.named_parameters()]
            rates = {n: r.detach() for n, r in zip(every, self.wrapper.lrs) if n in names}
        else:
            rates = {n: self.inner_lr_test for n in names}
        return {"model": model_parameters(self.model), "rates": rates}, [{} for _ in episodes]

    def functional_adapt(self, state: State, support: Batch, ways: int) -> State:
        params = self.functional_inner_loop(state["model"], support, self.inner_steps_test, state["rates"])
        return {**state, "model": params}

    def functional_inner_loop(
        self, params: dict[str, Tensor], support: Batch, steps: int, rates: dict, first_order: bool = False
    ) -> dict[str, Tensor]:
        """The inner SGD steps as a pure function of the parameters (``rates``: name -> learning rate of each
        adapted one), which vmap maps over episodes or tasks; ``first_order`` cuts the inner gradients out of
        the graph. The functional twin of ``_adapt`` (learn2learn's clone and update, the framework's path)."""
        for _ in range(steps):

            def loss(adapted: dict, frozen: dict = params) -> Tensor:
                logits = functional(self.model, {**frozen, **adapted}, nn.Module.__call__, support)
                return F.cross_entropy(logits, support.labels)

            grads = torch.func.grad(loss)({n: params[n] for n in rates})
            grads = {n: g.detach() for n, g in grads.items()} if first_order else grads
            params = {**params, **{n: params[n] - rates[n] * grads[n] for n in rates}}
        return params

    def _meta_backward_task_batched(self, tasks: list[Episode]) -> dict[str, float]:
        """The same meta-gradient as the loop, with every task of the meta-batch in one network call:
        ``torch.func.vmap`` over tasks of the inner SGD steps (``torch.func.grad``) and the query loss,
        differentiated once more for the meta-gradient. Each convolution then runs once for all tasks
        (a grouped convolution), which pays on a GPU, where the per-task loop is launch-bound
        (docs/performance.md); on a CPU the loop is faster. BatchNorm is written out here (fused
        BatchNorm's second-order gradients are wrong under vmap)."""
        first, mods = tasks[0], tasks[0].support.modalities
        same = [
            torch.equal(t.support.mask, first.support.mask) and torch.equal(t.query.mask, first.query.mask)
            for t in tasks[1:]
        ]
        if not all(same):
            raise InputError(
                "algo.task_batched needs every task of a meta-batch to have the same support "
                "and query sizes and the same modality mask (the model branches on the "
                "mask); with missing modalities, leave task_batched off"
            )
        named = list(self.model.named_parameters())
        rates = {n: self.inner_lr for (n, _), a in zip(named, self._adapted) if a}
        params = {n: p.detach() for n, p in named if p.requires_grad}  # frozen ones come from the module

        def task_loss(p, s_inputs, s_labels, q_inputs, q_labels):
            support = Batch(s_inputs, first.support.mask, s_labels, mods)
            p = self.functional_inner_loop(p, support, self.inner_steps, rates, self.first_order_now)
            logits = functional(self.model, p, nn.Module.__call__, Batch(q_inputs, first.query.mask, q_labels, mods))
            return F.cross_entropy(logits, q_labels), logits

        def meta_loss(p):
            losses, logits = torch.func.vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(
                p, *stacked([t.support for t in tasks]), *stacked([t.query for t in tasks])
            )
            return losses.mean(), (losses.detach(), logits.detach())

        with self.model.vmapped_over_tasks():
            grads, (losses, logits) = torch.func.grad(meta_loss, has_aux=True)(params)
        for n, p in named:
            if p.requires_grad:
                p.grad = grads[n] if p.grad is None else p.grad + grads[n]
        tally = TaskTally()
        for t, task_loss_value, task_logits in zip(tasks, losses.tolist(), logits):
            tally.add(task_loss_value, task_logits, t.query.labels)
        return tally.metrics()


def init_head_from_prototypes(model: FusionModel, support: Batch) -> None:
    """Proto-MAML (Triantafillou et al. 2020): start the adapted head where a prototypical network
    is, ``W_k = 2 c_k``, ``b_k = -||c_k||^2`` (the linear part of ``-||z - c_k||^2``), with ``c_k`` the
    support class means of the clone's fused features. The head's own meta-parameters are then unused;
    the meta-gradient reaches the encoders through ``c_k`` as well as through the adapted loss."""
    linear = model.head.linear
    protos = prototypes(model.features(support), support.labels, linear.out_features)  # (ways, D)
    linear._parameters["weight"] = 2 * protos  # a tensor of the clone's graph, as learn2learn's updates are
    linear._parameters["bias"] = -protos.pow(2).sum(1)


@ALGORITHMS.register("fomaml")
class FOMAML(MAML):
    """First-order MAML: the outer gradient is the query gradient at the adapted parameters."""

    name = "fomaml"
    Options = FirstOrderOptions  # first-order throughout: no warm-up
    first_order = True


@ALGORITHMS.register("anil")
class ANIL(MAML):
    """Almost No Inner Loop: MAML that adapts only the head (the model's ``head`` scope)."""

    name = "anil"
    defaults = {**MAML_DEFAULTS, "inner_steps": 5}
    pretrained_defaults = {"algo.inner_lr": 0.1}  # its inner loop adapts the head alone

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        super().check_config(cfg)
        if cfg.model.adapt not in ("all", "head"):
            raise ConfigError("anil adapts the head only; model.adapt must be 'head' (or left at its default)")

    def __init__(self, model: FusionModel, options: MAMLOptions | None = None, **kwargs):
        kwargs["adapt_scope"] = "head"
        super().__init__(model, options, **kwargs)


@ALGORITHMS.register("metasgd")
class MetaSGD(MAML):
    """MAML whose inner learning rate is a learned tensor per parameter (learn2learn ``MetaSGD``).
    The learned rates are meta-parameters: the outer optimizer updates them with the rest."""

    name = "metasgd"
    defaults = {**MAML_DEFAULTS, "inner_steps_test": 1}
    pretrained_defaults = {"algo.inner_lr": 0.1}  # it adapts every parameter, each at its learned rate
    Options = NoOptions  # it always learns per-parameter rates
    per_parameter_rates = True

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        super().check_config(cfg)
        if cfg.model.adapt != "all":
            raise ConfigError("metasgd learns a rate for every parameter; model.adapt must be 'all'")

    def _wrap(self, model: FusionModel) -> nn.Module:
        return L2LMetaSGD(model, lr=self.inner_lr, first_order=self.first_order)

    def reset_head(self, ways: int) -> None:
        """The new head's per-parameter rates start at the mean of the rates learned for the old head
        (same tensor role, new shape), so the learned scale of the head's rates is kept."""
        old = dict(zip((n for n, _ in self.model.named_parameters()), self.wrapper.lrs))
        super().reset_head(ways)
        with torch.no_grad():
            self.wrapper.lrs = nn.ParameterList(
                [
                    nn.Parameter(torch.full_like(p, old[n].mean().item())) if n.startswith("head.") else old[n]
                    for n, p in self.model.named_parameters()
                ]
            )

    def _update(self, learner: nn.Module, lr: float, grads: list) -> None:
        # learn2learn's meta_sgd_update skips parameters whose gradient is None (unused in this task).
        meta_sgd_update(learner.module, learner.lrs, grads)
