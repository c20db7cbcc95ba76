"""Config -> the objects of one experiment: prepared dataset, model, algorithm, samplers, episodes."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

from ..algorithms import ALGORITHMS, MetaAlgorithm
from ..config import RunConfig, from_dict
from ..data import DATASETS, EpisodeSampler, MultimodalDataset, Standardizer, fixed_episodes
from ..data.episodes import FixedEpisodes
from ..data.input_format import InputFormat
from ..errors import InputError
from ..models import FusionModel, ModelSpec, build_model
from .features import with_frozen_features
from .resolve import options_class, resolve, split_model_options


def raw_dataset(cfg: RunConfig) -> MultimodalDataset:
    """The configured dataset as its builder makes it (before the run's modality choice and pipeline)."""
    d = cfg.data
    return DATASETS.build(d.dataset, d, options_class(DATASETS, d.dataset)(**d.options))


@dataclass
class PreparedData:
    """What ``load_dataset`` makes of a config's data: the samples as the model sees them, and the pipeline
    that made them (which a trained model applies again to a user's files: ``TrainedModel.prepare``)."""

    dataset: MultimodalDataset
    inputs: InputFormat  # the raw samples' format, before any frozen encoder part
    standardizer: Standardizer | None = None  # fitted on the meta-train split only
    corrupted: Tensor | None = None  # [N, M]: the entries data.corrupt_rate replaced (None: none)

    @staticmethod
    def of(dataset: MultimodalDataset) -> PreparedData:
        """A dataset taken as it is (no pipeline): what tests and benchmarks hand ``build_experiment``."""
        return PreparedData(dataset, InputFormat.of(dataset))


def load_dataset(cfg: RunConfig) -> PreparedData:
    """The dataset as the model will see it: chosen modalities, missing rate, the frozen parts of pretrained
    encoders (``features``), modalities missing in meta-train or test classes, corrupted ones, and
    standardisation fitted on the meta-train split only (so that a user's own data later goes through the
    same statistics)."""
    d = cfg.data
    dataset = raw_dataset(cfg)
    if d.modalities:
        dataset = dataset.select_modalities(d.modalities)
    dataset = dataset.with_missing(d.missing_rate, seed=d.data_seed + 1)
    inputs = InputFormat.of(dataset)
    dataset, activations = with_frozen_features(cfg, dataset)
    # After the frozen encoder parts (their cache stays valid): a masked row's features are zeroed, a donor's
    # features are what encoding its content gives.
    for split, missing in (("train", d.train_missing), ("test", d.test_missing)):
        for modality, rate in missing.items():
            dataset = dataset.without_modality(modality, rate, dataset.splits.get(split, []), seed=d.data_seed + 2)
    dataset, corrupted = dataset.with_corruption(d.corrupt_rate, seed=d.data_seed + 3, hide=d.corrupt_hidden)
    standardizer = Standardizer.fit(dataset, "train", skip=activations) if d.standardize else None
    if standardizer is not None:
        dataset = standardizer(dataset)
    return PreparedData(dataset, inputs, standardizer, corrupted)


def model_spec(dataset: MultimodalDataset) -> ModelSpec:
    return ModelSpec(
        {m: tuple(dataset.data[m].shape[1:]) for m in dataset.modalities},
        vocab_size=len(dataset.metadata.get("vocabulary", [])) or 201,
        sample_rate=dataset.metadata.get("sample_rate", 8000),
    )


def make_model(cfg: RunConfig, spec: ModelSpec, ways: int | None = None) -> FusionModel:
    m = cfg.model
    spec = ModelSpec(dict(spec.input_shapes), spec.vocab_size, spec.sample_rate)
    if m.modalities:
        unknown = [x for x in m.modalities if x not in spec.input_shapes]
        if unknown:
            raise InputError(
                f"model.modalities names {', '.join(map(repr, unknown))}, which the data does not "
                f"provide ({', '.join(spec.input_shapes)})"
            )
        spec.input_shapes = {x: spec.input_shapes[x] for x in m.modalities}
    fusion_options, encoder_options = split_model_options(m.options)
    encoders = m.encoders
    if m.modalities or cfg.data.modalities:  # a config's encoders for modalities left out do not apply
        encoders = {x: e for x, e in encoders.items() if x in spec.input_shapes}
        encoder_options = {x: o for x, o in encoder_options.items() if x in spec.input_shapes}
    return build_model(
        spec,
        ways or cfg.data.ways,
        width=m.width,
        hidden=m.hidden,
        fusion=m.fusion,
        encoders=encoders,
        fusion_options=fusion_options,
        encoder_options=encoder_options,
    )


def make_algorithm(cfg: RunConfig, model: FusionModel, spec: ModelSpec, train_classes: list[int]) -> MetaAlgorithm:
    """The configured algorithm around ``model``: its class reads what it needs from the config."""
    return ALGORITHMS.get(cfg.algo.name).from_config(cfg, model, spec, train_classes)


@dataclass
class Experiment:
    cfg: RunConfig  # resolved
    data: PreparedData
    model: FusionModel
    algorithm: MetaAlgorithm
    train_sampler: EpisodeSampler

    @property
    def dataset(self) -> MultimodalDataset:
        return self.data.dataset

    @cached_property
    def val_episodes(self) -> FixedEpisodes:
        """The fixed validation episodes, drawn when first needed (meta-test and fine-tune never need them)."""
        d = self.cfg.data
        return fixed_episodes(self.dataset, "val", d.ways, d.shots, d.queries, d.val_episodes, seed=d.episode_seed + 1)

    @property
    def corrupted(self) -> Tensor | None:
        """``data.corrupt_rate``'s corrupted entries, ``[N, M]`` in the model's modality order (None: none)."""
        corrupted = self.data.corrupted
        if corrupted is None:
            return None
        return corrupted[:, [self.dataset.modalities.index(m) for m in self.model.modalities]]

    def test_episodes(self, count: int | None = None, split: str = "test") -> FixedEpisodes:
        """The fixed evaluation episodes: a function of the data config and episode_seed only."""
        d = self.cfg.data
        return fixed_episodes(
            self.dataset, split, d.ways, d.shots, d.queries, count or d.test_episodes, seed=d.episode_seed
        )


def build_experiment(cfg: RunConfig, dataset: PreparedData | MultimodalDataset | None = None) -> Experiment:
    """The experiment ``cfg`` describes, on ``dataset`` where given (prepared already, or a dataset taken as
    it is), else on what ``load_dataset(cfg)`` prepares."""
    cfg = resolve(cfg)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if dataset is None:
        data = load_dataset(cfg)
    else:
        data = PreparedData.of(dataset) if isinstance(dataset, MultimodalDataset) else dataset
    dataset = data.dataset
    torch.manual_seed(cfg.train.seed)
    spec = model_spec(dataset)
    model = make_model(cfg, spec).to(cfg.train.device)
    algorithm = make_algorithm(cfg, model, spec, dataset.splits["train"])
    d = cfg.data
    sampler = EpisodeSampler(
        dataset,
        "train",
        d.train_ways,
        d.train_shots,
        d.train_queries,
        seed=cfg.train.seed,
        modality_dropout=d.modality_dropout,
    )
    EpisodeSampler(dataset, "val", d.ways, d.shots, d.queries)  # the val split can serve them: checked up front
    return Experiment(cfg, data, model, algorithm, sampler)


@dataclass
class TrainedModel:
    """A meta-trained model with everything that turns a user's files into its inputs: what a
    checkpoint's ``model_args`` rebuild without the training data (``TrainedModel.restore``)."""

    cfg: RunConfig  # resolved
    algorithm: MetaAlgorithm
    spec: ModelSpec
    train_classes: list[int]  # the meta-train classes (the fine-tune baseline's pre-training head)
    inputs: InputFormat  # how to read files into the shapes the model takes
    standardizer: Standardizer | None  # the meta-train split's statistics
    train_class_names: list[str] | None = None  # the meta-train classes' names, where the data names them

    @property
    def model(self) -> FusionModel:
        return self.algorithm.model

    @staticmethod
    def of(exp: Experiment) -> TrainedModel:
        d = exp.dataset
        train = list(d.splits.get("train", []))
        names = d.metadata.get("class_names")
        return TrainedModel(
            exp.cfg,
            exp.algorithm,
            model_spec(d),
            train,
            exp.data.inputs,
            exp.data.standardizer,
            [str(names[c]) for c in train] if names is not None and len(names) else None,
        )

    def model_args(self) -> dict[str, Any]:
        """What ``restore`` needs besides the config and the weights (in every checkpoint, as nanoGPT
        saves its ``model_args``): model spec, meta-train classes, input format, standardisation."""
        return {
            "spec": asdict(self.spec),
            "train_classes": self.train_classes,
            "inputs": self.inputs.to_dict(),
            "standardizer": self.standardizer.stats if self.standardizer is not None else None,
            "train_class_names": self.train_class_names,
        }

    def set_ways(self, ways: int) -> None:
        """Tasks with another number of classes than the config's get a fresh head of their own."""
        if ways != self.cfg.data.ways:
            self.algorithm.reset_head(ways)

    def prepare(self, data: MultimodalDataset) -> MultimodalDataset:
        """A user's data through the pipeline the model was meta-trained on: frozen features where the
        encoder is frozen, then the meta-train split's standardisation (never refitted on the user's data)."""
        data, _ = with_frozen_features(self.cfg, data)
        return self.standardizer(data) if self.standardizer is not None else data

    @staticmethod
    def restore(state: dict[str, Any], device: str | None = None, ways: int | None = None) -> TrainedModel:
        """The model of a checkpoint (``state["module"]`` loaded) from its ``config`` and ``model_args``,
        without the training data. ``ways``: the task's number of classes, where it was set for one."""
        cfg = resolve(from_dict(state["config"]))
        if device is not None:
            cfg.train.device = device
        args = state["model_args"]
        shapes = {m: tuple(s) for m, s in args["spec"]["input_shapes"].items()}
        spec = ModelSpec(**{**args["spec"], "input_shapes": shapes})
        with torch.random.fork_rng(devices=[]):  # the initial weights are overwritten: leave the caller's RNG be
            model = make_model(cfg, spec).to(cfg.train.device)
            algorithm = make_algorithm(cfg, model, spec, args["train_classes"])
            trained = TrainedModel(
                cfg,
                algorithm,
                spec,
                list(args["train_classes"]),
                InputFormat.from_dict(args["inputs"]),
                Standardizer(args["standardizer"]) if args["standardizer"] else None,
                args.get("train_class_names"),
            )
            if ways is not None:
                trained.set_ways(ways)
        load_trained(algorithm, state)
        return trained


def load_trained(algorithm: MetaAlgorithm, state: dict[str, Any]) -> None:
    """A checkpoint's meta-parameters into ``algorithm``, the algorithm's own state where the checkpoint
    holds it (Reptile's inner optimizer, which ``algo.warm_test_optimizer`` evaluates from), and the centroid's
    share of its predictions that selection chose (``engine.selection``; 0 where none ran)."""
    algorithm.module.load_state_dict(state["module"])
    if "algorithm" in state:
        algorithm.load_state_dict(state["algorithm"])
    algorithm.centroid_weight = (state.get("selection") or {}).get("centroid_weight", 0.0)


def model_args(exp: Experiment) -> dict[str, Any]:
    return TrainedModel.of(exp).model_args()
