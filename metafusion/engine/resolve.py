"""A merged config (``config.load_config``) -> the resolved config a run uses and stores.

Every component the config names is looked up in its registry; hyperparameters left unset take the
chosen algorithm's published defaults (its ``defaults``); each component's own options are coerced,
checked and completed by the component's ``Options`` dataclass; and what only the algorithm knows of
the rest of the config is asked of it (``check_config``). Nothing runs before this has passed.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch

from ..algorithms import ALGORITHMS
from ..config import (
    ConfigError,
    NoOptions,
    RunConfig,
    above,
    apply,
    at_least,
    check_values,
    default_data_root,
    options_dict,
    parse_options,
)
from ..data import DATASETS
from ..models import ADAPT_SCOPES, FUSIONS
from ..models.encoders import ENCODERS, default_encoder, encoder_for
from ..models.encoders.pretrained import PretrainedEncoder
from .optimization import OPTIMIZERS, SCHEDULES


def resolve(cfg: RunConfig) -> RunConfig:
    """A copy of ``cfg`` with every unset hyperparameter filled and every component's options checked."""
    cfg = copy.deepcopy(cfg)
    algorithm = lookup(ALGORITHMS, "algo.name", cfg.algo.name)
    for name, section in cfg.per_algorithm.items():
        lookup(ALGORITHMS, "per_algorithm key", name)
        apply(copy.deepcopy(cfg), {k: v for k, v in (section or {}).items()})  # unknown keys fail for any --algo
    specific = cfg.per_algorithm.get(cfg.algo.name)
    if specific:
        apply(cfg, {k: v for k, v in specific.items() if k != "per_algorithm"})
    if pretrained_modalities(cfg):  # the recipe measured best on pretrained features, where nothing says otherwise
        for key, value in algorithm.pretrained_defaults.items():
            set_unless_given(cfg, key, value)
    cfg.model.width = DEFAULT_WIDTH if cfg.model.width is None else cfg.model.width
    cfg.model.adapt = "all" if cfg.model.adapt is None else cfg.model.adapt
    for section in (cfg.algo, cfg.train):
        for key, value in algorithm.defaults.items():
            if getattr(section, key, False) is None:
                setattr(section, key, value)
    a, d = cfg.algo, cfg.data
    a.inner_lr_test = a.inner_lr if a.inner_lr_test is None else a.inner_lr_test
    d.train_ways = d.ways if d.train_ways is None else d.train_ways
    d.train_shots = d.shots if d.train_shots is None else d.train_shots
    d.train_queries = d.queries if d.train_queries is None else d.train_queries
    d.root = default_data_root() if d.root is None else d.root
    check_values(cfg)

    a.options = _component_options(ALGORITHMS, "algo", a.name, a.options)
    lookup(DATASETS, "data.dataset", d.dataset)
    d.options = _component_options(DATASETS, "data", d.dataset, d.options)
    fusion_options, encoder_options = split_model_options(cfg.model.options)
    lookup(FUSIONS, "model.fusion", cfg.model.fusion)
    cfg.model.options = _component_options(FUSIONS, "model", cfg.model.fusion, fusion_options)
    for modality in sorted({*cfg.model.encoders, *encoder_options}):  # the encoders' own keys, completed
        name = cfg.model.encoders.get(modality) or default_encoder(modality)
        encoder = encoder_for(modality, name)
        values = encoder_options.get(modality, {})
        if values or dataclasses.fields(encoder.Options):
            options = parse_options(encoder.Options, values, f"model.{modality}.", f"encoder {name}", [])
            cfg.model.options[modality] = options_dict(options)
    _check_training(cfg, algorithm)
    algorithm.check_config(cfg)  # what only this algorithm knows: its incompatibilities with the rest
    return cfg


DEFAULT_WIDTH = 64


def pretrained_modalities(cfg: RunConfig) -> list[str]:
    """The modalities the config reads through a pretrained encoder (one named in ``model.encoders``)."""
    return [
        m
        for m, name in cfg.model.encoders.items()
        if name in ENCODERS
        and issubclass(ENCODERS.get(name), PretrainedEncoder)
        and (not cfg.model.modalities or m in cfg.model.modalities)
    ]


def set_unless_given(cfg: RunConfig, key: str, value: Any) -> None:
    """Set dotted ``key`` where the config leaves it unset: a field that is None, or a component option
    not given. ``model.*.<option>`` means that option of every pretrained encoder that takes it."""
    section, *rest = key.split(".")
    if section == "model" and rest[0] == "*":
        for m in pretrained_modalities(cfg):
            if rest[1] in {f.name for f in dataclasses.fields(ENCODERS.get(cfg.model.encoders[m]).Options)}:
                cfg.model.options.setdefault(m, {}).setdefault(rest[1], value)
        return
    target = getattr(cfg, section)
    if hasattr(target, rest[0]):
        if getattr(target, rest[0]) is None:
            setattr(target, rest[0], value)
    else:
        target.options.setdefault(rest[0], value)


def lookup(registry, key: str, name: str):
    """The registered entry ``name``, or a ConfigError naming ``key`` and the valid names."""
    if name not in registry:
        raise ConfigError(f"{key}={name!r} is not valid; choose one of: {', '.join(registry.names())}")
    return registry.get(name)


def options_class(registry, name: str) -> type:
    """The options dataclass of a registered component: its ``Options`` attribute, or (datasets, whose
    entries are functions) the ``options`` its registration gave."""
    return getattr(registry.get(name), "Options", None) or registry.info(name).get("options", NoOptions)


def _component_options(registry, section: str, name: str, values: dict[str, Any]) -> dict[str, Any]:
    common = [f.name for f in dataclasses.fields(type(_SECTIONS[section])) if f.name != "options"]
    others = {n: options_class(registry, n) for n in registry.names()}
    options = parse_options(
        options_class(registry, name), values, f"{section}.", f"{registry.kind} {name}", common, others
    )
    return options_dict(options)


_SECTIONS = {"data": RunConfig().data, "model": RunConfig().model, "algo": RunConfig().algo}


def split_model_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``model.<key>`` (the fusion's options) apart from ``model.<modality>.<key>`` (that modality's
    encoder's): a mapping value is a modality's."""
    fusion = {k: v for k, v in options.items() if not isinstance(v, dict)}
    return fusion, {k: v for k, v in options.items() if isinstance(v, dict)}


def _check_training(cfg: RunConfig, algorithm) -> None:
    """The ranges that depend on the algorithm, and the names the training loop looks up."""
    a, t = cfg.algo, cfg.train
    if cfg.model.adapt not in ADAPT_SCOPES:
        raise ConfigError(f"model.adapt={cfg.model.adapt!r} is not valid; choose one of: {', '.join(ADAPT_SCOPES)}")
    lookup(OPTIMIZERS, "train.optimizer", t.optimizer)
    lookup(SCHEDULES, "train.schedule", t.schedule)
    # nothing to meta-train (centroid): 0 iterations are fine; else a run of none would leave no checkpoint
    at_least("train.iterations", t.iterations, minimum=1 if algorithm.meta_parameters else 0)
    if algorithm.meta_parameters:
        above("train.meta_lr", t.meta_lr)
    for key in ("inner_lr", "inner_lr_test"):
        value = getattr(a, key)
        if algorithm.inner_loop:
            above(f"algo.{key}", value)
        elif value is not None and not value >= 0:
            raise ConfigError(f"algo.{key} must be >= 0, got {value}")
    for key in algorithm.step_keys:  # steps of an inner loop the algorithm runs: at least one
        at_least(f"algo.{key}", getattr(a, key))
    _check_device(t.device)


def _check_device(device: str) -> None:
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise ConfigError(f"train.device={device!r} is not a device; use cpu or cuda (cuda:N)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={device!r}, but no CUDA device is available on this machine; use --device cpu")
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"train.device={device!r}: metafusion runs on cpu or cuda")


__all__ = ["resolve", "lookup", "options_class", "split_model_options"]
