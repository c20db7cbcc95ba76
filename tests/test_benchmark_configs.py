"""Every benchmark config parses and resolves for every algorithm; the Omniglot protocol configs
build the published split sizes and per-algorithm recipes."""

import json
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from metafusion.algorithms import ALGORITHMS
from metafusion.config import load_config
from metafusion.engine.build import raw_dataset
from metafusion.engine.resolve import resolve

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "benchmarks" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_resolves_for_every_algorithm(path):
    import yaml

    data = yaml.safe_load(path.read_text())["data"]
    for algo in ALGORITHMS.names():  # resolving checks every value against the algorithm's recipe and options
        cfg = resolve(load_config(path, {"algo.name": algo}))
        assert (cfg.data.dataset, cfg.data.ways) == (data.get("dataset", "synthetic"), data.get("ways", 5)), algo


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


@pytest.mark.slow
@pytest.mark.data
def test_omniglot_protocol_config_builds_the_published_splits(data_root):
    cfg = resolve(load_config(CONFIGS[0].parent / "omniglot_5w1s.yaml", {"data.root": str(data_root)}))
    ds = raw_dataset(cfg)
    # 1100 / 100 / 423 characters, each with its three rotations as further classes.
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 4400, "val": 400, "test": 1692}


def _script(name: str):
    import importlib.util

    path = CONFIGS[0].parents[1] / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_every_experiment_row_is_a_valid_command():
    from metafusion.cli import build_parser, config_from_args

    reproduce = _script("reproduce")
    parser = build_parser()
    rows = [row for spec in reproduce.load_experiments().values() for row in spec["rows"]]
    for row in rows:
        argv = shlex.split(row.commands[0])
        if argv[0] == "python":  # a benchmark script: it exists and writes into the row's folder
            assert (REPO / argv[1]).is_file() and argv[argv.index("--out") + 1] == str(row.out), row.name
            continue
        argv = argv[argv.index("metafusion") + 1 :] if argv[0] == "torchrun" else argv[1:]
        args, extra = parser.parse_known_args(argv)
        assert args.out and str(row.out) == args.out, row.name
        if row.labels.get("gpu"):  # its --threads and --device are the GPU machine's
            continue
        cfg = resolve(config_from_args(args, extra))
        if row.labels.get("modalities"):  # "all": the command leaves model.modalities unset
            expected = None if row.labels["modalities"] == "all" else row.labels["modalities"].split(",")
            assert cfg.model.modalities == expected
    assert len({r.name for r in rows}) == len(rows)


def test_results_md_is_what_the_experiments_and_their_numbers_render():
    """docs/results.md is generated: rendering the committed experiments and numbers gives it exactly."""
    reproduce = _script("reproduce")
    assert reproduce.RESULTS_MD.read_text() == reproduce.render(reproduce.load_experiments())


@pytest.mark.slow
def test_a_row_runs_and_its_numbers_render(tmp_path, monkeypatch):
    """The runner at toy size (`reproduce.py --experiments toy`, its two rows side by side): each row runs its
    command, keeps its numbers in results/<experiment>/<row>.json and renders them; the numbers then render
    without the run folder."""

    reproduce = _script("reproduce")
    monkeypatch.setattr(reproduce, "REPO", tmp_path)
    monkeypatch.setattr(reproduce, "EXPERIMENTS", tmp_path / "experiments")
    monkeypatch.setattr(reproduce, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(reproduce, "RESULTS_MD", tmp_path / "results.md")
    (tmp_path / "experiments").mkdir()
    tiny = "--set data.num_classes=30 --set data.samples_per_class=4 --queries 1 --episodes 3 --set data.val_episodes=2"
    (tmp_path / "experiments" / "toy.yaml").write_text(
        "title: Toy\norder: 1\nmethod: m\nfindings: f\nsame_episodes: []\nrows:\n"
        "  - grid: {algorithm: [centroid, protonet]}\n    name: toy_{algorithm}\n    commands:\n"
        f"      - metafusion run --algo {{algorithm}} --iterations 2 {tiny} --set model.width=8 --out {{out}} --quiet\n"
        "columns:\n  - {header: algorithm, label: algorithm}\n  - {header: accuracy, metric: accuracy}\n"
        "  - {header: vs centroid, metric: delta, against: {algorithm: centroid}}\n"
        "  - {header: iterations, metric: iterations}\n  - {header: command, metric: commands}\n"
    )
    monkeypatch.setattr(sys, "argv", ["reproduce.py", "--experiments", "toy"])
    reproduce.main()
    assert "| protonet |" in (tmp_path / "results.md").read_text()
    kept = json.loads((tmp_path / "results" / "toy" / "toy_protonet.json").read_text())
    assert kept["train"]["iterations"] == 2 and kept["results"]["episodes"] == 3
    assert f"{100 * kept['results']['accuracy_mean']:.2f}" in (tmp_path / "results.md").read_text()  # rendered
    import shutil

    shutil.rmtree(tmp_path / "runs")
    text = reproduce.render(reproduce.load_experiments())
    assert "| protonet |" in text and "not run" not in text and "Tested on every row: identical test episodes" in text


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["maml-1", "fomaml-5", "reptile-5", "protonet", "meta-test"])
def test_throughput_benchmark_compares_equal_gradients(variant):
    """The benchmark times nothing unless metafusion's meta-gradient equals the reference loop's."""
    throughput = _script("throughput")
    assert throughput.gradient_check("conv4", variant, "cpu", 2) <= 1e-5


@pytest.mark.slow
def test_reptile_test_optimizer_benchmark_evaluates_one_checkpoint_fresh_and_warm(tmp_path, monkeypatch):
    """Both evaluation modes, each with a fresh and a warm test-time Adam, on the same episodes; --episodes takes
    the first N; other algorithms' runs are refused by name."""
    import json

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


def _run_script(name: str, *args: str, monkeypatch, capsys) -> str:
    """``python benchmarks/<name>.py *args`` in this process (a process of its own would add seconds of imports)."""

    monkeypatch.setattr(sys, "argv", [f"benchmarks/{name}.py", *args])
    monkeypatch.chdir(REPO)
    _script(name).main()
    return capsys.readouterr().out


@pytest.mark.slow
def test_throughput_benchmark_documented_command_runs_at_toy_size(tmp_path, monkeypatch, capsys):
    """docs/performance.md's quick command, cut to one variant and one meta-batch of 2, with its 2-rank row
    (the script imported by its own name from benchmarks/, where the row's ranks find it too)."""
    import importlib
    import json

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    quick = [
        "--quick",
        "--models",
        "conv4",
        "--variants",
        "maml-1",
        "--iters",
        "1",
        "--meta-batch",
        "2",
        "--rounds",
        "1",
    ]
    monkeypatch.setattr(sys, "argv", ["benchmarks/throughput.py", *quick, "--out", str(tmp_path)])
    monkeypatch.chdir(REPO)
    importlib.import_module("throughput").main()
    (row,) = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert row["grad_rel_err_fp64"] <= 1e-5 and row["distributed_tasks_per_s"] > 0 and row["metafusion_tasks_per_s"] > 0


@pytest.mark.slow
def test_evaluation_and_predict_benchmarks_documented_commands_run_at_toy_size(tmp_path, monkeypatch, capsys):
    import json

    out = tmp_path / "evaluation.json"
    rows = "tabular+text-maml,tabular+text-protonet"
    _run_script(
        "evaluation", "--rows", rows, "--episodes", "2", "--out", str(out), monkeypatch=monkeypatch, capsys=capsys
    )
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 and all(r["off"]["accuracy"] == pytest.approx(r["on"]["accuracy"]) for r in rows)
    printed = _run_script("predict", "--samples", "20", "--config", "", monkeypatch=monkeypatch, capsys=capsys)
    assert all(f"{protocol}:" in printed for protocol in ("support", "transductive", "alone"))


def _tiny_run(folder, settings: dict) -> str:
    """A two-iteration run on a small synthetic set: what the scripts that read one trained run are tested on."""
    from metafusion.config import load_config
    from metafusion.engine.stages import stage_meta_train

    tiny = {"data.num_classes": 30, "data.samples_per_class": 10, "data.queries": 3, "data.val_episodes": 2}
    tiny |= {"model.width": 8, "model.hidden": 8, "train.iterations": 2}
    tiny |= {"select.alphas": [1.0], "select.centroid_weights": [0.0]}  # no selection: the scripts read the run
    return str(stage_meta_train(load_config(None, {**tiny, **settings}), folder, quiet=True)[2])


@pytest.mark.slow
@pytest.mark.parametrize("fusion", ["agreement", "matched"])
def test_agreement_scale_benchmark_meta_tests_one_run_at_each_beta(fusion, tmp_path, monkeypatch, capsys):
    """The run's learned beta first, then each one asked for, each with the weights of corrupted and clean
    modalities; a run of another fusion is refused in one line."""
    run = _tiny_run(tmp_path / "a", {"model.fusion": fusion, "data.corrupt_rate": 0.3})
    args = ["--run", run, "--betas", "0,4", "--episodes", "4"]
    lines = _run_script("agreement_scale", *args, monkeypatch=monkeypatch, capsys=capsys).strip().splitlines()
    assert len(lines) == 4 and "(learned)" in lines[1] and lines[2].startswith("beta 0.000")
    assert all("weight corrupted" in line for line in lines[1:])
    other = _tiny_run(tmp_path / "m", {"model.fusion": "mean", "data.corrupt_rate": 0.3})
    with pytest.raises(SystemExit, match="needs 'agreement' or 'matched'"):
        _run_script("agreement_scale", "--run", other, monkeypatch=monkeypatch, capsys=capsys)


@pytest.mark.slow
def test_detection_auc_benchmark_scores_weights_and_a_matcher_on_a_corrupted_run(tmp_path, monkeypatch, capsys):
    """Its AUC is Mann-Whitney's (ties half); a run's weights and a matcher trained apart each get one line with
    an AUC per modality; a run without corruption is refused in one line."""
    import re

    import torch

    auc = _script("detection_auc").auc
    assert auc(torch.tensor([3.0, 1.0]), torch.tensor([2.0, 1.0])) == (1 + 1 + 0 + 0.5) / 4
    run = _tiny_run(tmp_path / "c", {"model.fusion": "matched", "data.corrupt_rate": 0.3})
    args = ["--run", run, "--episodes", "4", "--matcher-steps", "3", "--matcher-batch", "16"]
    lines = _run_script("detection_auc", *args, monkeypatch=monkeypatch, capsys=capsys).strip().splitlines()
    assert len(lines) == 3 and lines[1].startswith("weights (4 test episodes)") and "matcher trained apart" in lines[2]
    for printed_line in lines[1:]:
        values = [float(v) for v in re.findall(r"(?:image|audio|text|tabular) (\d\.\d{3})", printed_line)]
        assert len(values) == 4 and all(0 <= v <= 1 for v in values)
    clean = _tiny_run(tmp_path / "n", {"model.fusion": "matched"})
    with pytest.raises(SystemExit, match="nothing to detect"):
        _run_script("detection_auc", "--run", clean, monkeypatch=monkeypatch, capsys=capsys)


@pytest.mark.slow
def test_video_cost_benchmark_documented_commands_run_at_toy_size(tmp_path, monkeypatch, capsys):
    """The decoding row reads the clip it wrote in child processes; the features row times the frozen network."""
    import json

    out = tmp_path / "decode"
    args = ["--decode", "1", "--repeats", "1", "--out", str(out)]
    _run_script("video_cost", *args, monkeypatch=monkeypatch, capsys=capsys)
    decoded = json.loads((out / "results_video.json").read_text())
    assert decoded["clip_frames"] == 25 and 16 <= decoded["decoded"] <= 25 and decoded["seconds_per_clip"] > 0
    out = tmp_path / "features"
    args = ["--features", "32", "--clips", "4", "--out", str(out)]
    _run_script("video_cost", *args, monkeypatch=monkeypatch, capsys=capsys)
    assert json.loads((out / "results_video.json").read_text())["frames_timed"] == 32
