"""Config flows one way (defaults <- YAML <- overrides), strictly, and rejects incompatible settings."""

import pytest

from metafusion.algorithms import Reptile
from metafusion.config import ConfigError, load_config, resolve


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  ways: 20\n  shots: 5\ntrain:\n  iterations: 7\n")
    cfg = load_config(path, {"train.iterations": "9", "data.modalities": "image,audio"})
    assert (cfg.data.ways, cfg.data.shots, cfg.train.iterations) == (20, 5, 9)
    assert cfg.data.modalities == ["image", "audio"]
    assert cfg.data.queries == 15  # dataclass default untouched


def test_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'data.wayz'.*data.ways"):
        load_config(None, {"data.wayz": 3})
    path = tmp_path / "c.yaml"
    path.write_text("trian:\n  iterations: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        load_config(path)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("algo.name", "mamal", "choose one of: anil, centroid, finetune, fomaml, maml"),
        ("model.fusion", "sum", "attention, concat, late, mean, transformer"),
        ("data.ways", "five", "expected an integer"),
        ("data.ways", 0, "data.ways must be >= 2"),
        ("data.shots", 0, "data.shots must be >= 1"),
        ("algo.inner_lr", -1, "algo.inner_lr must be > 0"),
        ("train.meta_lr", 0, "train.meta_lr must be > 0"),
        ("train.clip", -1, "train.clip must be > 0"),
        ("algo.metric", "manhattan", "choose one of: cosine, euclidean"),
        ("data.missing_rate", 1.5, r"must be in \[0, 1\)"),
    ],
)
def test_bad_values_are_named(key, value, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, {key: value})


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"algo.name": "reptile", "algo.first_order": False}, "first-order by design"),
        ({"algo.name": "maml", "algo.first_order": True}, "use --algo fomaml"),
        ({"algo.name": "protonet", "model.adapt": "head"}, "no meaning for protonet"),
        ({"algo.name": "protonet", "model.fusion": "late"}, "fused embedding"),
    ],
)
def test_incompatible_settings_fail_at_configuration_time(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_resolve_fills_published_defaults_only_where_unset():
    cfg = resolve(load_config(None, {"algo.name": "reptile", "algo.inner_steps": 7}))
    assert cfg.algo.inner_steps == 7  # the user's value wins
    assert cfg.algo.inner_steps_test == Reptile.defaults["inner_steps_test"] == 50
    assert (cfg.train.optimizer, cfg.train.schedule, cfg.train.meta_lr) == ("sgd", "linear", 1.0)
    assert cfg.algo.inner_lr_test == cfg.algo.inner_lr


def test_flags_beat_the_files_per_algorithm_recipes(tmp_path):
    """defaults <- YAML file (its per_algorithm sections included) <- flags: a flag is never undone."""
    path = tmp_path / "c.yaml"
    path.write_text(
        "per_algorithm:\n  maml:\n    train: {iterations: 60000, meta_batch: 32}\n    algo: {inner_lr: 0.4}"
    )
    cfg = resolve(load_config(path, {"algo.name": "maml", "train.iterations": 2}))
    assert (cfg.train.iterations, cfg.train.meta_batch, cfg.algo.inner_lr) == (2, 32, 0.4)
    assert resolve(load_config(path, {"algo.name": "maml"})).train.iterations == 60000
