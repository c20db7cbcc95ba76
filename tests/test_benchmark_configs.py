"""Every benchmark config parses and resolves for every algorithm; the Omniglot protocol configs
build the published split sizes and per-algorithm recipes."""

from pathlib import Path

import pytest
import yaml

from metafusion.algorithms import ALGORITHMS
from metafusion.config import load_config
from metafusion.engine.build import raw_dataset
from metafusion.engine.resolve import resolve

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_resolves_for_every_algorithm(path):
    for algo in ALGORITHMS.names():
        cfg = resolve(load_config(path, {"algo.name": algo}))
        assert cfg.algo.name == algo and cfg.train.meta_batch >= 1


@pytest.mark.parametrize(
    "ways,shots,lr,steps,batch", [(5, 1, 0.4, 1, 32), (5, 5, 0.4, 1, 32), (20, 1, 0.1, 5, 16), (20, 5, 0.1, 5, 16)]
)
def test_omniglot_protocol_recipes(ways, shots, lr, steps, batch):
    path = CONFIGS[0].parent / f"omniglot_{ways}w{shots}s.yaml"
    maml = resolve(load_config(path, {"algo.name": "maml"}))
    assert (maml.algo.inner_lr, maml.algo.inner_steps, maml.algo.inner_steps_test) == (lr, steps, 10)
    assert (maml.train.meta_batch, maml.train.iterations, maml.data.train_queries) == (batch, 60000, shots)
    reptile = resolve(load_config(path, {"algo.name": "reptile"}))
    assert (reptile.data.train_shots, reptile.train.meta_batch, reptile.train.schedule) == (10, 5, "linear")
    assert reptile.algo.inner_steps_test == 50 and reptile.algo.options["inner_optimizer"] == "adam"
    assert maml.data.test_episodes == reptile.data.test_episodes == 600


FAST = [p for p in CONFIGS if p.stem.endswith("_fast")]


@pytest.mark.parametrize(
    "path,algo",
    [(p, a) for p in FAST for a in yaml.safe_load(p.read_text())["per_algorithm"]],
    ids=lambda v: getattr(v, "stem", v),
)
def test_fast_recipes_keep_the_papers_protocol(path, algo):
    """A faster recipe may change how meta-training runs, never what is tested: same split, classes,
    image size, ways, shots, test queries, the same 600 test episodes and the same number of inner
    steps at test as the protocol config, for every algorithm the recipe tunes."""
    protocol = path.with_name(path.name.replace("_fast", ""))
    fast, paper = (resolve(load_config(p, {"algo.name": algo})) for p in (path, protocol))
    for key in ("dataset", "ways", "shots", "queries", "test_episodes", "episode_seed", "options"):
        assert getattr(fast.data, key) == getattr(paper.data, key), key  # options: split, rotations, image size
    assert fast.algo.inner_steps_test == paper.algo.inner_steps_test


@pytest.mark.data
def test_omniglot_protocol_config_builds_the_published_splits(data_root):
    cfg = resolve(load_config(CONFIGS[0].parent / "omniglot_5w1s.yaml", {"data.root": str(data_root)}))
    ds = raw_dataset(cfg)
    # 1100 / 100 / 423 characters, each with its three rotations as further classes.
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 4400, "val": 400, "test": 1692}


def _script(name: str):
    import importlib.util
    import sys

    path = CONFIGS[0].parents[1] / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_reproduce_row_is_a_valid_command_with_a_table_in_results_md():
    from metafusion.cli import build_parser, config_from_args

    reproduce = _script("reproduce")
    text = reproduce.RESULTS_MD.read_text()
    for table in reproduce.TABLES:
        assert f"<!-- BEGIN {table} -->" in text and f"<!-- END {table} -->" in text
    parser = build_parser()
    for row in reproduce.ROWS:
        cmd = row.commands[0]
        argv = cmd[cmd.index("metafusion") + 1 :] if cmd[0] == "torchrun" else cmd[1:]
        args, extra = parser.parse_known_args(argv)
        cfg = resolve(config_from_args(args, extra))
        assert args.out and str(row.out) == args.out, row.name
        if row.labels.get("modalities"):
            assert cfg.model.modalities == row.labels["modalities"].split(",")
    assert len({r.name for r in reproduce.ROWS}) == len(reproduce.ROWS)


def test_report_keeps_a_table_whose_runs_are_not_here(tmp_path, monkeypatch, capsys):
    """Rewriting results.md from run folders that exist only on another machine must not blank the
    committed numbers; a table whose run folders are all here is rewritten."""
    reproduce = _script("reproduce")
    monkeypatch.setattr(reproduce, "REPO", tmp_path)
    md = tmp_path / "results.md"
    md.write_text(
        "<!-- BEGIN omniglot-cpu -->\n96.71 %\n<!-- END omniglot-cpu -->\n"
        "<!-- BEGIN omniglot-fast -->\nold\n<!-- END omniglot-fast -->\n"
    )
    for row in reproduce.ROWS:
        if row.table == "omniglot-fast":
            (tmp_path / row.out).mkdir(parents=True)
    assert reproduce.rewrite_tables(md, ["omniglot-cpu", "omniglot-fast"]) == ["omniglot-fast"]
    text = md.read_text()
    assert "96.71 %" in text and "old" not in text and "| 5w1s | maml |" in text
    assert "kept omniglot-cpu as it was: no run folder or raw numbers for omniglot_" in capsys.readouterr().err


def test_report_rewrites_the_fast_table_from_committed_raw_numbers(tmp_path, monkeypatch):
    """A fast-recipe row whose run folder is not here is rendered from its benchmarks/results/<row>.json."""
    import json

    reproduce = _script("reproduce")
    monkeypatch.setattr(reproduce, "REPO", tmp_path)
    md = tmp_path / "results.md"
    md.write_text("<!-- BEGIN omniglot-fast -->\nold\n<!-- END omniglot-fast -->\n")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    for i, row in enumerate(r for r in reproduce.ROWS if r.table == "omniglot-fast"):
        result = {"accuracy_mean": 0.9, "accuracy_ci95": 0.01 * (i + 1), "episodes": 600, "fingerprint": "f"}
        train = {"iterations": 1000 + i, "seconds": 1200.0, "tasks_per_s": 20.0, "hardware": "CPU X", "ranks": 2}
        raw = {"train": train, "transductive": result, "nontransductive": None}
        reproduce._raw_path(row).write_text(json.dumps(raw))
    assert reproduce.rewrite_tables(md, ["omniglot-fast"]) == ["omniglot-fast"]
    text = md.read_text()
    assert (
        "old" not in text
        and "| 5w1s | maml | 98.7 % | 90.00 ± 1.00 % | not run | 1,000 | 1200 s | 20.0 | CPU X" in text
    )


@pytest.mark.parametrize("variant", ["maml-1", "fomaml-5", "reptile-5", "protonet", "meta-test"])
def test_throughput_benchmark_compares_equal_gradients(variant):
    """The benchmark times nothing unless metafusion's meta-gradient equals the reference loop's."""
    throughput = _script("throughput")
    assert throughput.gradient_check("conv4", variant, "cpu", 2) <= 1e-5


def test_reptile_test_optimizer_benchmark_evaluates_one_checkpoint_fresh_and_warm(tmp_path, monkeypatch):
    """Both evaluation modes, each with a fresh and a warm test-time Adam, on the same episodes; --episodes takes
    the first N; other algorithms' runs are refused by name."""
    import json
    import sys

    from metafusion.engine.stages import stage_meta_train

    tiny = {"data.num_classes": 30, "data.samples_per_class": 10, "data.queries": 2, "data.val_episodes": 3}
    tiny |= {"model.width": 8, "model.hidden": 8, "data.modalities": ["tabular"], "train.iterations": 4}
    for algo in ("reptile", "maml"):
        stage_meta_train(load_config(None, {**tiny, "algo.name": algo}), tmp_path / algo, quiet=True)
    script = _script("reptile_test_optimizer")
    out = tmp_path / "fresh_and_warm.json"
    monkeypatch.setattr(sys, "argv", ["x", "--run", str(tmp_path / "reptile"), "--json", str(out)])
    script.main()
    rows = json.loads(out.read_text())["results"]
    assert [(r["mode"], r["warm_test_optimizer"]) for r in rows] == [
        ("transductive", False),
        ("transductive", True),
        ("non-transductive", False),
        ("non-transductive", True),
    ]
    assert len({r["fingerprint"] for r in rows}) == 1 and all(r["episodes"] == 3 for r in rows)
    first = ["--modes", "transductive", "--warm", "on", "--episodes", "2", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", ["x", "--run", str(tmp_path / "reptile"), *first])
    script.main()
    assert [r["episodes"] for r in json.loads(out.read_text())["results"]] == [2]
    monkeypatch.setattr(sys, "argv", ["x", "--run", str(tmp_path / "maml")])
    with pytest.raises(SystemExit, match="is a maml run; the test-time Adam is Reptile's"):
        script.main()
