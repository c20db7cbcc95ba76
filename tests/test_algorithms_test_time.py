"""Test-time fine-tuning (P>M>F): a learning-rate search that includes 0, scored on support samples the tuning
did not see, on a copy of the model (the meta-parameters never move)."""

import pytest
import torch

from metafusion.algorithms.test_time import SupportTuning
from metafusion.config import TuneConfig, load_config
from metafusion.engine import build_experiment
from metafusion.engine.predictor import Predictor
from metafusion.engine.stages import stage_fine_tune, stage_meta_train

SETTINGS = {
    "data.num_classes": 30,
    "data.samples_per_class": 12,
    "data.modalities": ["tabular"],
    "data.queries": 3,
    "data.val_episodes": 4,
    "data.test_episodes": 4,
    "model.width": 16,
    "model.hidden": 16,
    "algo.name": "protonet",
    "train.iterations": 20,
}


@pytest.fixture(scope="module")
def exp():
    return build_experiment(load_config(None, {**SETTINGS, "data.shots": 3}))


def _weights(algorithm) -> dict:
    return {k: v.clone() for k, v in algorithm.module.state_dict().items()}


def test_rate_0_alone_leaves_every_prediction_as_it_was(exp):
    episode = exp.test_episodes(1)[0]
    plain = exp.algorithm.evaluate(episode).logits
    exp.algorithm.tuning = SupportTuning(TuneConfig(lrs=[0.0]))
    try:
        assert torch.equal(exp.algorithm.evaluate(episode).logits, plain)
    finally:
        exp.algorithm.tuning = None


def test_tuning_moves_a_copy_and_never_the_meta_parameters(exp):
    episode = exp.test_episodes(1)[0]
    before = _weights(exp.algorithm)
    twin, lr = SupportTuning(TuneConfig(lrs=[0.1], steps=5)).tuned(exp.algorithm, episode.support)
    assert all(torch.equal(v, exp.algorithm.module.state_dict()[k]) for k, v in before.items())
    if lr:  # the rate won: the copy's weights moved
        assert any(not torch.equal(v, twin.module.state_dict()[k]) for k, v in before.items())


def test_a_tie_keeps_the_meta_learned_weights(exp):
    episode = exp.test_episodes(1)[0]
    twin, lr = SupportTuning(TuneConfig(lrs=[0.0, 1e-12], steps=1)).tuned(exp.algorithm, episode.support)
    assert lr == 0.0  # a rate too small to change a prediction cannot beat 0
    assert all(torch.equal(v, twin.module.state_dict()[k]) for k, v in _weights(exp.algorithm).items())


def test_pseudo_queries_are_held_out_support_samples_or_augmented_copies(exp):
    tuning = SupportTuning(TuneConfig())
    gen = torch.Generator().manual_seed(0)
    support = exp.test_episodes(1)[0].support  # 3 shots of 5 classes
    fit, score_support, score_query = tuning._splits(support, gen)
    assert len(score_query) == 5 and sorted(score_query.labels.tolist()) == list(range(5))  # one held out per class
    assert len(fit) == len(score_support) == 10
    one_shot = support.index(torch.tensor([support.labels.tolist().index(c) for c in range(5)]))
    fit, score_support, score_query = tuning._splits(one_shot, gen)
    assert torch.equal(score_query.labels, one_shot.labels)
    assert not torch.equal(score_query.inputs["tabular"], one_shot.inputs["tabular"])  # noisy copies


def test_fine_tune_with_tuning_saves_a_model_that_predicts_as_it_was_tuned(tmp_path):
    cfg = load_config(None, {**SETTINGS, "data.shots": 2, "tune.lrs": [0.0, 0.01], "tune.steps": 5})
    exp, _, run = stage_meta_train(cfg, tmp_path / "run", quiet=True)
    result = stage_fine_tune(run, out=tmp_path / "adapted", quiet=True, tune=True)
    assert result["tuned"]
    predictor = Predictor.load(tmp_path / "adapted" / "model.pt")
    saved = torch.load(tmp_path / "adapted" / "model.pt", weights_only=True)["learner"]
    assert all(torch.equal(v, predictor.learner.state_dict()[k]) for k, v in saved.items())
