"""Run configuration: typed sections merged one way, dataclass defaults <- YAML file <- overrides (flags).

This module merges and coerces; it knows no component. A dataset, fusion, encoder or algorithm owns its
options (an ``Options`` dataclass beside it): keys of the ``data``, ``model`` and ``algo`` sections that
are not fields here are kept as given in the section's ``options`` and checked, coerced and completed by
the component they belong to when the config is resolved (``metafusion.engine.resolve``). A component
with a hyperparameter of its own is therefore one file and one registration; nothing here changes.

    data.<key>             the dataset's options (``--set data.image_size=80``)
    model.<key>            the fusion's options (``--set model.fusion=attention --set model.attention=scalar``)
    model.<modality>.<key> that modality's encoder's options (``--set model.image.input_size=112``)
    algo.<key>             the algorithm's options (``--set algo.metric=cosine``)

Unknown keys are errors that list the valid ones (for component options, when the config is resolved).
Hyperparameters left as ``None`` take the chosen algorithm's published defaults at resolution, and the
resolved config is what every run folder stores (``config.yaml``), component options written out flat.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError


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
    data_seed: int = 0  # seeds the class split (and a generated dataset) and the draw of missing_rate
    missing_rate: float = 0.0  # probability that a modality is absent from a sample (dataset level)
    modality_dropout: float = 0.0  # train-time probability of masking a present modality
    # modality -> probability that a sample of a meta-train (test) class lacks it, e.g. {image: 0.9}
    train_missing: dict[str, float] = field(default_factory=dict)
    test_missing: dict[str, float] = field(default_factory=dict)
    # probability that a present modality of a sample holds that modality of a random sample of another class
    # (same split), in every split alike: unreliable modalities
    corrupt_rate: float = 0.0
    # mask the corrupted entries as missing instead: the ceiling of any fusion weighting (an oracle that knows them)
    corrupt_hidden: bool = False
    standardize: bool = True  # per-modality standardisation, statistics from meta-train only
    val_episodes: int = 100
    test_episodes: int = 600
    episode_seed: int = 0  # fixes the val/test episodes, identical for every algorithm
    options: dict[str, Any] = field(default_factory=dict)  # the dataset's own (see its Options)


@dataclass
class ModelConfig:
    width: int | None = None  # common fusion width d, every encoder projects to it (None: 64, or a recipe's)
    encoders: dict[str, str] = field(default_factory=dict)  # modality -> encoder (default per modality)
    # see FUSIONS. mean: the fusion that measured best or close to it on every multimodal table (fashion, Omniglot
    # + strokes, the synthetic set), where the seed's attention trails it on most (docs/results.md)
    fusion: str = "mean"
    # parameters the inner loop adapts: all | head | fusion+head | encoders+head | all-but-pretrained (None: all,
    # or the algorithm's pretrained recipe)
    adapt: str | None = None
    hidden: int = 64  # channels / hidden units inside encoders
    # Modalities the model reads (None -> all the data provides). Unlike data.modalities, which drops
    # the other modalities (and samples left with none) from the data, this keeps the episodes as they
    # are: a single-modality model is tested on exactly the fused model's episodes, and a sample with
    # none of its modalities gets z = 0 (the head's bias alone decides).
    modalities: list[str] | None = None
    options: dict[str, Any] = field(default_factory=dict)  # the fusion's own; {modality: {...}} its encoder's


@dataclass
class AlgoConfig:
    name: str = "maml"  # see ALGORITHMS
    inner_lr: float | None = None
    inner_lr_test: float | None = None  # None -> inner_lr
    inner_steps: int | None = None
    inner_steps_test: int | None = None
    transductive: bool = True  # evaluation: query batch statistics together (True) or one query at a time
    batched_eval: Literal["auto", "on", "off"] = "auto"  # adapt evaluation episodes together under vmap
    options: dict[str, Any] = field(default_factory=dict)  # the algorithm's own (see its Options)


@dataclass
class TrainConfig:
    iterations: int = 1000
    meta_batch: int | None = None
    meta_lr: float | None = None
    optimizer: str | None = None  # see engine.optimization.OPTIMIZERS
    schedule: str | None = None  # see engine.optimization.SCHEDULES
    clip: float | None = None  # max meta-gradient norm
    val_interval: int = 0  # 0 -> automatic: validation takes at most val_fraction of the run
    val_fraction: float = 0.1  # automatic validation's share of the meta-training time
    log_interval: int = 10
    on_nan: Literal["stop", "skip"] = "stop"
    budget_minutes: float | None = None  # stop meta-training after this much wall time
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None  # torch intra-op threads; None -> torch's default


@dataclass
class SelectConfig:
    """After meta-training, which model the run hands over: every (alpha, centroid weight) pair is scored on
    the validation episodes and the best is kept (``engine.selection``); the start (alpha 0) and the
    untrained centroid (weight 1) are candidates, so a run that meta-training made worse falls back."""

    # weights = start + alpha * (trained - start) (WiSE-FT's interpolation); [1]: the trained weights alone
    alphas: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    # prediction = (1 - w) log p_model + w log p_centroid (the nearest class mean on frozen features); [0]: off
    centroid_weights: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])


@dataclass
class TuneConfig:
    """Test-time fine-tuning of the model on each task's support set before its learner is built, with a
    learning-rate search that includes 0 (algorithms/test_time.py, P>M>F's recipe)."""

    enabled: bool = False  # in fine-tune and meta-test (meta-test --tune / fine-tune --tune set it for one call)
    lrs: list[float] = field(default_factory=lambda: [0.0, 1e-4, 1e-3, 1e-2])  # Adam rates tried; 0: as meta-learned
    steps: int = 20  # Adam steps per rate
    noise: float = 0.5  # std of the Gaussian noise of augmented copies (float inputs, standardised)
    dropout: float = 0.1  # feature dropout of augmented copies
    seed: int = 0


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    # Settings that apply only when that algorithm runs, e.g. {"reptile": {"algo": {"inner_lr": 0.001}}}:
    # lets one config hold each paper's recipe, so `compare` and `--algo` pick the right one.
    per_algorithm: dict[str, dict] = field(default_factory=dict)
    out: str = "runs/default"


@dataclass
class NoOptions:
    """The options of a component that has none of its own."""


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
    if origin is Literal:
        value = _coerce(value, type(args[0]), key)
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, args))}")
        return value
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


def _merge(old: Any, new: Any) -> Any:
    """``new`` over ``old``; mappings merge key by key (``model.image.a`` then ``model.image.b``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return {**old, **{k: _merge(old.get(k), v) for k, v in new.items()}}
    return copy.deepcopy(new)


def _apply(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    types_ = _field_types(type(obj))
    open_section = "options" in types_  # keys it does not know belong to one of its components
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key == "options" and open_section:
            raise ConfigError(f"{full}: write a component's options as {prefix}<key> directly")
        if key not in types_:
            if open_section:
                obj.options[key] = _merge(obj.options.get(key), value)
                continue
            valid = ", ".join(f"{prefix}{k}" for k in types_)
            raise ConfigError(f"unknown config key {full!r}; valid keys: {valid}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a mapping of {type(current).__name__} fields")
            _apply(current, value, prefix=f"{full}.")
        elif isinstance(current, dict):  # a mapping is merged key by key: --encoder image=X keeps text's encoder
            setattr(obj, key, _merge(current, _coerce(value, types_[key], full)))
        else:
            setattr(obj, key, _coerce(value, types_[key], full))


def parse_options(
    cls: type, values: dict[str, Any], prefix: str, owner: str, common: list[str], others: dict[str, type] | None = None
) -> Any:
    """``values`` (as the YAML file or the flags gave them) as an instance of the options dataclass ``cls``
    of component ``owner``: coerced to its field types, checked by its ``__post_init__``. An unknown key is
    an error listing the section's valid keys (``common`` and the component's) and the components of its
    kind (``others``: name -> Options) that take it; one of metafusion 0.1's global keys given at that
    version's default (as old run folders' config files do) says nothing and is dropped."""
    types_ = _field_types(cls)
    section = prefix.rstrip(".").split(".")[0]
    known = {}
    for key, value in values.items():
        if key in types_:
            known[key] = _coerce(value, types_[key], f"{prefix}{key}")
        elif value is not None and V01_DEFAULTS.get(section, {}).get(key, _MISSING) != value:
            takers = [n for n, o in (others or {}).items() if key in _field_types(o)]
            taken = f" ({prefix}{key} is an option of {' and '.join(takers)})" if takers else ""
            valid = ", ".join(f"{prefix}{k}" for k in [*common, *types_])
            raise ConfigError(f"unknown config key '{prefix}{key}' for {owner}{taken}; valid keys: {valid}")
    return cls(**known)


def options_dict(options: Any) -> dict[str, Any]:
    """An options dataclass instance as the plain values a config stores."""
    return dataclasses.asdict(options)


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config as nested plain values, each section's component options written flat into it."""
    out = dataclasses.asdict(cfg)
    for section in ("data", "model", "algo"):
        out[section] = {**{k: v for k, v in out[section].items() if k != "options"}, **out[section]["options"]}
    return out


_MISSING = object()
# Keys that older versions wrote into run folders' config.yaml and checkpoints but that no longer mean
# anything; dropped when such a config is read, so old runs still load.
RETIRED_KEYS = {"data": ("text_encoder_features",), "algo": ("first_order",)}
# metafusion 0.1's keys that are now a component's own option, with their 0.1 defaults: its config files
# give every one of them, for every component (see parse_options).
V01_DEFAULTS = {
    "data": {
        "split": "protocol",
        "image_size": 28,
        "rotations": False,
        "stroke_length": 64,
        "num_classes": 300,
        "samples_per_class": 20,
        "noise": 1.0,
        "skip_unreadable": False,
    },
    "model": {"attention": "vector"},
    "algo": {
        "learn_inner_lr": False,
        "task_batched": False,
        "proto_init": False,
        "first_order_warmup": 0.0,
        "warm_test_optimizer": False,
    },
}


def from_dict(values: dict[str, Any]) -> RunConfig:
    values = dict(values)
    for section, keys in RETIRED_KEYS.items():
        if isinstance(values.get(section), dict):
            values[section] = {k: v for k, v in values[section].items() if k not in keys}
    cfg = RunConfig()
    _apply(cfg, values)
    return cfg


MAX_WIDTH = 16_384  # model.width and model.hidden: 12x a pretrained encoder's widest feature
MAX_YAML_VALUES = 100_000  # a config has hundreds; more is an alias bomb (a few KB expanding to gigabytes)


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a key given twice in one mapping (it would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                mark = key_node.start_mark
                raise ConfigError(f"{mark.name}:{mark.line + 1}: key {key!r} appears twice in one mapping")
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> Any:
    """A config file's values, or a ConfigError naming the file, line and problem: invalid YAML, a key given
    twice, or aliases expanding to more than ``MAX_YAML_VALUES`` values."""
    try:
        with open(path, encoding="utf-8") as f:  # a stream names the file in marks
            values = yaml.load(f, Loader=_StrictLoader)  # noqa: S506  (a SafeLoader)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None
    budget, stack = MAX_YAML_VALUES, [values]
    while stack:  # aliases are shared objects: count what they expand to without expanding it
        value = stack.pop()
        budget -= 1
        if budget < 0:
            raise ConfigError(f"{path}: more than {MAX_YAML_VALUES:,} values once its aliases expand; not a config")
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return values


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Defaults <- YAML file <- overrides (``{"train.iterations": 50, ...}``), values checked."""
    cfg = RunConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        values = read_yaml(path) or {}
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
    check_values(cfg)
    return cfg


def apply(cfg: RunConfig, values: dict[str, Any]) -> None:
    """Merge nested ``values`` (a YAML section's shape) into ``cfg``, coerced (a per-algorithm section)."""
    _apply(cfg, values)


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


def at_least(key: str, value: Any, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise ConfigError(f"{key} must be >= {minimum}, got {value}")


def above(key: str, value: Any, bound: float = 0.0) -> None:
    if value is not None and not value > bound:  # `not >` also rejects NaN
        raise ConfigError(f"{key} must be > {bound:g}, got {value}")


def check_values(cfg: RunConfig) -> None:
    """The ranges of this module's own fields (what depends on a component is checked when resolving)."""
    d, t = cfg.data, cfg.train
    for key in ("shots", "queries", "val_episodes", "test_episodes", "train_shots"):
        at_least(f"data.{key}", getattr(d, key))
    at_least("data.ways", d.ways, minimum=2)
    at_least("data.train_ways", d.train_ways, minimum=2)
    at_least("data.train_queries", d.train_queries, minimum=0)
    rates = {f"data.{key}": getattr(d, key) for key in ("missing_rate", "modality_dropout", "corrupt_rate")}
    rates |= {
        f"data.{key}.{m}": rate for key in ("train_missing", "test_missing") for m, rate in getattr(d, key).items()
    }
    for key, value in rates.items():
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{key} must be in [0, 1), got {value}")
    if d.corrupt_hidden and not d.corrupt_rate:
        raise ConfigError("data.corrupt_hidden hides corrupted modalities, but data.corrupt_rate is 0: set both")
    at_least("model.width", cfg.model.width)
    at_least("model.hidden", cfg.model.hidden)
    for key in ("width", "hidden"):  # checked before anything is allocated: a width of 1e9 is 256 GB of weights
        value = getattr(cfg.model, key) or 0
        if value > MAX_WIDTH:
            raise ConfigError(f"model.{key}={value} is more than the largest supported, {MAX_WIDTH:,}")
    at_least("train.iterations", t.iterations, minimum=0)
    at_least("train.meta_batch", t.meta_batch)
    at_least("train.val_interval", t.val_interval, minimum=0)
    at_least("train.log_interval", t.log_interval)
    at_least("train.threads", t.threads)
    if t.threads and t.threads > (os.cpu_count() or 1):
        raise ConfigError(f"train.threads={t.threads}, but this machine has {os.cpu_count()} cores")
    for key in ("budget_minutes", "val_fraction", "clip"):
        above(f"train.{key}", getattr(t, key))
    for key in ("inner_steps", "inner_steps_test"):
        at_least(f"algo.{key}", getattr(cfg.algo, key), minimum=0)
    at_least("tune.steps", cfg.tune.steps)
    if not cfg.tune.lrs or min(cfg.tune.lrs) < 0 or not 0 <= cfg.tune.dropout < 1 or cfg.tune.noise < 0:
        raise ConfigError(
            f"tune: lrs must be a non-empty list of rates >= 0, dropout in [0, 1) and noise >= 0 (got lrs "
            f"{cfg.tune.lrs}, dropout {cfg.tune.dropout}, noise {cfg.tune.noise})"
        )
    for key in ("alphas", "centroid_weights"):
        values = getattr(cfg.select, key)
        if not values or not all(0.0 <= v <= 1.0 for v in values):
            raise ConfigError(f"select.{key} must be a non-empty list of numbers in [0, 1], got {values}")
