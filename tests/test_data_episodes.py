"""Episodic sampling: shapes, label remapping, disjointness, determinism, masks, and clear errors."""

import random
import subprocess
import sys

import pytest
import torch

from metafusion.data import (
    DataError,
    EpisodeSampler,
    MultimodalDataset,
    Standardizer,
    drop_modalities,
    episodes_fingerprint,
    fixed_episodes,
)


def test_episode_shapes_and_label_remap(small_synthetic):
    ep = EpisodeSampler(small_synthetic, "train", ways=5, shots=2, queries=3, seed=1).sample()
    assert len(ep.support) == 10 and len(ep.query) == 15
    assert ep.support.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert sorted(ep.query.labels.tolist()) == sorted([c for c in range(5) for _ in range(3)])
    assert ep.support.inputs["image"].shape == (10, 1, 28, 28)
    assert ep.support.inputs["audio"].shape == (10, 1, 4000)
    assert ep.support.mask.shape == (10, 4)
    # Episode labels map back to the original classes, all from the train split.
    rows = torch.tensor(ep.indices[:10])
    assert [ep.classes[y] for y in ep.support.labels.tolist()] == small_synthetic.targets[rows].tolist()
    assert set(ep.classes) <= set(small_synthetic.splits["train"])


def test_support_and_query_are_disjoint(small_synthetic):
    sampler = EpisodeSampler(small_synthetic, "train", 5, 1, 15, seed=0)
    for _ in range(20):
        ep = sampler.sample()
        support, query = set(ep.indices[:5]), set(ep.indices[5:])
        assert not support & query and len(query) == 75


def test_splits_are_disjoint_and_checked(small_synthetic):
    s = small_synthetic.splits
    assert not (set(s["train"]) & set(s["val"]) or set(s["train"]) & set(s["test"]) or set(s["val"]) & set(s["test"]))
    with pytest.raises(DataError, match="class 0 is in both"):
        MultimodalDataset(
            small_synthetic.data,
            small_synthetic.present,
            small_synthetic.targets,
            small_synthetic.modalities,
            {"train": [0, 1], "test": [0]},
        )


@pytest.mark.slow
def test_evaluation_episodes_identical_across_processes(small_synthetic):
    here = episodes_fingerprint(fixed_episodes(small_synthetic, "test", 5, 1, 5, count=10, seed=3))
    code = (
        "from metafusion.data import make_synthetic, fixed_episodes, episodes_fingerprint;"
        "ds = make_synthetic(num_classes=40, samples_per_class=20, seed=0);"
        "print(episodes_fingerprint(fixed_episodes(ds, 'test', 5, 1, 5, count=10, seed=3)))"
    )
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert here == there
    other = episodes_fingerprint(fixed_episodes(small_synthetic, "test", 5, 1, 5, count=10, seed=4))
    assert other != here


def test_sampler_neither_uses_nor_disturbs_global_random(small_synthetic):
    random.seed(123)
    expected = random.random()
    random.seed(123)
    a = EpisodeSampler(small_synthetic, "train", 5, 1, 1, seed=0).sample()
    assert random.random() == expected  # global state untouched by sampling
    random.seed(999)  # and global state does not influence the episodes
    b = EpisodeSampler(small_synthetic, "train", 5, 1, 1, seed=0).sample()
    assert a.fingerprint() == b.fingerprint()


def test_sampler_state_round_trip(small_synthetic):
    s = EpisodeSampler(small_synthetic, "train", 5, 1, 1, seed=0)
    s.sample()
    state = s.state_dict()
    nxt = s.sample().fingerprint()
    s.load_state_dict(state)
    assert s.sample().fingerprint() == nxt


def test_missing_modalities_are_masked_and_zero(small_synthetic):
    ds = small_synthetic.with_missing(0.5, seed=0)
    assert ds.present.any(1).all(), "every sample keeps at least one modality"
    frac = 1 - ds.present.float().mean().item()
    assert 0.3 < frac < 0.5
    for j, m in enumerate(ds.modalities):
        absent = ~ds.present[:, j]
        assert (ds.data[m][absent] == 0).all()
    ep = EpisodeSampler(ds, "train", 5, 1, 3, seed=0).sample()
    for j, m in enumerate(ep.query.modalities):
        assert (ep.query.inputs[m][~ep.query.mask[:, j]] == 0).all()


def test_a_modality_goes_missing_in_the_classes_named_only(small_synthetic):
    """SMIL's setting: most meta-train samples without their image, test samples complete."""
    ds = small_synthetic.without_modality("image", 0.9, small_synthetic.splits["train"], seed=0)
    train = torch.isin(ds.targets, torch.tensor(ds.splits["train"]))
    assert 0.85 < 1 - ds.present[train, 0].float().mean().item() < 0.95
    assert ds.present[~train].all() and ds.present[:, 1:].equal(small_synthetic.present[:, 1:])
    assert (ds.data["image"][~ds.present[:, 0]] == 0).all() and small_synthetic.data["image"].abs().sum() > 0
    only = small_synthetic.select_modalities(["image"]).without_modality("image", 0.9, ds.splits["train"])
    assert only.present.all(), "a sample never loses its last modality"
    with pytest.raises(DataError, match="has no modality 'photo'"):
        ds.without_modality("photo", 0.5, ds.splits["train"])


def test_a_corrupted_modality_holds_another_class_of_the_same_split(small_synthetic):
    ds, corrupted = small_synthetic.with_corruption(0.3, seed=1)
    assert 0.25 < corrupted.float().mean().item() < 0.35 and ds.present.equal(small_synthetic.present)
    split_of = {c: name for name, classes in ds.splits.items() for c in classes}
    for j, m in enumerate(ds.modalities):
        old, new = small_synthetic.data[m].flatten(1), ds.data[m].flatten(1)
        assert new[~corrupted[:, j]].equal(old[~corrupted[:, j]])
        for row in torch.nonzero(corrupted[:, j]).flatten()[:20].tolist():
            donors = torch.nonzero((old == new[row]).all(1)).flatten().tolist()  # the rows it was copied from
            assert any(
                int(ds.targets[d]) != int(ds.targets[row])
                and split_of[int(ds.targets[d])] == split_of[int(ds.targets[row])]
                for d in donors
            )
    again, _ = small_synthetic.with_corruption(0.3, seed=1)
    assert all(again.data[m].equal(ds.data[m]) for m in ds.modalities)
    assert small_synthetic.with_corruption(0.0) == (small_synthetic, None)


def test_hidden_corruption_masks_the_same_entries_unless_nothing_clean_is_left(small_synthetic):
    (shown, corrupted), (hidden, hidden_corrupted) = (
        small_synthetic.with_corruption(0.5, seed=1, hide=hide) for hide in (False, True)
    )
    assert hidden_corrupted.equal(corrupted)
    all_wrong = (corrupted == small_synthetic.present).all(1)  # every present modality corrupted
    assert all_wrong.any() and hidden.present[all_wrong].equal(small_synthetic.present[all_wrong])
    assert hidden.present[~all_wrong].equal((small_synthetic.present & ~corrupted)[~all_wrong])
    assert hidden.present.any(1).all(), "a sample keeps at least one modality"


def test_missing_and_corrupted_modalities_from_the_config():
    from metafusion.config import load_config
    from metafusion.engine.build import load_dataset

    tiny = {"data.num_classes": 30, "data.samples_per_class": 10, "data.standardize": False}
    cfg = load_config(None, {**tiny, "data.test_missing": {"audio": 0.5}, "data.corrupt_rate": 0.2})
    prepared = load_dataset(cfg)
    ds, corrupted = prepared.dataset, prepared.corrupted
    test = torch.isin(ds.targets, torch.tensor(ds.splits["test"]))
    assert not ds.present[test, 1].all() and ds.present[~test].all()
    assert corrupted.any() and not corrupted[~ds.present].any()
    pipeline_state = {"corrupted", "standardizer", "inputs", "unstandardized", "labelled"}
    assert not pipeline_state & set(ds.metadata)  # the dataset's facts only
    with pytest.raises(ValueError, match=r"data.train_missing.image must be in \[0, 1\)"):
        load_config(None, {**tiny, "data.train_missing": {"image": 1.0}})
    with pytest.raises(ValueError, match="data.corrupt_rate is 0"):
        load_config(None, {**tiny, "data.corrupt_hidden": True})


def test_modality_dropout_keeps_one_modality(small_synthetic):
    ep = EpisodeSampler(small_synthetic, "train", 5, 1, 15, seed=0).sample()
    out = drop_modalities(ep.query, 0.9, torch.Generator().manual_seed(0))
    assert out.mask.any(1).all() and out.mask.sum() < ep.query.mask.sum()
    for j, m in enumerate(out.modalities):
        assert (out.inputs[m][~out.mask[:, j]] == 0).all()


def test_errors_name_the_problem(small_synthetic):
    with pytest.raises(DataError, match=r"20-way episodes need 20 classes, but the 'test' split has 8"):
        EpisodeSampler(small_synthetic, "test", 20, 1, 1)
    with pytest.raises(DataError, match=r"fewer than shots \+ queries = 5 \+ 16 = 21 samples.*class \d+ has 20"):
        EpisodeSampler(small_synthetic, "train", 5, 5, 16)
    with pytest.raises(DataError, match="no split 'dev'"):
        EpisodeSampler(small_synthetic, "dev", 5, 1, 1)
    with pytest.raises(DataError, match="no modality 'video'.*image, audio, text, tabular"):
        small_synthetic.select_modalities(["image", "video"])


def test_standardizer_uses_meta_train_statistics_only(small_synthetic):
    ds = small_synthetic
    std = Standardizer.fit(ds, "train")
    train_rows = ds.rows_of_classes(ds.splits["train"])
    mean, _ = std.stats["tabular"]
    assert torch.allclose(mean, ds.data["tabular"][train_rows].mean(0))
    assert not torch.allclose(mean, ds.data["tabular"].mean(0))
    out = std(ds)
    assert abs(out.data["image"][train_rows].mean().item()) < 1e-4
    assert "text" not in std.stats  # token ids are left alone
