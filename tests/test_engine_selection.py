"""Never worse than the start: the start is a candidate, selection on validation can fall back to it or to the
untrained centroid, and a fallen-back model fine-tunes and predicts like any other."""

import json
import math

import pytest
import torch

from metafusion.algorithms.nearest_mean import mix
from metafusion.config import load_config
from metafusion.engine import build_experiment, meta_test
from metafusion.engine.build import raw_dataset
from metafusion.engine.checkpoint import load_checkpoint, run_checkpoint
from metafusion.engine.evaluate import centroid_accuracies, paired_difference
from metafusion.engine.predictor import Predictor
from metafusion.engine.selection import interpolate, loaded, select
from metafusion.engine.stages import stage_fine_tune, stage_meta_test, stage_meta_train
from metafusion.engine.train import meta_train

TABULAR = {
    "data.num_classes": 30,
    "data.samples_per_class": 12,
    "data.modalities": ["tabular"],
    "data.queries": 3,
    "data.val_episodes": 12,
    "data.test_episodes": 12,
    "model.width": 16,
    "model.hidden": 16,
    "algo.name": "protonet",
    "train.val_interval": 5,
}


def test_the_paired_difference_is_the_mean_and_ci_of_the_per_episode_differences():
    a, b = [0.8, 0.6, 1.0, 0.4], [0.6, 0.6, 0.8, 0.5]
    d = [0.2, 0.0, 0.2, -0.1]
    mean = sum(d) / 4
    std = math.sqrt(sum((x - mean) ** 2 for x in d) / 4)  # population std, as confidence_interval takes it
    out = paired_difference(a, b)
    assert out["mean"] == pytest.approx(0.075) and out["ci95"] == pytest.approx(1.96 * std / 2)
    with pytest.raises(ValueError):
        paired_difference(a, b[:3])


def test_mixing_with_weight_0_is_the_model_and_with_weight_1_the_centroid():
    learned, centroid = torch.randn(6, 3), torch.randn(6, 3)
    assert torch.equal(mix(learned, centroid, 0.0), learned)
    assert torch.equal(mix(learned, centroid, 1.0).argmax(1), centroid.argmax(1))
    half = mix(learned, centroid, 0.5)
    assert torch.allclose(half, 0.5 * learned.log_softmax(1) + 0.5 * centroid.log_softmax(1))


def test_alpha_0_is_the_start_exactly_and_alpha_1_the_trained_weights():
    start = {"w": torch.randn(3, 4), "steps": torch.tensor(3)}
    trained = {"w": torch.randn(3, 4), "steps": torch.tensor(7)}
    assert torch.equal(interpolate(start, trained, 0.0)["w"], start["w"])
    assert torch.equal(interpolate(start, trained, 1.0)["w"], trained["w"])
    assert torch.allclose(interpolate(start, trained, 0.25)["w"], 0.75 * start["w"] + 0.25 * trained["w"])
    assert torch.equal(interpolate(start, trained, 0.5)["steps"], trained["steps"])  # counters are not averaged


def _ruined(state: dict) -> dict:
    """Weights meta-training could have left: the start's, far off (a run that only got worse)."""
    g = torch.Generator().manual_seed(0)
    return {k: v + 50 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in state.items()}


def test_selection_falls_back_where_training_only_hurt_and_keeps_the_trained_state_where_it_helped(tmp_path):
    exp = build_experiment(load_config(None, {**TABULAR, "train.iterations": 60}))
    algo, episodes = exp.algorithm, list(exp.val_episodes)
    start = {k: v.clone() for k, v in algo.module.state_dict().items()}
    ruined = select(algo, start, _ruined(start), episodes, [0.0, 0.5, 1.0], [0.0, 0.5, 1.0])
    assert ruined.alpha == 0.0 or ruined.centroid_weight == 1.0  # the start, or the centroid alone
    best = max(c["accuracy"] for c in ruined.candidates)
    assert ruined.accuracy == best
    trained_alone = next(c for c in ruined.candidates if c["alpha"] == 1.0 and c["centroid_weight"] == 0.0)
    assert trained_alone["accuracy"] < ruined.accuracy  # the ruined weights really are worse
    assert torch.equal(
        algo.module.state_dict()["encoders.tabular.net.0.weight"], start["encoders.tabular.net.0.weight"]
    )

    exp2, _, _ = stage_meta_train(exp.cfg, tmp_path / "run", quiet=True, experiment=exp)
    trained = {k: v.clone() for k, v in exp2.algorithm.module.state_dict().items()}
    helped = select(algo, start, trained, episodes, [0.0, 1.0], [0.0, 1.0])
    start_alone = next(c for c in helped.candidates if c["alpha"] == 0.0 and c["centroid_weight"] == 0.0)
    trained_alone = next(c for c in helped.candidates if c["alpha"] == 1.0 and c["centroid_weight"] == 0.0)
    assert trained_alone["accuracy"] > start_alone["accuracy"]  # meta-training helped on this set ...
    assert helped.alpha == 1.0  # ... and selection keeps the trained weights


def _ruining(exp):
    """``exp`` whose every meta-update is a large random step: meta-training that only makes the model worse."""
    g = torch.Generator().manual_seed(1)
    algo = exp.algorithm

    def meta_backward(tasks):
        for p in algo.parameters():
            p.grad = 5 * torch.randn(p.shape, generator=g)
        return {"loss": 1.0}

    algo.meta_backward = meta_backward
    return exp


def _ruined_run(run):
    """A run that starts from good weights (meta-trained beforehand) and that meta-training only ruins."""
    exp = build_experiment(load_config(None, {**TABULAR, "train.iterations": 60}))
    meta_train(exp, quiet=True)
    exp.cfg.train.iterations, exp.cfg.train.optimizer, exp.cfg.train.meta_lr = 10, "sgd", 1.0
    return stage_meta_train(None, run, quiet=True, experiment=_ruining(exp))


def test_the_start_is_validated_and_can_be_best(tmp_path):
    exp, train, run = _ruined_run(tmp_path / "run")
    best, start = load_checkpoint(run / "best.pt"), load_checkpoint(run / "start.pt")
    assert best["step"] == 0 and train["best_step"] == 0  # no trained state beat the start
    assert all(torch.equal(best["module"][k], start["module"][k]) for k in start["module"])
    assert train["start_val_accuracy"] == pytest.approx(train["best_val_accuracy"])
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert first["val_accuracy"] < train["start_val_accuracy"]


@pytest.fixture(scope="module")
def fallen_back(tmp_path_factory):
    """A run that meta-training ruined, selected on validation."""
    return _ruined_run(tmp_path_factory.mktemp("selection") / "run")


def test_a_ruined_run_hands_over_the_selected_model_and_reports_it_against_the_centroid(fallen_back):
    exp, train, run = fallen_back
    chosen = json.loads((run / "selection.json").read_text())
    assert run_checkpoint(run) == run / "selected.pt"
    assert chosen["alpha"] == 0.0 or chosen["centroid_weight"] == 1.0
    assert train["selection"]["alpha"] == chosen["alpha"]
    last = stage_meta_test(run, checkpoint=run / "last.pt", quiet=True)
    selected = stage_meta_test(run, quiet=True)
    assert (run / "results_last.json").is_file() and selected["stem"] == "results"
    assert selected["accuracy_mean"] > last["accuracy_mean"]
    assert selected["selection"]["alpha"] == chosen["alpha"]
    centroid = centroid_accuracies(exp.algorithm, exp.test_episodes())
    assert selected["centroid_accuracy"] == pytest.approx(sum(centroid) / len(centroid))
    d = selected["vs_centroid"]
    assert d["mean"] == pytest.approx(selected["accuracy_mean"] - selected["centroid_accuracy"], abs=1e-9)


def test_a_fallen_back_model_fine_tunes_and_predicts(fallen_back, tmp_path):
    exp, _, run = fallen_back
    result = stage_fine_tune(run, out=tmp_path / "adapted", quiet=True)
    state = load_checkpoint(run / "selected.pt")
    assert result["centroid_weight"] == state["selection"]["centroid_weight"]
    assert all(p is not None for p in result["query_predictions"])
    predictor = Predictor.load(tmp_path / "adapted" / "model.pt")
    assert predictor.algorithm.centroid_weight == result["centroid_weight"]
    raw = raw_dataset(exp.cfg).select_modalities(["tabular"])
    data = raw.unlabelled(torch.arange(len(raw)))  # the model's classes are not the data's: predict without labels
    predictions = predictor.predict(data)
    assert len(predictions) == len(data) and torch.isfinite(predictions.probabilities).all()
    assert set(predictions.predicted) <= set(result["classes"])


def test_meta_test_of_a_selected_centroid_mixture_equals_mixing_by_hand():
    exp = build_experiment(load_config(None, {**TABULAR, "train.iterations": 1}))
    algo, episodes = exp.algorithm, list(exp.test_episodes(4))
    alone = [algo.evaluate(e).logits for e in episodes]
    algo.centroid_weight = 0.5
    mixed = [algo.evaluate(e).logits for e in episodes]
    for a, m, e in zip(alone, mixed, episodes):
        assert torch.allclose(m, mix(a, algo.centroid(e.support)(e.query), 0.5), atol=1e-6)
    batched = [p.logits for p in algo.evaluate_many(episodes, batched=True)]
    assert all(torch.allclose(b, m, atol=1e-5) for b, m in zip(batched, mixed))
    with loaded(algo.module, algo.module.state_dict()):
        assert meta_test(algo, episodes).accuracies == [
            (m.argmax(1) == e.query.labels).float().mean().item() for m, e in zip(mixed, episodes)
        ]
