"""Stages: a user's own data goes through the pipeline the model was meta-trained on, and a checkpoint
carries what evaluation needs."""

import csv

import numpy as np
import pytest
import torch

from metafusion.config import load_config
from metafusion.data.synthetic import decode_text
from metafusion.engine import build_experiment, meta_test
from metafusion.engine.build import TrainedModel, raw_dataset
from metafusion.engine.checkpoint import load_checkpoint
from metafusion.engine.stages import stage_meta_test, stage_meta_train, user_task
from metafusion.models.encoders import ENCODERS
from metafusion.models.encoders.pretrained import PretrainedEncoder

TINY = {
    "data.num_classes": 30,
    "data.samples_per_class": 10,
    "data.queries": 2,
    "data.val_episodes": 1,
    "model.width": 8,
    "model.hidden": 8,
}


def _test_rows(exp, per_class: int = 3) -> list[list[int]]:
    """Dataset rows of three test classes, ``per_class`` each."""
    return [exp.dataset.rows_of_classes([c])[:per_class].tolist() for c in exp.dataset.splits["test"][:3]]


def test_a_users_data_is_standardised_with_the_meta_train_statistics(tmp_path):
    cfg = load_config(None, {**TINY, "data.modalities": ["tabular"]})
    exp = build_experiment(cfg)
    raw = raw_dataset(exp.cfg).select_modalities(["tabular"]).data["tabular"]
    classes = _test_rows(exp)
    for k, rows in enumerate(classes):  # the user's folder holds the raw vectors of these rows
        (tmp_path / f"c{k}").mkdir()
        for i, r in enumerate(rows):
            np.save(tmp_path / f"c{k}" / f"{i}.npy", raw[r].numpy())
    episode, _, _ = user_task(str(tmp_path), TrainedModel.of(exp), shots=1)
    expected = exp.dataset.data["tabular"][[rows[0] for rows in classes]]
    assert not torch.allclose(raw[[rows[0] for rows in classes]], expected)  # standardisation changes them
    assert torch.allclose(episode.support.inputs["tabular"], expected, atol=1e-6)


PRETRAINED_TEXT = [
    n for n in ENCODERS.names() if issubclass(c := ENCODERS.get(n), PretrainedEncoder) and "text" in c.modalities
]


@pytest.mark.slow
@pytest.mark.parametrize("encoder", PRETRAINED_TEXT)
def test_a_users_text_is_embedded_by_the_frozen_encoder_the_model_was_trained_on(tmp_path, encoder):
    cfg = load_config(None, {**TINY, "data.modalities": ["text"], "model.encoders": {"text": encoder}})
    exp = build_experiment(cfg)
    vocab = exp.dataset.metadata["vocabulary"]
    ids = raw_dataset(exp.cfg).select_modalities(["text"]).data["text"]
    classes = _test_rows(exp, per_class=2)
    lines = ["label,text"] + [f"c{k},{decode_text(ids[r], vocab)}" for k, rows in enumerate(classes) for r in rows]
    (tmp_path / "task.csv").write_text("\n".join(lines) + "\n")
    episode, _, _ = user_task(str(tmp_path / "task.csv"), TrainedModel.of(exp), shots=1)
    support = episode.support.inputs["text"]
    expected = exp.dataset.data["text"][[rows[0] for rows in classes]]
    assert support.is_floating_point() and support.shape == expected.shape  # sentence features, not token ids
    assert torch.allclose(support, expected, atol=1e-4)


@pytest.mark.slow
def test_meta_test_and_restore_take_reptiles_inner_optimizer_from_the_checkpoint(tmp_path):
    """``algo.warm_test_optimizer`` evaluates from the training inner Adam's moments, so the checkpoint's
    algorithm state must reach meta-test and a restored model: both then score what the trained model does."""
    settings = {**TINY, "data.modalities": ["tabular"], "data.test_episodes": 4, "train.iterations": 6}
    cfg = load_config(None, {**settings, "algo.name": "reptile", "algo.warm_test_optimizer": True})
    exp, _, run = stage_meta_train(cfg, tmp_path / "run", quiet=True)
    state = load_checkpoint(run / "last.pt")
    restored = TrainedModel.restore(state).algorithm
    trained = exp.algorithm.adam
    assert torch.equal(restored.adam.second_moment, trained.second_moment) and trained.second_moment.any()
    assert torch.equal(restored.adam.steps, trained.steps) and trained.steps.any()
    tested = stage_meta_test(run, checkpoint=run / "last.pt", quiet=True)
    in_memory = meta_test(exp.algorithm, exp.test_episodes())
    assert tested["loss"] == pytest.approx(in_memory.loss, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("fusion", ["mean", "attention"])
def test_meta_test_reports_the_weights_of_corrupted_and_clean_modalities(tmp_path, fusion):
    """With data.corrupt_rate, results.json holds the mean weight a fusion gives corrupted and clean modalities
    of the same query samples: equal under mean fusion (its weights are 1 / present modalities)."""
    tiny = {"data.num_classes": 30, "data.samples_per_class": 10, "data.queries": 3, "data.val_episodes": 2}
    tiny |= {"data.test_episodes": 8, "model.width": 8, "model.hidden": 8, "train.iterations": 2}
    tiny |= {"data.modalities": ["tabular", "text", "audio"], "data.corrupt_rate": 0.3, "model.fusion": fusion}
    _, _, run = stage_meta_train(load_config(None, {**tiny, "algo.name": "protonet"}), tmp_path / "run", quiet=True)
    split = stage_meta_test(run, quiet=True)["corrupted_weights"]
    assert split["samples"] > 0
    assert sum(split["corrupted_histogram"]) == sum(split["clean_histogram"]) == split["samples"]
    assert 0 < split["corrupted"] < 1 and 0 < split["clean"] < 1
    if fusion == "mean":
        assert split["corrupted"] == pytest.approx(split["clean"])
    assert (run / "corrupted_weights.png").stat().st_size > 0
    per_task = stage_meta_test(run, quiet=True)["task_weights"]
    assert per_task["tasks"] == 8 and list(per_task["modalities"]) == ["tabular", "text", "audio"]
    assert all(0 <= v["accuracy_alone"] <= 1 and 0 < v["weight"] < 1 for v in per_task["modalities"].values())
    with (run / "task_weights.csv").open() as f:  # the numbers behind the summary, one row per task
        tasks = list(csv.DictReader(f))
    assert len(tasks) == 8 and list(tasks[0]) == ["task"] + [
        f"{k}_{m}" for k in ("weight", "accuracy_alone") for m in ("tabular", "text", "audio")
    ]
    for m, v in per_task["modalities"].items():
        assert sum(float(t[f"weight_{m}"]) for t in tasks) / 8 == pytest.approx(v["weight"], abs=1e-6)
    assert (run / "task_weights.png").stat().st_size > 0
    clean = stage_meta_test(
        stage_meta_train(
            load_config(None, {**tiny, "data.corrupt_rate": 0.0, "algo.name": "protonet"}),
            tmp_path / "clean",
            quiet=True,
        )[2],
        quiet=True,
    )
    assert clean["corrupted_weights"] == {}


def test_accuracy_alone_scores_each_modality_by_its_own_nearest_class_mean():
    """A modality that carries the class scores 1, one that is noise about chance, one no query carries NaN."""
    from metafusion.data import Batch, Episode
    from metafusion.engine.analysis import accuracy_alone
    from metafusion.models import ModelSpec, build_model

    torch.manual_seed(0)
    ways, shots, queries = 4, 3, 50
    labels = torch.arange(ways).repeat_interleave(shots + queries)
    inputs = {"signal": 5 * torch.nn.functional.one_hot(labels, 8).float() + 0.1 * torch.randn(len(labels), 8)}
    inputs |= {"noise": torch.randn(len(labels), 8), "gone": torch.randn(len(labels), 8)}
    mask = torch.ones(len(labels), 3, dtype=torch.bool)
    is_support = (torch.arange(len(labels)) % (shots + queries)) < shots
    mask[~is_support, 2] = False  # no query carries "gone"
    batch = Batch(inputs, mask, labels, ("signal", "noise", "gone"))
    episode = Episode(batch.index(is_support), batch.index(~is_support), ways, shots, queries, tuple(range(ways)))
    model = build_model(
        ModelSpec({m: (8,) for m in inputs}), ways, width=16, hidden=16, encoders=dict.fromkeys(inputs, "mlp")
    )
    signal, noise, gone = accuracy_alone(model, episode).tolist()
    assert signal == 1.0 and noise < 0.5 and np.isnan(gone)


def test_task_weights_correlate_each_modalitys_weight_with_its_accuracy_alone():
    from metafusion.engine.analysis import TaskWeights

    per_task = TaskWeights(("a", "b"))
    for acc_a, acc_b in [(0.9, 0.5), (0.6, 0.7), (0.8, 0.4)]:
        w_a = acc_a / (acc_a + acc_b)  # the weights follow the accuracies exactly
        per_task.add(torch.tensor([[w_a, 1 - w_a]] * 5), torch.tensor([acc_a, acc_b]))
    out = per_task.summary()
    assert out["tasks"] == 3 and out["best_weighted"] == 1.0
    assert out["modalities"]["a"]["correlation"] == pytest.approx(
        np.corrcoef([0.9 / 1.4, 0.6 / 1.3, 0.8 / 1.2], [0.9, 0.6, 0.8])[0, 1], abs=1e-6
    )
    assert out["modalities"]["b"]["accuracy_alone"] == pytest.approx((0.5 + 0.7 + 0.4) / 3)
    backwards = TaskWeights(("a", "b"))
    for acc in (0.9, 0.3):
        backwards.add(torch.tensor([[0.2, 0.8]]), torch.tensor([acc, 0.5]))
    assert backwards.summary()["best_weighted"] == 0.5 and backwards.summary()["modalities"]["a"]["correlation"] is None
    uniform = TaskWeights(("a", "b"))
    for acc in (0.9, 0.3):
        uniform.add(torch.tensor([[0.5, 0.5]]), torch.tensor([acc, 0.5]))
    assert uniform.summary()["best_weighted"] is None  # no modality weighs most: nothing to count
