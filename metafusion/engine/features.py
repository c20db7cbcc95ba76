"""The frozen parts of pretrained encoders, run once per sample when a dataset is prepared.

A modality whose encoder is a ``PretrainedEncoder`` is replaced by what the encoder's frozen part makes
of it (pooled features, or the activations its trainable top reads). The result is cached on disk under
``$METAFUSION_CACHE/features/<network and settings>/<hash of the inputs>.pt``: keyed by the inputs'
contents, so any dataset (a user's files included) hits the cache exactly when it holds the same samples,
and a later run loads it in seconds. Computing shows a progress bar and reports its time.
"""

from __future__ import annotations

import sys
import time

import torch
from tqdm import tqdm

from ..config import RunConfig
from ..data import MultimodalDataset
from ..data.cache import cache_root, cached
from ..data.synthetic import decode_text
from ..models.encoders import default_encoder, encoder_for
from ..models.encoders.pretrained import FrozenPart, PretrainedEncoder, content_key


def with_frozen_features(cfg: RunConfig, dataset: MultimodalDataset) -> tuple[MultimodalDataset, tuple[str, ...]]:
    """``dataset`` with each modality read by a pretrained encoder replaced by its frozen part's output, and
    the modalities whose output is activations a pretrained top reads as they are (never standardised)."""
    activations = []
    for m in dataset.modalities:
        if cfg.model.modalities and m not in cfg.model.modalities:
            continue  # the model does not read it
        encoder = encoder_for(m, cfg.model.encoders.get(m) or default_encoder(m))
        if issubclass(encoder, PretrainedEncoder):
            part = encoder.frozen_part(dataset.metadata, **cfg.model.options.get(m, {}))
            dataset = embed(dataset, m, part)
            if not part.standardize:
                activations.append(m)
    return dataset, tuple(activations)


def embed(dataset: MultimodalDataset, modality: str, part: FrozenPart) -> MultimodalDataset:
    """``dataset`` with ``modality`` replaced by ``part``'s output on its present rows (zeros elsewhere)."""
    rows = torch.nonzero(dataset.present[:, dataset.modalities.index(modality)]).flatten()
    if part.reads == "texts":
        texts = dataset.metadata.get("texts")
        if texts is None:  # token ids of a generated dataset: the sentences they encode
            texts = [decode_text(ids, dataset.metadata["vocabulary"]) for ids in dataset.data[modality]]
        source = [texts[i] for i in rows.tolist()]
        key = content_key(source)
    else:  # rows gathered only where the part runs: a large image tensor is hashed in place
        source = _Rows(dataset.data[modality], rows)
        key = content_key(dataset.data[modality], rows)
    relative = f"features/{part.name}/{key}.pt"
    features = cached(
        relative,
        lambda: _run(part, source, f"{dataset.name} {modality}"),
        valid=lambda x: isinstance(x, torch.Tensor) and x.is_floating_point() and len(x) == len(source),
    )
    full = features.new_zeros(len(dataset), *features.shape[1:])
    full[rows] = features
    return dataset.map_modality(modality, lambda _: full)


class _Rows:
    """``data[rows]`` gathered a slice at a time."""

    def __init__(self, data: torch.Tensor, rows: torch.Tensor):
        self.data, self.rows = data, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: slice) -> torch.Tensor:
        return self.data[self.rows[index]]


def _run(part: FrozenPart, source, what: str) -> torch.Tensor:
    """``part`` over ``source`` in chunks, with a progress bar and the time it took."""
    start = time.perf_counter()
    part.prepare(source)
    chunks = []
    bar = tqdm(total=len(source), desc=f"{what} -> {part.name}", unit="sample", leave=False, disable=None)
    for i in range(0, len(source), part.batch_size):
        chunks.append(part(source[i : i + part.batch_size]))
        bar.update(len(chunks[-1]))
    bar.close()
    seconds = time.perf_counter() - start
    print(
        f"{what}: {len(source)} samples through {part.name} in {seconds:.0f} s "
        f"({1000 * seconds / max(len(source), 1):.1f} ms each), cached in {cache_root() / 'features' / part.name}",
        file=sys.stderr,
    )
    return torch.cat(chunks) if chunks else torch.zeros(0)
