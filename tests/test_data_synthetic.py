"""The synthetic multimodal set: deterministic, fast, and built so that fusion beats any single modality."""

import time

import torch

from metafusion.data import EpisodeSampler, Standardizer, make_synthetic
from metafusion.data.synthetic import decode_text, vocabulary


def test_deterministic_from_seed():
    a, b = make_synthetic(20, 5, seed=3), make_synthetic(20, 5, seed=3)
    c = make_synthetic(20, 5, seed=4)
    for m in a.modalities:
        assert torch.equal(a.data[m], b.data[m])
    assert not torch.equal(a.data["image"], c.data["image"])


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
    if m == "text":  # bag of words
        return torch.zeros(len(x), 201).scatter_add_(1, x, torch.ones_like(x, dtype=torch.float))
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


def test_fusing_modalities_beats_the_best_single_modality():
    ds = make_synthetic(num_classes=100, samples_per_class=12, seed=0)
    ds = Standardizer.fit(ds)(ds)
    single = {m: _nearest_neighbour_accuracy(ds, [m]) for m in ds.modalities}
    fused = _nearest_neighbour_accuracy(ds, list(ds.modalities))
    assert fused > max(single.values()) + 0.05, (single, fused)
