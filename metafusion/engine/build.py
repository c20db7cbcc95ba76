"""Config -> the objects of one experiment: prepared dataset, model, algorithm, samplers, episodes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from ..algorithms import ALGORITHMS, MetaAlgorithm
from ..config import RunConfig, resolve
from ..data import DATASETS, Episode, EpisodeSampler, MultimodalDataset, Standardizer, fixed_episodes
from ..data.cache import cached
from ..data.synthetic import decode_text
from ..errors import InputError
from ..models import ENCODERS, FrozenTextModel, FusionModel, ModelSpec, build_model


def load_dataset(cfg: RunConfig) -> MultimodalDataset:
    """The dataset as the model will see it: chosen modalities, missing rate, frozen text features,
    and standardisation fitted on the meta-train split only (kept in ``metadata["standardizer"]``, so
    that a user's own data later goes through the same statistics: ``as_model_inputs``)."""
    d = cfg.data
    dataset = DATASETS.build(d.dataset, d)
    if d.modalities:
        dataset = dataset.select_modalities(d.modalities)
    if d.missing_rate > 0 and d.dataset != "synthetic":  # synthetic applies it while generating
        dataset = dataset.with_missing(d.missing_rate, seed=d.data_seed + 1)
    dataset = with_encoder_features(cfg, dataset)
    if d.standardize:
        standardizer = Standardizer.fit(dataset, "train")
        dataset = standardizer(dataset)
        dataset.metadata["standardizer"] = standardizer
    return dataset


def with_encoder_features(cfg: RunConfig, dataset: MultimodalDataset) -> MultimodalDataset:
    """Modalities whose encoder is a frozen pretrained model replaced by that model's features."""
    for m, name in cfg.model.encoders.items():
        if m in dataset.modalities and getattr(ENCODERS.get(name), "frozen_features", None):
            dataset = with_frozen_text_features(dataset, m)
    return dataset


def as_model_inputs(exp: Experiment, data: MultimodalDataset) -> MultimodalDataset:
    """A user's own data through the pipeline the model was meta-trained on: frozen features where
    the encoder is frozen, then the meta-train split's standardisation (never refitted on the user's data)."""
    data = with_encoder_features(exp.cfg, data)
    standardizer = exp.dataset.metadata.get("standardizer")
    return standardizer(data) if standardizer is not None else data


def with_frozen_text_features(dataset: MultimodalDataset, modality: str) -> MultimodalDataset:
    """Replace token ids by pretrained sentence features, computed once per sample and cached on disk
    (keyed by the texts themselves: the features are a function of the strings and the model)."""
    texts = dataset.metadata.get("texts")
    if texts is None:
        vocab = dataset.metadata["vocabulary"]
        texts = [decode_text(ids, vocab) for ids in dataset.data[modality]]
    key = hashlib.sha1("\x00".join(texts).encode()).hexdigest()[:16]
    features = cached(f"text/minilm_{key}.pt", lambda: FrozenTextModel().embed(texts))
    return dataset.map_modality(modality, lambda _: features)


def model_spec(dataset: MultimodalDataset) -> ModelSpec:
    return ModelSpec(
        {m: tuple(dataset.data[m].shape[1:]) for m in dataset.modalities},
        vocab_size=len(dataset.metadata.get("vocabulary", [])) or 201,
        sample_rate=dataset.metadata.get("sample_rate", 8000),
    )


def make_model(cfg: RunConfig, dataset: MultimodalDataset, ways: int | None = None) -> FusionModel:
    m = cfg.model
    spec = model_spec(dataset)
    if m.modalities:
        unknown = [x for x in m.modalities if x not in spec.input_shapes]
        if unknown:
            raise InputError(
                f"model.modalities names {', '.join(map(repr, unknown))}, which the data does not "
                f"provide ({', '.join(spec.input_shapes)})"
            )
        spec.input_shapes = {x: spec.input_shapes[x] for x in m.modalities}
    encoders = m.encoders
    if m.modalities or cfg.data.modalities:  # a config's encoders for modalities left out do not apply
        encoders = {x: e for x, e in encoders.items() if x in spec.input_shapes}
    return build_model(
        spec,
        ways or cfg.data.ways,
        width=m.width,
        hidden=m.hidden,
        fusion=m.fusion,
        attention=m.attention,
        encoders=encoders,
    )


def make_algorithm(cfg: RunConfig, model: FusionModel, dataset: MultimodalDataset) -> MetaAlgorithm:
    a = cfg.algo
    kwargs = dict(
        inner_lr=a.inner_lr,
        inner_steps=a.inner_steps,
        inner_lr_test=a.inner_lr_test,
        inner_steps_test=a.inner_steps_test,
        transductive=a.transductive,
        adapt_scope=cfg.model.adapt,
        first_order=a.first_order,
        batched_eval=a.batched_eval,
    )
    if a.learn_inner_lr:
        kwargs.update(learn_inner_lr=True)
    if a.task_batched:
        if a.name not in ("maml", "fomaml", "anil"):
            raise InputError(f"algo.task_batched applies to maml, fomaml and anil, not {a.name!r}")
        kwargs.update(task_batched=True)
    if a.name == "reptile":
        kwargs.update(inner_batch=a.inner_batch, inner_optimizer=a.inner_optimizer, seed=cfg.train.seed)
    if a.name == "finetune":
        kwargs.update(train_classes=dataset.splits["train"])
    if a.name in ("protonet", "centroid"):
        kwargs.update(metric=a.metric)
    if a.name == "centroid":
        kwargs.update(vocab_size=model_spec(dataset).vocab_size)
    if a.proto_init:
        kwargs.update(proto_init=True)
    return ALGORITHMS.build(a.name, model, **kwargs)


@dataclass
class Experiment:
    cfg: RunConfig  # resolved
    dataset: MultimodalDataset
    model: FusionModel
    algorithm: MetaAlgorithm
    train_sampler: EpisodeSampler
    val_episodes: list[Episode]

    def test_episodes(self, count: int | None = None, split: str = "test") -> list[Episode]:
        """The fixed evaluation episodes: a function of the data config and episode_seed only."""
        d = self.cfg.data
        return fixed_episodes(
            self.dataset, split, d.ways, d.shots, d.queries, count or d.test_episodes, seed=d.episode_seed
        )


def build_experiment(cfg: RunConfig, dataset: MultimodalDataset | None = None) -> Experiment:
    cfg = resolve(cfg)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    dataset = dataset if dataset is not None else load_dataset(cfg)
    torch.manual_seed(cfg.train.seed)
    model = make_model(cfg, dataset).to(cfg.train.device)
    algorithm = make_algorithm(cfg, model, dataset)
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
    val = fixed_episodes(dataset, "val", d.ways, d.shots, d.queries, d.val_episodes, seed=d.episode_seed + 1)
    return Experiment(cfg, dataset, model, algorithm, sampler, val)
