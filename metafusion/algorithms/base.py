"""The contract every meta-learning algorithm follows, and the evaluation they share."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import NoOptions, RunConfig
from ..data.batch import Batch, Episode
from ..errors import ConfigError, InputError
from ..models.execution import episodes_vmap_pays, support_statistics
from ..models.model import FusionModel
from ..models.spec import ModelSpec
from ..registry import Registry
from .batched import State, evaluate_batched, functional, predict_alone
from .nearest_mean import CentroidClassifier, WithCentroid, mix
from .test_time import SupportTuning

ALGORITHMS: Registry = Registry("algorithm")
# How query samples are classified after adaptation (``MetaAlgorithm.predict_with_weights``).
PROTOCOLS = ("transductive", "alone", "support")


# The published hyperparameters (algo.* and train.* keys filled where the config says None) of a method with
# no inner loop, meta-trained by Adam; each algorithm states where its paper differs (``published(...)``).
NO_INNER_LOOP = dict(
    inner_lr=0.0, inner_steps=0, inner_steps_test=0, meta_batch=1, meta_lr=1e-3, optimizer="adam", schedule="constant"
)


def published(**differences: Any) -> dict[str, Any]:
    return {**NO_INNER_LOOP, **differences}


class TaskPrediction(NamedTuple):
    """What an algorithm predicts for one episode's query set, after adapting on its support set."""

    logits: Tensor  # (Q, ways); log-probabilities where mixed with the centroid
    weights: Tensor | None  # (Q, M) modality weights in the model's order; None for fusions without them


class MetaAlgorithm:
    """``meta_backward(tasks)`` fills ``.grad`` of the meta-parameters for one meta-batch and returns
    metrics; the training loop owns the optimizer, schedule, clipping and logging.
    ``adapt(support)`` returns a task-specific learner (a module mapping a Batch to logits) without
    touching the meta-parameters; ``task_learner(support)`` is that learner as the run hands it over (mixed
    with the nearest class mean where validation chose it: ``centroid_weight``); ``evaluate(episode)``
    predicts an episode's query set with it.

    Optionally, an algorithm also writes its test-time adaptation as pure functions
    (``functional_form`` / ``functional_adapt`` / ``functional_logits``): ``evaluate_many`` then adapts
    many episodes at once (``batched.evaluate_batched``) with the same predictions as the loop.
    """

    name = "base"
    # What the class knows of its configuration: engine.resolve asks it, nothing else holds it.
    defaults: dict[str, Any] = {}  # published hyperparameters (algo.* and train.* keys) where the config says None
    # The recipe measured best when the model reads a modality through a pretrained encoder (docs/results.md):
    # dotted keys set where the config leaves them unset ("model.*.trainable": every pretrained encoder's)
    pretrained_defaults: dict[str, Any] = {}
    Options: type = NoOptions  # its own algo.* keys (a dataclass; an instance is the second __init__ argument)
    inner_loop = True  # False: no gradient steps at test time (an inner learning rate of 0 is then fine)
    step_keys: tuple[str, ...] = ()  # the algo.* keys that count steps it takes (so they must be >= 1)
    scoped_adaptation = True  # False: it adapts no model parameter, so model.adapt means nothing to it
    meta_parameters = True  # False: nothing to meta-train (no meta learning rate)
    trains_on_more_ways = False  # True: may meta-train on more ways than it is tested on (no classifier head)

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        """Reject settings of the rest of the config this algorithm cannot honour, naming them (``resolve``
        calls it, after its own options have passed their ``Options`` checks)."""
        if not cls.scoped_adaptation and cfg.model.adapt != "all":
            raise ConfigError(f"model.adapt={cfg.model.adapt!r} has no meaning for {cls.name} (it has no inner loop)")
        if cfg.data.train_ways not in (None, cfg.data.ways) and not cls.trains_on_more_ways:
            raise ConfigError(
                f"data.train_ways={cfg.data.train_ways} differs from data.ways={cfg.data.ways}: only "
                f"{listing([n for n in ALGORITHMS.names() if ALGORITHMS.get(n).trains_on_more_ways])} (no "
                f"classifier head) can train on more ways than it is tested on"
            )

    @classmethod
    def from_config(
        cls, cfg: RunConfig, model: FusionModel, spec: ModelSpec, train_classes: list[int]
    ) -> MetaAlgorithm:
        """The algorithm a resolved config describes, for ``model`` (``spec``: what the model was built for;
        ``train_classes``: the meta-train classes)."""
        a = cfg.algo
        algorithm = cls(
            model,
            cls.Options(**a.options),
            inner_lr=a.inner_lr,
            inner_steps=a.inner_steps,
            inner_lr_test=a.inner_lr_test,
            inner_steps_test=a.inner_steps_test,
            transductive=a.transductive,
            adapt_scope=cfg.model.adapt,
            batched_eval=a.batched_eval,
            vocab_size=spec.vocab_size,
            **cls.config_kwargs(cfg, spec, train_classes),
        )
        if cfg.tune.enabled and algorithm.meta_parameters:
            algorithm.tuning = SupportTuning(cfg.tune)
        return algorithm

    @classmethod
    def config_kwargs(cls, cfg: RunConfig, spec: ModelSpec, train_classes: list[int]) -> dict[str, Any]:
        """Constructor arguments of this algorithm beyond the common ones and its options, from the config."""
        return {}

    def __init__(
        self,
        model: FusionModel,
        options=None,
        *,
        inner_lr: float,
        inner_steps: int,
        inner_lr_test: float,
        inner_steps_test: int,
        transductive: bool = True,
        adapt_scope: str = "all",
        batched_eval: str = "auto",
        vocab_size: int = 0,
    ):
        self.model = model
        self.options = self.Options() if options is None else options  # its own algo.* keys, defaults in Options
        self.vocab_size = vocab_size  # token ids' range, for the frozen bag-of-words features of raw text
        # The weight of the nearest class mean on frozen features in every prediction (0: the learner alone,
        # 1: the centroid alone), chosen on validation after meta-training (engine.selection).
        self.centroid_weight = 0.0
        self.tuning: SupportTuning | None = None  # fine-tune on each support set first (``tune.enabled``)
        self.batched_eval = batched_eval
        self.inner_lr, self.inner_steps = inner_lr, inner_steps
        self.inner_lr_test, self.inner_steps_test = inner_lr_test, inner_steps_test
        self.evaluation_protocol = "transductive" if transductive else "alone"  # one of PROTOCOLS
        self.adapt_scope = adapt_scope

    # -- what the training loop sees ----------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        """The module holding every meta-parameter (checkpointed as a whole)."""
        return self.model

    def parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.module.parameters() if p.requires_grad)

    def meta_backward(self, tasks: list[Episode]) -> dict[str, float]:
        raise NotImplementedError

    def auxiliary_backward(self, tasks: list[Episode]) -> dict[str, float]:
        """Add the gradient of the fusion's own loss (``Fusion.auxiliary_loss``) on the samples of the meta-
        batch, pooled, to the meta-gradient ``meta_backward`` left in ``.grad``; every algorithm's meta-update
        (a gradient, or Reptile's difference written as one) then carries it. Its metric: ``auxiliary_loss``.
        Nothing at all (not even the pooling) for the fusions without such a loss: this runs every meta-step."""
        if not self.model.has_auxiliary_loss:
            return {}
        batch = Batch.cat([b for task in tasks for b in (task.support, task.query)])
        loss = self.model.auxiliary_loss(batch)
        if loss is None:
            return {}
        loss.backward()
        return {"auxiliary_loss": loss.item()}

    def set_progress(self, fraction: float) -> None:
        """How far the run is (0 to 1) before each meta-batch, for algorithms with a schedule of their own."""

    def adapt(self, support: Batch, steps: int | None = None) -> nn.Module:
        raise NotImplementedError

    def centroid(self, support: Batch) -> CentroidClassifier:
        """The nearest class mean on the frozen features of the model's modalities, fitted on ``support``."""
        return CentroidClassifier.fit(support, self.model.modalities, self.vocab_size)

    def task_learner(self, support: Batch, steps: int | None = None) -> nn.Module:
        """``adapt(support, steps)`` -- by a copy fine-tuned on ``support`` first where ``tuning`` is set (and
        ``steps`` is not 0) -- mixed with the centroid on ``support`` where ``centroid_weight`` says so: the
        learner evaluation, fine-tune and predict use."""
        algorithm = self.tuning.tuned(self, support)[0] if self.tuning is not None and steps != 0 else self
        learner = algorithm.adapt(support, steps)
        if self.centroid_weight == 0.0:
            return learner
        return WithCentroid(learner, self.centroid(support), self.centroid_weight)

    def reset_head(self, ways: int) -> None:
        """A fresh head for tasks of ``ways`` classes (a user's task with its own number of classes);
        algorithms that keep per-parameter state of the head resize it too."""
        self.model.reset_head(ways)

    def state_dict(self) -> dict:
        """Algorithm state beyond the module's parameters (e.g. an inner optimizer that persists)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # -- shared evaluation ----------------------------------------------------------------------
    @property
    def transductive(self) -> bool:
        return self.evaluation_protocol == "transductive"

    @transductive.setter
    def transductive(self, value: bool) -> None:
        self.evaluation_protocol = "transductive" if value else "alone"

    def protocol(self, protocol: str | None = None) -> str:
        """``protocol``, or the one evaluation uses (``evaluation_protocol``, from ``algo.transductive``)."""
        protocol = protocol or self.evaluation_protocol
        if protocol not in PROTOCOLS:
            raise InputError(f"unknown prediction protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}")
        return protocol

    def predict(self, learner: nn.Module, episode: Episode, protocol: str | None = None) -> Tensor:
        """Query logits under ``protocol`` (default: the configured one; see ``PROTOCOLS``)."""
        return self.predict_with_weights(learner, episode, protocol)[0]

    def predict_with_weights(
        self, learner: nn.Module, episode: Episode, protocol: str | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Query logits and per-query modality weights (None for fusions without them) under ``protocol``:

        - ``transductive``: the query set is one batch (normalisation sees all of it);
        - ``alone``: each query sample is classified alone, together with the support set (Nichol et al.
          2018), so no query sample can inform another. On a GPU those per-query batches run together
          under vmap; on a CPU one forward per query is faster (docs/performance.md has both);
        - ``support``: normalisation layers use the support set's statistics, and the query batch is one
          forward pass: no query sample informs another, at the transductive protocol's speed."""
        protocol = self.protocol(protocol)
        inner = fused_model(learner)
        inner = inner if isinstance(inner, FusionModel) else None
        with torch.no_grad():
            if protocol == "alone":
                alone = predict_each_alone if episode.query.labels.is_cuda else predict_each_alone_loop
                logits = alone(learner, episode.support, episode.query)
                # the weights take a second pass per query: skipped where they cannot vary (one modality)
                weighted = inner is not None and inner.fusion.weighted and len(inner.modalities) > 1
                weights = alone(inner.modality_weights, episode.support, episode.query) if weighted else None
                return logits, weights
            with support_statistics(inner, episode.support) if protocol == "support" else nullcontext():
                return learner(episode.query), None if inner is None else inner.modality_weights(episode.query)

    def evaluate(self, episode: Episode) -> TaskPrediction:
        """The query set's logits and modality weights after adapting on the support set."""
        return TaskPrediction(*self.predict_with_weights(self.task_learner(episode.support), episode))

    def evaluate_many(self, episodes: list[Episode], batched: bool | None = None) -> list[TaskPrediction]:
        """``evaluate`` of each episode. Batched (all adapted at once) where the algorithm has a functional
        form and ``batched`` (default: ``algo.batched_eval``, whose ``auto`` asks
        ``execution.episodes_vmap_pays``) says so; else one by one."""
        if batched is None:
            device = episodes[0].query.labels.device if episodes else torch.device("cpu")
            batched = (
                self.batched_eval == "on" or self.batched_eval == "auto" and episodes_vmap_pays(self.model, device)
            )
        batched = batched and self.evaluation_protocol != "support"  # recorded statistics are module state
        batched = batched and self.tuning is None  # each episode tunes a model of its own
        results = evaluate_batched(self, episodes) if batched and episodes else None
        if results is None:
            return [self.evaluate(e) for e in episodes]
        out = [TaskPrediction(logits, weights) for logits, weights in results]
        if self.centroid_weight:
            with torch.no_grad():
                w = self.centroid_weight
                out = [
                    p._replace(logits=mix(p.logits, self.centroid(e.support)(e.query), w))
                    for p, e in zip(out, episodes)
                ]
        return out

    # -- functional form of test-time adaptation (optional; see batched.py) ----------------------
    def functional_form(self, episodes: list[Episode]) -> tuple[State, list[State]] | None:
        """The state every episode starts from (shared) and one state of its own per episode (in
        episode order), or None where this algorithm, so configured, has no functional form."""
        return None

    def functional_adapt(self, state: State, support: Batch, ways: int) -> State:
        """What ``adapt`` does, as a pure function of the state (vmapped over episodes)."""
        raise NotImplementedError

    def functional_logits(self, state: State, batch: Batch) -> Tensor:
        """What the adapted learner computes on ``batch``, as a pure function of the adapted state
        (by default: the model with the adapted parameters ``state["model"]``)."""
        return functional(self.model, state["model"], nn.Module.__call__, batch)

    def functional_weights(self, state: State, batch: Batch) -> Tensor | None:
        """The modality weights ``evaluate`` reports, from the model parameters in ``state``."""
        params = state.get("model")
        if params is None:
            return None
        return functional(self.model, params, FusionModel.modality_weights, batch)


def listing(names: list[str]) -> str:
    """``["a", "b", "c"]`` -> ``"a, b and c"``."""
    return " and ".join(filter(None, [", ".join(names[:-1]), names[-1] if names else ""]))


class TaskTally:
    """Accumulates loss and query accuracy over the tasks of one meta-batch."""

    def __init__(self) -> None:
        self.loss = self.correct = self.total = 0.0
        self.tasks = 0

    def add(self, loss: float, logits: Tensor | None = None, labels: Tensor | None = None) -> None:
        self.loss += loss
        self.tasks += 1
        if logits is not None and len(labels):
            self.correct += (logits.argmax(1) == labels).sum().item()
            self.total += len(labels)

    def metrics(self) -> dict[str, float]:
        out = {"loss": self.loss / max(self.tasks, 1)}
        if self.total:
            out["accuracy"] = self.correct / self.total
        return out


def predict_each_alone(learner: nn.Module, support: Batch, query: Batch) -> Tensor:
    """Logits of each query row computed in a batch of its own with the support set: the
    non-transductive protocol. The per-query batches run together under ``torch.func.vmap``
    (``batched.predict_alone``), which keeps batch statistics per query batch (exactly as separate
    calls would) but sends all of them through each convolution at once. ``predict_each_alone_loop`` is
    the plain definition."""
    with warnings.catch_warnings():  # ops without a batching rule (stft, gru_cell) loop inside vmap
        warnings.filterwarnings("ignore", message="There is a performance drop")
        return predict_alone(learner, support, query)


def predict_each_alone_loop(learner: nn.Module, support: Batch, query: Batch) -> Tensor:
    """The non-transductive protocol written as a loop (one forward per query sample): the definition
    ``predict_each_alone`` is tested against, and the faster of the two on a CPU."""
    n = len(support)
    return torch.cat([learner(Batch.cat([support, query.index(slice(i, i + 1))]))[n:] for i in range(len(query))])


def fused_model(learner: nn.Module) -> nn.Module:
    """The FusionModel a learner runs: the learner itself, or its ``.module`` (where every learner that wraps
    one keeps it: prototypes, a task head, the centroid mix)."""
    while not isinstance(learner, FusionModel) and hasattr(learner, "module"):
        learner = learner.module
    return learner


def classification_metrics(logits: Tensor, labels: Tensor, ways: int) -> dict[str, float]:
    """Accuracy, loss and macro-F1 (mean over classes of 2PR/(P+R); 0 for a class never right).

    A query whose logits are not finite (a diverged inner loop) counts as wrong, and ``diverged`` says
    that the episode had one."""
    finite = torch.isfinite(logits).all(1)  # (N,)
    pred = torch.where(finite, torch.nan_to_num(logits).argmax(1), -1)
    f1 = []
    for c in range(ways):
        tp = ((pred == c) & (labels == c)).sum().item()
        fp = ((pred == c) & (labels != c)).sum().item()
        fn = ((pred != c) & (labels == c)).sum().item()
        f1.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {
        "accuracy": (pred == labels).float().mean().item(),
        "loss": F.cross_entropy(logits, labels).item(),
        "macro_f1": sum(f1) / ways,
        "diverged": not bool(finite.all()),
    }
