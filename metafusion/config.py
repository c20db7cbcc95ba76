"""Typed run configuration. Values flow one way: dataclass defaults <- YAML file <- CLI overrides.

Unknown keys are errors that list the valid ones. Hyperparameters left as ``None`` take the chosen
algorithm's published defaults (the algorithm class's ``defaults``) when the config is resolved, and the resolved
config is what every run folder stores.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import InputError


class ConfigError(InputError):
    """A configuration value or key is invalid; the message names it and the valid choices."""


@dataclass
class DataConfig:
    dataset: str = "synthetic"  # see `metafusion datasets`
    root: str | None = None  # data folder; None -> $METAFUSION_DATA
    modalities: list[str] | None = None  # None -> every modality the dataset provides
    ways: int = 5
    shots: int = 1
    queries: int = 15
    train_ways: int | None = None  # classes per meta-train episode (None -> ways); protonet only (no head)
    train_shots: int | None = None  # shots per class in meta-train episodes (None -> shots)
    train_queries: int | None = None  # queries per class in meta-train episodes (None -> queries)
    # Class split. omniglot: protocol (1100/100/423) | background (Lake); clinc150: protocol (seeded
    # 60/20/20 over intents) | cross-domain (seeded 6/2/2 over domains); others: seeded 60/20/20.
    split: str = "protocol"
    image_size: int = 28
    rotations: bool = False  # omniglot: 90/180/270 degree rotations as new classes (MAML protocol)
    stroke_length: int = 64  # omniglot strokes: resampled (dx, dy, pen_up) steps
    num_classes: int = 300  # synthetic
    samples_per_class: int = 20  # synthetic
    noise: float = 1.0  # synthetic: scales every modality's noise
    data_seed: int = 0  # synthetic: generates the dataset itself
    missing_rate: float = 0.0  # probability that a modality is absent from a sample (dataset level)
    modality_dropout: float = 0.0  # train-time probability of masking a present modality
    standardize: bool = True  # per-modality standardisation, statistics from meta-train only
    skip_unreadable: bool = False  # manifest: mask corrupt files (and count them) instead of failing
    val_episodes: int = 100
    test_episodes: int = 600
    episode_seed: int = 0  # fixes the val/test episodes, identical for every algorithm


@dataclass
class ModelConfig:
    width: int = 64  # common fusion width d; every encoder projects to it
    encoders: dict[str, str] = field(default_factory=dict)  # modality -> encoder (default per modality)
    fusion: str = "attention"  # attention | concat | mean | late | transformer
    attention: str = "vector"  # attention weights: vector (element-wise) | scalar (one per modality)
    adapt: str = "all"  # parameters the inner loop adapts: all | head | fusion+head | encoders+head
    hidden: int = 64  # channels / hidden units inside encoders
    # Modalities the model reads (None -> all the data provides). Unlike data.modalities, which drops
    # the other modalities (and samples left with none) from the data, this keeps the episodes as they
    # are: a single-modality model is tested on exactly the fused model's episodes, and a sample with
    # none of its modalities gets z = 0 (the head's bias alone decides).
    modalities: list[str] | None = None


@dataclass
class AlgoConfig:
    name: str = "maml"  # maml | fomaml | reptile | metasgd | anil | protonet | finetune | centroid
    inner_lr: float | None = None
    inner_lr_test: float | None = None  # None -> inner_lr
    inner_steps: int | None = None
    inner_steps_test: int | None = None
    inner_batch: int | None = None  # reptile: inner mini-batch size
    inner_optimizer: str | None = None  # reptile: adam | sgd
    # reptile: the test-time inner Adam starts from the moments (and step count) that meta-training's inner
    # loop left, as the Reptile paper's code evaluates, instead of from a fresh optimizer
    warm_test_optimizer: bool = False
    first_order: bool | None = None
    # maml/anil: the first fraction of the run (by iterations or budget, whichever is further along)
    # meta-trains first-order, the rest second-order: FOMAML's speed early, MAML's gradient at the end.
    first_order_warmup: float = 0.0
    learn_inner_lr: bool = False  # maml/fomaml/anil: meta-learn one inner learning rate per layer
    task_batched: bool = False  # maml/fomaml/anil: all tasks of a meta-batch in one vmapped network (GPUs)
    transductive: bool = True  # evaluation: query batch statistics together (True) or one query at a time
    batched_eval: str = "auto"  # adapt evaluation episodes together under vmap: auto (where faster) | on | off
    metric: str | None = None  # centroid (default cosine) / protonet (default euclidean): cosine | euclidean
    proto_init: bool = False  # maml/fomaml/anil: head initialised from support prototypes (Proto-MAML)


@dataclass
class TrainConfig:
    iterations: int = 1000
    meta_batch: int | None = None
    meta_lr: float | None = None
    optimizer: str | None = None  # adam | sgd
    schedule: str | None = None  # constant | linear (linear anneals the meta lr to 0)
    clip: float | None = None  # max meta-gradient norm
    val_interval: int = 0  # 0 -> automatic: validation takes at most val_fraction of the run
    val_fraction: float = 0.1  # automatic validation's share of the meta-training time
    log_interval: int = 10
    on_nan: str = "stop"  # stop | skip
    budget_minutes: float | None = None  # stop meta-training after this much wall time
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None  # torch intra-op threads; None -> torch's default


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Settings that apply only when that algorithm runs, e.g. {"reptile": {"algo": {"inner_lr": 0.001}}}:
    # lets one config hold each paper's recipe, so `compare` and `--algo` pick the right one.
    per_algorithm: dict[str, dict] = field(default_factory=dict)
    out: str = "runs/default"


def default_data_root() -> str | None:
    """$METAFUSION_DATA, the single place data roots come from when a config gives none."""
    return os.environ.get("METAFUSION_DATA") or None


# ----------------------------------------------------------------------------- dict <-> dataclass


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], key) for v in value]
    if origin is dict:
        if isinstance(value, str):  # "image=conv4,audio=melcnn"
            pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
            if any(len(p) != 2 for p in pairs):
                raise ConfigError(f"{key}: expected name=value pairs, got {value!r}")
            value = {k.strip(): v.strip() for k, v in pairs}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], key) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        return str(value)
    return value


def _apply(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    types_ = _field_types(type(obj))
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in types_:
            valid = ", ".join(f"{prefix}{k}" for k in types_)
            raise ConfigError(f"unknown config key {full!r}; valid keys: {valid}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a mapping of {type(current).__name__} fields")
            _apply(current, value, prefix=f"{full}.")
        else:
            setattr(obj, key, _coerce(value, types_[key], full))


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# Keys that older versions wrote into run folders' config.yaml and checkpoints but that no longer mean
# anything; dropped when such a config is read, so old runs still load.
RETIRED_KEYS = {"data": ("text_encoder_features",)}


def from_dict(values: dict[str, Any]) -> RunConfig:
    values = dict(values)
    for section, keys in RETIRED_KEYS.items():
        if isinstance(values.get(section), dict):
            values[section] = {k: v for k, v in values[section].items() if k not in keys}
    cfg = RunConfig()
    _apply(cfg, values)
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Defaults <- YAML file <- overrides (``{"train.iterations": 50, ...}``), validated."""
    cfg = RunConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{where}: not valid YAML: {problem}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        _apply(cfg, values)
    for dotted, value in (overrides or {}).items():
        *parents, leaf = dotted.split(".")
        nested: dict[str, Any] = {leaf: value}
        for parent in reversed(parents):
            nested = {parent: nested}
        _apply(cfg, nested)
        for section in cfg.per_algorithm.values():  # a flag beats the file, its per-algorithm sections too
            _forget(section, dotted.split("."))
    validate(cfg)
    return cfg


def _forget(values: dict[str, Any], path: list[str]) -> None:
    """Remove the nested key ``path`` from ``values`` (if there), and sections it leaves empty."""
    head, *rest = path
    if head not in values:
        return
    if rest and isinstance(values[head], dict):
        _forget(values[head], rest)
        if not values[head]:
            del values[head]
    elif not rest:
        del values[head]


def algorithm_defaults(name: str) -> dict[str, Any]:
    """Algorithm ``name``'s published hyperparameters (its class owns them)."""
    from .algorithms import ALGORITHMS

    return ALGORITHMS.get(name).defaults


def resolve(cfg: RunConfig) -> RunConfig:
    """Return a copy with every None hyperparameter filled from the algorithm's defaults."""
    cfg = copy.deepcopy(cfg)
    specific = cfg.per_algorithm.get(cfg.algo.name)
    if specific:
        _apply(cfg, {k: v for k, v in specific.items() if k != "per_algorithm"})
    defaults = algorithm_defaults(cfg.algo.name)
    for section in (cfg.algo, cfg.train):
        for key, value in defaults.items():
            if hasattr(section, key) and getattr(section, key) is None:
                setattr(section, key, value)
    if cfg.algo.inner_lr_test is None:
        cfg.algo.inner_lr_test = cfg.algo.inner_lr
    if cfg.data.train_ways is None:
        cfg.data.train_ways = cfg.data.ways
    if cfg.data.train_shots is None:
        cfg.data.train_shots = cfg.data.shots
    if cfg.data.train_queries is None:
        cfg.data.train_queries = cfg.data.queries
    if cfg.data.root is None:
        cfg.data.root = default_data_root()
    validate(cfg)
    return cfg


def _choice(key: str, value: Any, valid: tuple[str, ...]) -> None:
    if value is not None and value not in valid:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(valid)}")


def _positive(key: str, value: Any, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise ConfigError(f"{key} must be >= {minimum}, got {value}")


def _greater(key: str, value: Any, bound: float = 0.0) -> None:
    if value is not None and not value > bound:  # `not >` also rejects NaN
        raise ConfigError(f"{key} must be > {bound:g}, got {value}")


def _check_device(device: str) -> None:
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise ConfigError(f"train.device={device!r} is not a device; use cpu or cuda (cuda:N)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={device!r}, but no CUDA device is available on this machine; use --device cpu")
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"train.device={device!r}: metafusion runs on cpu or cuda")


def validate(cfg: RunConfig) -> None:
    """Reject incompatible settings at configuration time, never mid-training. Names are checked against
    the registries and the modules that own them (imported here: they import this module's dataclasses)."""
    from .algorithms import ALGORITHMS
    from .algorithms.base import BATCHED_EVAL
    from .algorithms.protonet import METRICS
    from .data import DATASETS
    from .models import ADAPT_SCOPES, FUSIONS
    from .models.encoders import encoder_for

    _choice("data.dataset", cfg.data.dataset, DATASETS.names())
    _choice("algo.name", cfg.algo.name, ALGORITHMS.names())
    algorithm = ALGORITHMS.get(cfg.algo.name)
    for name, section in cfg.per_algorithm.items():
        _choice("per_algorithm key", name, ALGORITHMS.names())
        _apply(copy.deepcopy(cfg), {k: v for k, v in (section or {}).items()})  # reject unknown keys now
    for modality, name in cfg.model.encoders.items():
        encoder_for(modality, name)
    _choice("model.fusion", cfg.model.fusion, FUSIONS.names())
    _choice("model.attention", cfg.model.attention, ("vector", "scalar"))
    _choice("model.adapt", cfg.model.adapt, ADAPT_SCOPES)
    _choice("train.optimizer", cfg.train.optimizer, ("adam", "sgd"))
    _choice("train.schedule", cfg.train.schedule, ("constant", "linear"))
    _choice("train.on_nan", cfg.train.on_nan, ("stop", "skip"))
    _choice("algo.batched_eval", cfg.algo.batched_eval, BATCHED_EVAL)
    _choice("data.split", cfg.data.split, ("protocol", "background", "cross-domain"))
    for key in (
        "shots",
        "queries",
        "val_episodes",
        "test_episodes",
        "image_size",
        "stroke_length",
        "samples_per_class",
    ):
        _positive(f"data.{key}", getattr(cfg.data, key))
    _positive("data.ways", cfg.data.ways, minimum=2)
    if cfg.data.dataset == "synthetic":
        _positive("data.num_classes", cfg.data.num_classes, minimum=cfg.data.ways)
    if not cfg.data.noise >= 0:
        raise ConfigError(f"data.noise must be >= 0, got {cfg.data.noise}")
    _positive("model.hidden", cfg.model.hidden)
    _positive("algo.inner_batch", cfg.algo.inner_batch)
    _positive("train.val_interval", cfg.train.val_interval, minimum=0)
    _positive("train.log_interval", cfg.train.log_interval)
    _positive("train.threads", cfg.train.threads)
    if cfg.train.threads and cfg.train.threads > (os.cpu_count() or 1):
        raise ConfigError(f"train.threads={cfg.train.threads}, but this machine has {os.cpu_count()} cores")
    _greater("train.budget_minutes", cfg.train.budget_minutes)
    _greater("train.val_fraction", cfg.train.val_fraction)
    _greater("train.clip", cfg.train.clip)
    if algorithm.meta_parameters:
        _greater("train.meta_lr", cfg.train.meta_lr)
    for key in ("inner_lr", "inner_lr_test"):
        value = getattr(cfg.algo, key)
        if not algorithm.inner_loop:
            if value is not None and not value >= 0:
                raise ConfigError(f"algo.{key} must be >= 0, got {value}")
        else:
            _greater(f"algo.{key}", value)
    _check_device(cfg.train.device)
    _positive("data.train_shots", cfg.data.train_shots)
    _positive("data.train_ways", cfg.data.train_ways, minimum=2)
    _positive("data.train_queries", cfg.data.train_queries, minimum=0)
    # nothing to meta-train (centroid): 0 iterations are fine; else a run of none would leave no checkpoint
    _positive("train.iterations", cfg.train.iterations, minimum=1 if algorithm.meta_parameters else 0)
    _positive("train.meta_batch", cfg.train.meta_batch)
    _positive("model.width", cfg.model.width)
    for key in ("inner_steps", "inner_steps_test"):  # steps of an inner loop the algorithm runs: at least one
        _positive(f"algo.{key}", getattr(cfg.algo, key), minimum=1 if key in algorithm.step_keys else 0)
    for key in ("missing_rate", "modality_dropout"):
        value = getattr(cfg.data, key)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"data.{key} must be in [0, 1), got {value}")
    _choice("algo.metric", cfg.algo.metric, METRICS)
    algorithm.check_config(cfg)  # what only this algorithm knows: its options and incompatibilities
