"""The synthetic multimodal set: deterministic, fast, and built so that fusion beats any single modality."""

import time

import pytest
import torch

from metafusion.data import EpisodeSampler, Standardizer, make_synthetic
from metafusion.data.synthetic import VOCAB_SIZE, decode_text, vocabulary


def test_deterministic_from_seed():
    a, b = make_synthetic(20, 5, seed=3), make_synthetic(20, 5, seed=3)
    c = make_synthetic(20, 5, seed=4)
    for m in a.modalities:
        assert torch.equal(a.data[m], b.data[m])
    assert not torch.equal(a.data["image"], c.data["image"])


@pytest.mark.slow
def test_builds_several_hundred_classes_in_seconds():
    start = time.perf_counter()
    ds = make_synthetic(num_classes=300, samples_per_class=20)
    assert time.perf_counter() - start < 30  # generous bound for a loaded 2-core machine
    assert len(ds.class_counts()) == 300 and len(ds) == 6000
    assert ds.data["text"].dtype == torch.long and ds.data["text"].max() <= 200
    words = decode_text(ds.data["text"][0], vocabulary()).split()
    assert len(words) == 12


def test_each_modality_is_ambiguous_but_the_tuple_is_unique():
    ds = make_synthetic(num_classes=100, samples_per_class=2)
    protos = ds.metadata["prototypes"]  # (classes, modalities)
    for j in range(protos.shape[1]):
        assert len(torch.unique(protos[:, j])) == 10  # 10 classes share each prototype per modality
    assert len(torch.unique(protos, dim=0)) == 100


def _feature(batch, m):
    x = batch.inputs[m]
    if m == "text":  # bag of words (up to 8 synonyms of each keyword)
        return torch.zeros(len(x), 8 * VOCAB_SIZE + 1).scatter_add_(1, x, torch.ones_like(x, dtype=torch.float))
    if m == "audio":  # magnitude spectrum: independent of the random phase
        return torch.fft.rfft(x.flatten(1)).abs()
    return x.flatten(1).float()


def _nearest_neighbour_accuracy(ds, modalities, episodes=150):
    """5-way 1-shot nearest-neighbour accuracy; fused = per-modality distances, each scaled by its
    mean, summed (no learning involved: this measures the data, not a model)."""
    sampler = EpisodeSampler(ds, "test", 5, 1, 10, seed=0)
    correct = total = 0
    for _ in range(episodes):
        ep = sampler.sample()
        d = 0
        for m in modalities:
            dm = torch.cdist(_feature(ep.query, m), _feature(ep.support, m))
            d = d + dm / dm.mean()
        correct += (d.argmin(1) == ep.query.labels).sum().item()
        total += len(ep.query)
    return correct / total


@pytest.mark.slow
def test_fusing_modalities_beats_the_best_single_modality():
    ds = make_synthetic(num_classes=100, samples_per_class=12, seed=0)
    ds = Standardizer.fit(ds)(ds)
    single = {m: _nearest_neighbour_accuracy(ds, [m]) for m in ds.modalities}
    fused = _nearest_neighbour_accuracy(ds, list(ds.modalities))
    assert fused > max(single.values()) + 0.05, (single, fused)


@pytest.mark.slow
def test_nuisance_hides_the_classes_from_raw_inputs_but_not_from_what_a_learner_can_undo():
    """With nuisance, nearest neighbour on raw inputs falls in every modality; merging the synonyms of each
    keyword (what a learned embedding can do) brings the text back."""
    plain = Standardizer.fit(make_synthetic(100, 12, seed=0))(make_synthetic(100, 12, seed=0))
    hard = make_synthetic(100, 12, nuisance=1.0, seed=0)
    assert hard.data["text"].max() > VOCAB_SIZE and len(hard.metadata["vocabulary"]) == 8 * VOCAB_SIZE + 1
    hard = Standardizer.fit(hard)(hard)
    for m in ("image", "tabular", "text"):
        assert _nearest_neighbour_accuracy(hard, [m]) < _nearest_neighbour_accuracy(plain, [m]) - 0.15, m
    merged = hard.data["text"].clone()
    merged[merged > 0] = (merged[merged > 0] - 1) % VOCAB_SIZE + 1
    hard.data["text"] = merged
    raw = _nearest_neighbour_accuracy(make_synthetic(100, 12, nuisance=1.0, seed=0), ["text"])
    assert _nearest_neighbour_accuracy(hard, ["text"]) > raw + 0.1


def test_fewer_prototypes_make_each_modality_more_ambiguous_and_keep_classes_unique():
    ds = make_synthetic(num_classes=300, samples_per_class=2, prototypes=6)
    protos = ds.metadata["prototypes"]
    assert [len(torch.unique(protos[:, j])) for j in range(protos.shape[1])] == [6, 6, 6, 6]
    assert len(torch.unique(protos, dim=0)) == 300
