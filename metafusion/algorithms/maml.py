"""MAML (Finn et al. 2017), first-order MAML, ANIL (Raghu et al. 2019) and MetaSGD (Li et al. 2017).

One inner loop (``MAML.inner_loop``): SGD steps on a dict of parameters with ``torch.func``, which meta-training
differentiates through (task by task, or vmapped over a meta-batch's tasks) and evaluation runs per episode or
vmapped over episodes. The meta-parameters live in learn2learn's ``MAML`` / ``MetaSGD`` wrappers (MetaSGD's
learned rates are its ``lrs``); their clone-and-update is the reference the tests hold the inner loop to.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._learn2learn import MAML as L2LMAML
from .._learn2learn import MetaSGD as L2LMetaSGD
from ..config import NoOptions, RunConfig
from ..data.batch import Batch, Episode
from ..errors import ConfigError, InputError
from ..models.fusion import LinearHead
from ..models.model import FusionModel
from .base import ALGORITHMS, MetaAlgorithm, TaskTally, published
from .batched import State, functional, model_parameters, stacked, with_parameters
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
        if proto_init and not isinstance(model.head, LinearHead):
            raise InputError("algo.proto_init needs one linear head on the fused feature (not 'late' fusion)")
        if task_batched and (learn_inner_lr or self.per_parameter_rates):
            raise InputError(
                "algo.task_batched runs plain MAML/FOMAML/ANIL inner SGD steps; it does not "
                "support learned inner learning rates (learn_inner_lr, metasgd)"
            )
        self.wrapper = self._wrap(model)
        scope = model.adapted(self.adapt_scope)
        self._adapted_names = [n for n, _ in model.named_parameters() if n in scope]  # in parameters() order
        if not scope:
            raise InputError(f"adaptation scope {self.adapt_scope!r} selects no trainable parameter")
        # Optional learned inner learning rate per layer (one scalar per adapted parameter tensor),
        # meta-learned with the weights; off by default, as in the MAML paper.
        self.layer_lrs = (
            nn.ParameterList(
                [
                    nn.Parameter(torch.tensor(float(self.inner_lr), dtype=p.dtype, device=p.device))
                    for n, p in model.named_parameters()
                    if n in scope
                ]
            )
            if learn_inner_lr
            else None
        )
        self._module = nn.ModuleDict(
            {"maml": self.wrapper, **({"layer_lrs": self.layer_lrs} if learn_inner_lr else {})}
        )

    def _wrap(self, model: FusionModel) -> nn.Module:
        """The module holding the meta-parameters (checkpointed as ``maml.*``)."""
        return L2LMAML(model, lr=self.inner_lr, first_order=self.first_order, allow_unused=True)

    @property
    def module(self) -> nn.Module:
        return self._module

    def set_progress(self, fraction: float) -> None:
        self.first_order_now = self.first_order or fraction < self.first_order_warmup

    def rates(self, training: bool) -> dict[str, Tensor | float]:
        """Name -> inner learning rate of each adapted parameter: the learned ones (meta-parameters while
        training, constants at test), else ``inner_lr`` (training) or ``inner_lr_test``."""
        if self.layer_lrs is not None:
            learned = dict(zip(self._adapted_names, self.layer_lrs))
        elif self.per_parameter_rates:  # learn2learn's MetaSGD: one rate per parameter of the model, in order
            every = (n for n, _ in self.model.named_parameters())
            adapted = set(self._adapted_names)
            learned = {n: r for n, r in zip(every, self.wrapper.lrs) if n in adapted}
        else:
            lr = self.inner_lr if training else self.inner_lr_test
            return {n: lr for n in self._adapted_names}
        return learned if training else {n: r.detach() for n, r in learned.items()}

    def inner_loop(
        self,
        params: dict[str, Tensor],
        support: Batch,
        steps: int,
        rates: dict,
        first_order: bool = False,
        vmapped: bool = False,
    ) -> dict[str, Tensor]:
        """The inner loop: ``steps`` SGD steps on the support loss, from ``params`` (name -> tensor; the
        adapted ones are those in ``rates``, name -> learning rate), as a function of the parameters.
        Meta-training differentiates through it (task by task, or vmapped over a meta-batch's tasks); evaluation
        runs it per episode or vmapped over episodes. ``first_order`` takes the inner gradients as constants
        (FOMAML, and every test-time adaptation), computed outside the graph. ``vmapped``: under
        ``torch.func.vmap``, where the gradients come from ``torch.func.grad``; elsewhere from
        ``torch.autograd.grad``, which is faster on a CPU (docs/architecture.md)."""
        if self.proto_init:
            params = {**params, **head_at_prototypes(self.model, params, support)}

        def support_loss(adapted: dict, frozen: dict) -> Tensor:
            logits = functional(self.model, {**frozen, **adapted}, nn.Module.__call__, support)
            return F.cross_entropy(logits, support.labels)

        for _ in range(steps):
            source = {n: p.detach() for n, p in params.items()} if first_order else params
            adapted = {n: source[n] for n in rates}
            if vmapped:
                grads = torch.func.grad(support_loss)(adapted, source)
            else:  # each adapted tensor a variable of its own, as torch.func.grad takes them: Proto-MAML's head,
                # computed from the encoders, then gets the partial gradient step, not the encoders' share of it
                adapted = {n: p.requires_grad_() if first_order else p.view_as(p) for n, p in adapted.items()}
                loss = support_loss(adapted, source)
                found = torch.autograd.grad(
                    loss, list(adapted.values()), create_graph=not first_order, allow_unused=True
                )
                grads = {n: g for n, g in zip(adapted, found) if g is not None}  # None: unused in this task
            params = {**params, **{n: params[n] - rates[n] * g for n, g in grads.items()}}
        return params

    def meta_backward(self, tasks: list[Episode]) -> dict[str, float]:
        if self.task_batched:
            return self._meta_backward_task_batched(tasks)
        tally = TaskTally()
        params, rates = dict(self.model.named_parameters()), self.rates(training=True)
        for task in tasks:
            # Support passes differentiated twice run the CNNs in NCHW (cheaper double backward through
            # BatchNorm, docs/performance.md); the query pass stays channels_last.
            with self.model.differentiated_twice() if not self.first_order_now else nullcontext():
                adapted = self.inner_loop(params, task.support, self.inner_steps, rates, self.first_order_now)
            logits = functional(self.model, adapted, nn.Module.__call__, task.query)
            loss = F.cross_entropy(logits, task.query.labels)
            (loss / len(tasks)).backward()
            tally.add(loss.item(), logits.detach(), task.query.labels)
        return tally.metrics()

    def adapt(self, support: Batch, steps: int | None = None) -> nn.Module:
        steps = self.inner_steps_test if steps is None else steps
        with torch.enable_grad():
            params = self.inner_loop(
                model_parameters(self.model), support, steps, self.rates(training=False), first_order=True
            )
        return with_parameters(self.model, params)

    # -- functional form: the inner loop vmapped over episodes ------------------------------------
    def functional_form(self, episodes: list[Episode]) -> tuple[State, list[State]] | None:
        return {"model": model_parameters(self.model), "rates": self.rates(training=False)}, [{} for _ in episodes]

    def functional_adapt(self, state: State, support: Batch, ways: int) -> State:
        params = self.inner_loop(
            state["model"], support, self.inner_steps_test, state["rates"], first_order=True, vmapped=True
        )
        return {**state, "model": params}

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
        rates = self.rates(training=True)
        params = {n: p.detach() for n, p in named if p.requires_grad}  # frozen ones come from the module

        def task_loss(p, s_inputs, s_labels, q_inputs, q_labels):
            support = Batch(s_inputs, first.support.mask, s_labels, mods)
            p = self.inner_loop(p, support, self.inner_steps, rates, self.first_order_now, vmapped=True)
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


def head_at_prototypes(model: FusionModel, params: dict[str, Tensor], support: Batch) -> dict[str, Tensor]:
    """Proto-MAML (Triantafillou et al. 2020): the head's parameters where a prototypical network is,
    ``W_k = 2 c_k``, ``b_k = -||c_k||^2`` (the linear part of ``-||z - c_k||^2``), with ``c_k`` the support
    class means of the fused features under ``params``. The head's own meta-parameters are then unused; the
    meta-gradient reaches the encoders through ``c_k`` as well as through the adapted loss."""
    linear = model.head.linear
    z = functional(model, params, FusionModel.features, support)
    protos = prototypes(z, support.labels, linear.out_features)  # (ways, D)
    return {"head.linear.weight": 2 * protos, "head.linear.bias": -protos.pow(2).sum(1)}


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
