"""The walking skeleton: synthetic multimodal data -> episodes -> attention-fusion model -> learn2learn
MAML -> fixed test episodes -> accuracy ± CI, learning well above chance with a fixed seed."""

import pytest

from metafusion.config import load_config
from metafusion.engine import build_experiment, meta_test, meta_train


@pytest.mark.slow
def test_maml_on_synthetic_multimodal_learns_above_chance(small_synthetic):
    cfg = load_config(
        None,
        {
            "model.width": 16,
            "model.hidden": 16,
            "data.queries": 5,
            "data.val_episodes": 5,
            "train.iterations": 40,
            "train.meta_batch": 4,
        },
    )
    exp = build_experiment(cfg, small_synthetic)
    before = meta_test(exp.algorithm, exp.test_episodes(20))
    meta_train(exp, None, quiet=True)
    after = meta_test(exp.algorithm, exp.test_episodes(20))
    assert after.fingerprint == before.fingerprint  # same fixed test episodes
    assert after.accuracy_mean > 0.6, after  # chance is 0.2
    assert after.accuracy_mean > before.accuracy_mean + 0.05
    assert 0 < after.accuracy_ci95 < 0.2 and set(after.modality_weights) == set(small_synthetic.modalities)
