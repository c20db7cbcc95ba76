"""Config flows one way (defaults <- YAML <- overrides), strictly, and rejects incompatible settings."""

import pytest

from metafusion.algorithms import ALGORITHMS, Reptile
from metafusion.config import load_config
from metafusion.engine.resolve import resolve
from metafusion.errors import ConfigError
from metafusion.models import FUSIONS


def configured(overrides: dict, path=None):
    """What a command runs with: the merged config, resolved."""
    return resolve(load_config(path, overrides))


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  ways: 20\n  shots: 5\ntrain:\n  iterations: 7\n")
    cfg = load_config(path, {"train.iterations": "9", "data.modalities": "image,audio"})
    assert (cfg.data.ways, cfg.data.shots, cfg.train.iterations) == (20, 5, 9)
    assert cfg.data.modalities == ["image", "audio"]
    assert cfg.data.queries == 15  # dataclass default untouched


def test_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(
        ConfigError, match=r"unknown config key 'data.wayz' for dataset synthetic; valid keys: .*data.ways"
    ):
        configured({"data.wayz": 3})
    with pytest.raises(ConfigError, match=r"unknown config key 'train.iterationz'; valid keys: train.iterations"):
        load_config(None, {"train.iterationz": 3})
    path = tmp_path / "c.yaml"
    path.write_text("trian:\n  iterations: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        load_config(path)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("algo.name", "mamal", "choose one of: " + ", ".join(ALGORITHMS.names())),
        ("model.fusion", "sum", "choose one of: " + ", ".join(FUSIONS.names())),
        ("data.ways", "five", "expected an integer"),
        ("data.ways", 0, "data.ways must be >= 2"),
        ("data.shots", 0, "data.shots must be >= 1"),
        ("algo.inner_lr", -1, "algo.inner_lr must be > 0"),
        ("train.meta_lr", 0, "train.meta_lr must be > 0"),
        ("train.clip", -1, "train.clip must be > 0"),
        ("algo.metric", "manhattan", "algo.metric is an option of centroid and protonet"),
        ("data.missing_rate", 1.5, r"must be in \[0, 1\)"),
    ],
)
def test_bad_values_are_named(key, value, match):
    with pytest.raises(ConfigError, match=match):
        configured({key: value})


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"algo.name": "reptile", "algo.first_order": False}, "unknown config key 'algo.first_order' for algorithm"),
        ({"algo.name": "protonet", "algo.metric": "manhattan"}, "choose one of: euclidean, cosine"),
        (
            {"algo.name": "reptile", "algo.warm_test_optimizer": True, "algo.inner_optimizer": "sgd"},
            "needs algo.inner_o",
        ),
        ({"algo.name": "maml", "algo.first_order_warmup": 1}, "a fraction of the run in"),
        ({"algo.name": "protonet", "model.adapt": "head"}, "no meaning for protonet"),
        ({"algo.name": "protonet", "model.fusion": "late"}, "fused embedding"),
    ],
)
def test_incompatible_settings_fail_at_configuration_time(overrides, match):
    with pytest.raises(ConfigError, match=match):
        configured(overrides)


def test_resolve_fills_published_defaults_only_where_unset():
    cfg = configured({"algo.name": "reptile", "algo.inner_steps": 7})
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


def test_every_components_own_keys_are_documented():
    """Each option of each registered dataset, fusion, encoder and algorithm is named in the docs."""
    import dataclasses
    from pathlib import Path

    from metafusion.algorithms import ALGORITHMS
    from metafusion.data import DATASETS
    from metafusion.engine.resolve import options_class
    from metafusion.models import ENCODERS, FUSIONS

    docs = "".join(
        (Path(__file__).parents[1] / "docs" / name).read_text() for name in ("configuration.md", "encoders.md")
    )
    for registry in (DATASETS, FUSIONS, ENCODERS, ALGORITHMS):
        for name in registry.names():
            for f in dataclasses.fields(options_class(registry, name)):
                assert f"`{f.name}`" in docs, f"{registry.kind} {name}: option {f.name} is not documented"


def test_a_config_file_of_metafusion_0_1_still_resolves():
    """0.1 wrote every global key for every component (at its default where unused) and algo.first_order."""
    from metafusion.config import from_dict

    old = {
        "data": {"dataset": "synthetic", "split": "protocol", "image_size": 28, "rotations": False, "noise": 1.0},
        "model": {"fusion": "mean", "attention": "vector"},
        "algo": {"name": "protonet", "first_order": True, "metric": "euclidean", "learn_inner_lr": False,
                 "inner_batch": None, "warm_test_optimizer": False},
    }  # fmt: skip
    cfg = resolve(from_dict(old))
    assert cfg.algo.options == {"metric": "euclidean"} and cfg.model.options == {}
    assert cfg.data.options == {
        "num_classes": 300,
        "samples_per_class": 20,
        "noise": 1.0,
        "nuisance": 0.0,
        "prototypes": None,
    }
    with pytest.raises(ConfigError, match="data.rotations"):  # not at its old default: it meant something
        resolve(from_dict({**old, "data": {"dataset": "synthetic", "rotations": True}}))


def test_a_key_given_twice_and_an_alias_bomb_are_refused_and_aliases_still_work(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  iterations: 3\n  iterations: 5\n")
    with pytest.raises(ConfigError, match=rf"{twice}:3: key 'iterations' appears twice"):
        load_config(twice)
    bomb = tmp_path / "bomb.yaml"
    levels = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for prev, name in zip("abcdefg", "bcdefgh"):
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]")
    bomb.write_text("\n".join(levels) + "\n")  # 1 KB, 10^8 values expanded
    with pytest.raises(ConfigError, match="more than 100,000 values once its aliases expand"):
        load_config(bomb)
    shared = tmp_path / "shared.yaml"
    shared.write_text("per_algorithm:\n  maml: &recipe\n    algo: {inner_lr: 0.2}\n  fomaml: *recipe\n")
    assert resolve(load_config(shared, {"algo.name": "fomaml"})).algo.inner_lr == 0.2
