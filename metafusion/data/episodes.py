"""EpisodeSampler: N-way K-shot multimodal episodes on learn2learn's MetaDataset / TaskDataset.

learn2learn's ``NWays`` and ``KShots`` transforms choose the classes and the ``shots + queries`` rows
per class. The rows are then gathered from the dataset's tensors in one indexing operation (this
replaces learn2learn's ``LoadData`` + collate, which load one sample at a time) and split per class
into support and query, with labels remapped to 0..ways-1 in the order NWays drew the classes (what
``RemapLabels(shuffle=False)`` does).

learn2learn's transforms draw from Python's global ``random`` module. Each sampler keeps its own
random state and swaps it in only while it draws, so episodes depend on the sampler's seed alone:
the same seed gives identical episodes in any process and for any algorithm, and sampling never
disturbs (or is disturbed by) other users of ``random``.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import random
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch.utils.data import Dataset

from .._learn2learn import KShots, MetaDataset, NWays, TaskDataset
from .batch import Batch, Episode
from .dataset import DataError, MultimodalDataset


class _SplitLabels(Dataset):
    """What learn2learn needs to see of one split: its labels (samples are gathered by us)."""

    def __init__(self, labels: list[int]):
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return i, self.labels[i]


class EpisodeSampler:
    """Draws episodes from the classes of one split.

    >>> sampler = EpisodeSampler(dataset, "train", ways=5, shots=1, queries=15, seed=0)
    >>> episode = sampler.sample()          # Episode(support: 5 rows, query: 75 rows)
    """

    def __init__(
        self,
        dataset: MultimodalDataset,
        split: str,
        ways: int,
        shots: int,
        queries: int,
        seed: int = 0,
        modality_dropout: float = 0.0,
    ):
        if split not in dataset.splits:
            raise DataError(f"{dataset.name} has no split {split!r}; it has: {', '.join(dataset.splits)}")
        classes = dataset.splits[split]
        if ways > len(classes):
            raise DataError(
                f"{dataset.name}: {ways}-way episodes need {ways} classes, but the {split!r} split has {len(classes)}"
            )
        if shots < 1 or queries < 0:
            raise DataError(f"shots must be >= 1 and queries >= 0 (got shots={shots}, queries={queries})")
        counts = dataset.class_counts()
        need = shots + queries
        short = [(c, counts.get(c, 0)) for c in classes if counts.get(c, 0) < need]
        if short:
            names = dataset.metadata.get("class_names") or []
            label = (lambda c: repr(names[c])) if len(names) > max(c for c, _ in short) else (lambda c: f"class {c}")
            shown = ", ".join(f"{label(c)} has {n}" for c, n in short[:5])
            raise DataError(
                f"{dataset.name} {split!r} split: {len(short)} classes have fewer than "
                f"shots + queries = {shots} + {queries} = {need} samples ({shown}"
                f"{', ...' if len(short) > 5 else ''})"
            )
        self.dataset, self.split = dataset, split
        self.ways, self.shots, self.queries = ways, shots, queries
        self.modality_dropout = modality_dropout
        self.rows = dataset.rows_of_classes(classes)  # split-local index -> dataset row
        labels = dataset.targets[self.rows].tolist()
        labels_to_indices: dict[int, list[int]] = defaultdict(list)
        for i, label in enumerate(labels):
            labels_to_indices[label].append(i)
        meta = MetaDataset(_SplitLabels(labels), labels_to_indices=dict(labels_to_indices))
        self._tasks = TaskDataset(meta, task_transforms=[NWays(meta, n=ways), KShots(meta, k=need)])
        self._labels = torch.tensor(labels)
        self._random = random.Random(seed)
        self._torch = torch.Generator().manual_seed(seed)

    @contextlib.contextmanager
    def _own_random(self):
        outside = random.getstate()
        random.setstate(self._random.getstate())
        try:
            yield
        finally:
            self._random.setstate(random.getstate())
            random.setstate(outside)

    def sample(self) -> Episode:
        with self._own_random():
            description = self._tasks.sample_task_description()
        local = torch.tensor([dd.index for dd in description])
        labels = self._labels[local]
        classes = list(dict.fromkeys(labels.tolist()))  # NWays' draw order
        support_rows, query_rows = [], []
        for c in classes:
            rows = self.rows[local[labels == c]]
            support_rows.append(rows[: self.shots])
            query_rows.append(rows[self.shots :])
        support_rows, query_rows = torch.cat(support_rows), torch.cat(query_rows)
        remap = {c: i for i, c in enumerate(classes)}
        support = self._relabel(self.dataset.batch(support_rows), remap)
        query = self._relabel(self.dataset.batch(query_rows), remap)
        return Episode(
            support,
            query,
            self.ways,
            self.shots,
            self.queries,
            tuple(classes),
            tuple(torch.cat([support_rows, query_rows]).tolist()),
        )

    def _relabel(self, batch: Batch, remap: dict[int, int]) -> Batch:
        batch.labels = torch.tensor([remap[c] for c in batch.labels.tolist()])
        if self.modality_dropout > 0:
            batch = drop_modalities(batch, self.modality_dropout, self._torch)
        return batch

    # Checkpoints store the sampler's position so a resumed run draws the same episodes.
    def state_dict(self) -> dict:
        return {"random": self._random.getstate(), "torch": self._torch.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self._random.setstate(state["random"])
        self._torch.set_state(state["torch"])


def drop_modalities(batch: Batch, rate: float, generator: torch.Generator) -> Batch:
    """Train-time modality dropout: mask each present modality with probability ``rate``,
    always keeping at least one modality per sample; dropped inputs are zeroed."""
    drop = (torch.rand(batch.mask.shape, generator=generator) < rate) & batch.mask
    mask = batch.mask & ~drop
    empty = ~mask.any(dim=1)
    mask[empty] = batch.mask[empty]  # a sample that would lose everything keeps what it had
    inputs = {}
    for j, m in enumerate(batch.modalities):
        x = batch.inputs[m]
        keep = mask[:, j].reshape(-1, *([1] * (x.dim() - 1)))
        inputs[m] = torch.where(keep, x, torch.zeros((), dtype=x.dtype))
    return Batch(inputs, mask, batch.labels, batch.modalities)


class FixedEpisodes(Sequence[Episode]):
    """``count`` evaluation episodes fixed by ``seed``: identical in every run and for every algorithm.
    They are drawn again on each pass (drawing only indexes tensors), never all held at once, so the
    memory of an evaluation does not grow with its number of episodes. A prefix slice (``[:n]``) is the
    first ``n`` of them."""

    def __init__(
        self, dataset: MultimodalDataset, split: str, ways: int, shots: int, queries: int, count: int, seed: int = 0
    ):
        self._args = (dataset, split, ways, shots, queries)
        self.count, self.seed = count, seed
        EpisodeSampler(dataset, split, ways, shots, queries, seed=seed)  # a split that cannot serve them fails now

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Episode]:
        sampler = EpisodeSampler(*self._args, seed=self.seed)
        return (sampler.sample() for _ in range(self.count))

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(self.count)
            if start == 0 and step == 1:
                return FixedEpisodes(*self._args, count=stop, seed=self.seed)
            return list(itertools.islice(self, start, stop, step))
        index = range(self.count)[index]  # negative indices; IndexError past the end
        return next(itertools.islice(self, index, None))


def fixed_episodes(
    dataset: MultimodalDataset, split: str, ways: int, shots: int, queries: int, count: int, seed: int = 0
) -> FixedEpisodes:
    """``count`` evaluation episodes fixed by ``seed`` (``FixedEpisodes``)."""
    return FixedEpisodes(dataset, split, ways, shots, queries, count, seed)


def episodes_fingerprint(episodes: Iterable[Episode]) -> str:
    """One hash over a list of episodes (e.g. to prove two algorithms saw the same test tasks)."""
    return fingerprint_of(e.fingerprint() for e in episodes)


def fingerprint_of(fingerprints: Iterable[str]) -> str:
    """``episodes_fingerprint`` from the episodes' own fingerprints."""
    return hashlib.sha1("".join(fingerprints).encode()).hexdigest()[:16]
