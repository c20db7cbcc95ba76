"""The command line end to end on tiny budgets: every command writes what it promises, runs resume
exactly after a kill, comparisons use identical episodes, and bad input gives clear errors."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from metafusion.algorithms import ALGORITHMS
from metafusion.cli import main
from metafusion.engine.checkpoint import load_checkpoint
from metafusion.models import FUSIONS

TINY_RUN = [
    "--queries",
    "2",
    "--set",
    "data.val_episodes=2",
    "--episodes",
    "6",
    "--set",
    "model.width=8",
    "--set",
    "model.hidden=8",
    "--meta-batch",
    "2",
    "--set",
    "train.val_interval=3",
    "--quiet",
]  # fmt: skip   (any dataset)
TINY = ["--set", "data.num_classes=30", "--set", "data.samples_per_class=10", *TINY_RUN]  # a small synthetic set


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ("meta-train", "meta-test", "fine-tune", "run", "compare", "datasets"):
        assert command in out


@pytest.mark.parametrize("argv", [["frobnicate"], ["meta-train", "--no-such-flag"], ["fine-tune"]])
def test_bad_usage_exits_non_zero_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--set", "train.iterationz=3"], "unknown config key 'train.iterationz'"),
        (["--algo", "mamal"], "choose one of: " + ", ".join(ALGORITHMS.names())),
        (["--modalities", "image,smell"], "no modality 'smell'"),
        (["--dataset", "omniglot", "--data-root", "/nonexistent/data"], "/nonexistent/data does not exist"),
        (["--fusion", "sum"], "choose one of: " + ", ".join(FUSIONS.names())),
        (["--set", "data.train_ways=10"], "only protonet (no classifier head) can train on more ways"),
        (["--set", "algo.metric=cosine"], "unknown config key 'algo.metric' for algorithm maml (algo.metric is an opt"),
        (
            ["--algo", "reptile", "--set", "algo.proto_init=true"],
            "algo.proto_init is an option of anil and fomaml and maml",
        ),
        (["--set", "algo.proto_init=true", "--fusion", "late"], "one linear head on the fused feature (not 'late'"),
    ],
)
def test_bad_values_give_clear_errors(tmp_path, capsys, args, message):
    tiny = TINY_RUN if "--dataset" in args else TINY
    assert run_cli("meta-train", *tiny, "--iterations", 1, "--out", tmp_path / "r", *args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_meta_train_test_fine_tune_write_what_they_promise(tmp_path, capsys):
    run = tmp_path / "maml"
    assert run_cli("meta-train", *TINY, "--iterations", 6, "--out", run) == 0
    for name in ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", "train.json"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_accuracy" in r] == [3, 6]
    ckpt = load_checkpoint(run / "last.pt")
    assert {"module", "optimizer", "config", "versions", "rng", "step", "sampler"} <= set(ckpt)
    assert yaml.safe_load((run / "config.yaml").read_text())["algo"]["inner_lr"] == 0.4  # resolved

    # An existing run folder is never silently overwritten.
    assert run_cli("meta-train", *TINY, "--iterations", 6, "--out", run) == 2
    assert "already exists" in capsys.readouterr().err

    assert run_cli("meta-test", "--run", run, "--quiet") == 0
    results = json.loads((run / "results.json").read_text())
    assert results["episodes"] == 6 and 0 < results["macro_f1"] and 0 < results["accuracy_std"]
    assert set(results["modality_weights"]) == {"image", "audio", "text", "tabular"}
    assert {"versions", "git_commit", "train_seconds", "tasks_per_s", "peak_memory_mb"} <= set(results)
    assert results["accuracy_ci95"] == pytest.approx(1.96 * results["accuracy_std"] / 6**0.5)
    for name in ("results.md", "learning_curve.png", "attention.png"):
        assert (run / name).is_file(), name

    assert run_cli("meta-test", "--run", run, "--non-transductive", "--quiet") == 0
    nt = json.loads((run / "results_nontransductive.json").read_text())
    assert nt["transductive"] is False and results["transductive"] is True
    assert nt["fingerprint"] == results["fingerprint"]

    assert run_cli("fine-tune", "--run", run, "--seed", 1, "--quiet") == 0
    ft = json.loads((run / "finetune" / "finetune.json").read_text())
    assert (run / "finetune" / "model.pt").is_file()
    correct = ft["query_accuracy"] * ft["queries"]  # a count of the predictions listed
    assert len(ft["query_predictions"]) == ft["queries"] and correct == pytest.approx(round(correct))
    assert "query accuracy" in capsys.readouterr().out

    # A checkpoint alone is enough; results land beside it, named after it (the run's own results stay).
    assert run_cli("meta-test", "--checkpoint", run / "last.pt", "--episodes", 3, "--quiet") == 0
    assert json.loads((run / "results_last.json").read_text())["episodes"] == 3
    assert json.loads((run / "results.json").read_text())["episodes"] == 6
    assert run_cli("meta-test") == 2
    assert "needs --run RUN or --checkpoint PATH" in capsys.readouterr().err


def test_run_does_all_three_stages(tmp_path):
    run = tmp_path / "proto"
    assert run_cli("run", *TINY, "--algo", "protonet", "--iterations", 3, "--out", run) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["algorithm"] == "protonet" and "finetune" in results


@pytest.mark.slow
def test_compare_uses_identical_episodes(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert run_cli("compare", *TINY, "--algos", "maml,reptile", "--iterations", 3, "--out", out) == 0
    a = json.loads((out / "maml" / "results.json").read_text())
    b = json.loads((out / "reptile" / "results.json").read_text())
    assert a["fingerprint"] == b["fingerprint"] and a["episodes"] == b["episodes"] == 6
    baseline = json.loads((out / "centroid" / "results.json").read_text())  # added to every comparison
    assert baseline["fingerprint"] == a["fingerprint"] and baseline["iterations"] == 0
    modalities = a["modalities"]
    assert len(modalities) > 1
    for m in modalities:  # and the centroid on each modality alone, on the same episodes
        alone = json.loads((out / f"centroid-{m}" / "results.json").read_text())
        assert alone["modalities"] == [m] and alone["fingerprint"] == a["fingerprint"]
    table = (out / "compare.md").read_text()
    fused = "+".join(modalities)
    assert f"| maml | {fused} |" in table and f"| reptile | {fused} |" in table and f"| centroid | {fused} |" in table
    assert all(f"| centroid | {m} |" in table for m in modalities)
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [r["modalities"] for r in rows] == [fused] * 3 + list(modalities)
    assert "accuracy (95% CI)" in capsys.readouterr().out


def test_compare_leaves_the_baseline_out_when_told(tmp_path):
    out = tmp_path / "cmp"
    assert run_cli("compare", *TINY, "--algos", "protonet", "--iterations", 2, "--no-baseline", "--out", out) == 0
    assert not (out / "centroid").exists() and "| centroid |" not in (out / "compare.md").read_text()


def test_centroid_trains_nothing_and_every_stage_still_works(tmp_path, capsys):
    run = tmp_path / "centroid"
    assert run_cli("meta-train", *TINY, "--algo", "centroid", "--out", run) == 0
    train = json.loads((run / "train.json").read_text())
    assert train["iterations"] == 0 and 0.2 < train["best_val_accuracy"] <= 1.0
    assert (run / "best.pt").is_file() and (run / "last.pt").is_file()
    assert run_cli("meta-test", "--run", run, "--quiet") == 0
    results = json.loads((run / "results.json").read_text())
    assert results["algorithm"] == "centroid" and results["episodes_diverged"] == 0
    assert run_cli("fine-tune", "--run", run, "--quiet") == 0
    assert "query accuracy" in capsys.readouterr().out


def test_nan_loss_stops_with_the_iteration(tmp_path, capsys):
    code = run_cli("meta-train", *TINY, "--iterations", 6, "--inner-lr", "1e30", "--out", tmp_path / "nan")
    err = capsys.readouterr().err
    assert code == 2 and "non-finite meta-loss or gradient at iteration 1" in err


def _cli(*args):
    return [sys.executable, "-m", "metafusion", *map(str, args)]


# One tiny Reptile run, trained uninterrupted once for every interruption test: the interrupted runs take the
# same flags (the log interval included, so their metrics logs compare line by line). last.pt is written at
# each validation (every 7 steps) and, after a stop signal, at the step the signal ended.
INTERRUPTED = [
    *TINY, "--algo", "reptile", "--iterations", 40, "--set", "data.train_shots=2",
    "--set", "algo.inner_steps_test=5", "--set", "train.val_interval=7", "--set", "train.log_interval=1",
]  # fmt: skip


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert run_cli("meta-train", *INTERRUPTED, "--out", out) == 0
    return out


def _interrupted(out: Path, enough, signum: int) -> subprocess.Popen:
    """Start the run in a process of its own (two threads, as this one) and send ``signum`` once ``enough(out)``."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.Popen(
        _cli("meta-train", *INTERRUPTED, "--out", out),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not enough(out):
        time.sleep(0.02)
    proc.send_signal(signum)
    return proc


def _resume_and_compare(interrupted: Path, full: Path) -> None:
    """Resume ``interrupted`` to its end: its weights must equal the uninterrupted run's."""
    assert run_cli("meta-train", "--resume", interrupted, "--quiet") == 0
    expected = load_checkpoint(full / "last.pt")
    resumed = load_checkpoint(interrupted / "last.pt")
    assert resumed["step"] == expected["step"] == 40
    for k, v in expected["module"].items():
        assert torch.equal(v, resumed["module"][k]), k


def _logged_steps(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted_run(tmp_path, uninterrupted):
    def checkpointed(out: Path) -> bool:
        try:  # written atomically, so this only races with the very first write
            return (out / "last.pt").exists() and load_checkpoint(out / "last.pt")["step"] >= 6
        except Exception:
            return False

    killed = tmp_path / "killed"
    _interrupted(killed, checkpointed, signal.SIGKILL).wait()
    step = load_checkpoint(killed / "last.pt")["step"]
    assert 0 < step < 40, f"the run was not interrupted mid-way (last checkpoint at step {step})"

    _resume_and_compare(killed, uninterrupted)

    def strip(path: Path) -> list[dict]:
        return [
            {k: v for k, v in json.loads(line).items() if k not in ("elapsed_s", "tasks_per_s")}
            for line in path.read_text().splitlines()
        ]

    assert strip(killed / "metrics.jsonl") == strip(uninterrupted / "metrics.jsonl")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_writes_last_pt_and_says_how_to_resume(tmp_path, signum, uninterrupted):
    """SIGTERM/SIGINT end meta-training after the current step with last.pt written (not only at the last
    validation), exit 128 + the signal, and the resumed run equals the uninterrupted one."""
    stopped = tmp_path / "stopped"
    proc = _interrupted(stopped, lambda out: _logged_steps(out) >= 3, signum)  # a few logged iterations
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert "--resume" in err and "last.pt" in err
    step = load_checkpoint(stopped / "last.pt")["step"]
    ended = json.loads((stopped / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert 3 <= step == ended < 40, f"last.pt should hold step {ended}, the step the signal ended (got {step})"

    _resume_and_compare(stopped, uninterrupted)


def test_fine_tune_on_a_users_folder(tmp_path):
    """Meta-train on synthetic image + tabular data, then adapt to a user's own 3-class folder."""
    import numpy as np
    from PIL import Image

    run = tmp_path / "run"
    assert run_cli("meta-train", *TINY, "--modalities", "image,tabular", "--iterations", 2, "--out", run) == 0
    rng = np.random.default_rng(0)
    for c in ("left", "right", "up"):
        (tmp_path / "task" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray((rng.random((28, 28)) * 255).astype(np.uint8)).save(tmp_path / "task" / c / f"{i}.png")
            np.save(tmp_path / "task" / c / f"{i}.npy", rng.normal(size=16).astype(np.float32))
    assert run_cli("fine-tune", "--run", run, "--task", tmp_path / "task", "--quiet") == 0
    ft = json.loads((run / "finetune" / "finetune.json").read_text())
    assert ft["ways"] == 3 and ft["shots"] == 1 and ft["queries"] == 6  # the user's 3 classes, 2 queries each


# --- bad input: each case exits 2 with one line naming the problem, and never shows a traceback -----------
def _manifest(tmp_path, edit=None):
    """A copy of tests/data/tiny_manifest.csv (and its files) that ``edit(rows, folder)`` may change."""
    import csv
    import shutil

    data = Path(__file__).parent / "data"
    shutil.copytree(data / "tiny_folder", tmp_path / "tiny_folder")
    with (data / "tiny_manifest.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    if edit:
        edit(rows, tmp_path / "tiny_folder")
    path = tmp_path / "manifest.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _nan_tabular(rows, folder):
    import numpy as np

    x = np.load(folder / "cat" / "cat0.npy")
    x[1] = np.nan
    np.save(folder / "cat" / "cat0.npy", x)


def _bad_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  ways: 5\n  shots: [1\ntrain: {iterations: 3}\n")
    return ["--config", path]


@pytest.mark.parametrize(
    "case,message",
    [
        (lambda t: _bad_yaml(t), "bad.yaml:4:6: not valid YAML: expected ',' or ']'"),
        (lambda t: ["--device", "cuda"], "no CUDA device is available on this machine; use --device cpu"),
        (lambda t: ["--device", "tpu"], "train.device='tpu' is not a device"),
        (lambda t: ["--inner-lr", "-1"], "algo.inner_lr must be > 0, got -1.0"),
        (lambda t: ["--meta-lr", "-0.1"], "train.meta_lr must be > 0, got -0.1"),
        (lambda t: ["--ways", "1"], "data.ways must be >= 2"),
        (lambda t: ["--budget", "0"], "train.budget_minutes must be > 0"),
        (
            lambda t: ["--dataset", "manifest", "--data-root", _manifest(t, _nan_tabular)],
            "cat0.npy (tabular) holds 1 non-finite values (NaN or inf)",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, case, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the no-GPU case, on any machine
    run = tmp_path / "run"
    run.mkdir()
    (run / ".metafusion-run").write_text("")  # an earlier run's folder, which --overwrite may replace
    (run / "config.yaml").write_text("an earlier run")
    args = case(tmp_path)
    tiny = TINY_RUN if "--dataset" in args else TINY
    assert run_cli("meta-train", *tiny, "--iterations", 1, "--out", run, "--overwrite", *args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in run.iterdir()) == [".metafusion-run", "config.yaml"]  # nothing written
    assert (run / "config.yaml").read_text() == "an earlier run"


def test_non_finite_files_can_be_masked_and_counted(tmp_path):
    from metafusion.config import load_config
    from metafusion.engine.build import raw_dataset
    from metafusion.engine.resolve import resolve
    from metafusion.errors import InputWarning

    root = str(_manifest(tmp_path, _nan_tabular))
    cfg = resolve(load_config(None, {"data.dataset": "manifest", "data.root": root, "data.skip_unreadable": True}))
    with pytest.warns(InputWarning, match="skipped 1 unreadable files"):
        ds = raw_dataset(cfg)
    assert ds.metadata["skipped"] == 1 and not ds.present[0, ds.modalities.index("tabular")]
    assert torch.isfinite(ds.data["tabular"]).all()


def test_inline_text_longer_than_a_file_name_loads_as_text(tmp_path):
    from metafusion.data.manifest import load_user_data

    long = "please tell me " * 30  # 450 characters: tried as a path, the file system refuses the name

    def edit(rows, folder):
        rows[0]["text"] = long

    ds = load_user_data(_manifest(tmp_path, edit))
    assert ds.metadata["texts"][0] == long and ds.present[0].all()


@pytest.mark.slow
def test_a_diverged_meta_test_is_reported_not_averaged_silently(tmp_path, capsys):
    run = tmp_path / "run"
    no_fallback = ["--set", "select.alphas=1", "--set", "select.centroid_weights=0"]  # keep the diverging model
    # meta-test reports the divergence; fine-tune then refuses to save a model that answers NaN
    assert run_cli("run", *TINY, "--iterations", 2, "--set", "algo.inner_lr_test=1e30", *no_fallback, "--out", run) == 2
    results = json.loads((run / "results.json").read_text())
    assert results["episodes_diverged"] == results["episodes"] == 6 and results["accuracy_mean"] == 0.0
    printed = capsys.readouterr()
    assert "6 of 6 episodes diverged" in printed.out and "not finite" in printed.err
    assert not (run / "finetune" / "model.pt").exists()


@pytest.mark.parametrize("error", [KeyError("internal"), ValueError("a shape bug"), FileNotFoundError("/tmp/x")])
def test_a_bug_shows_its_traceback_and_says_it_is_one(monkeypatch, capsys, error):
    """Only the project's InputError means bad input (exit 2, one line); a ValueError or FileNotFoundError
    from inside metafusion or a library is a bug, shown with its traceback."""
    from metafusion.engine import stages

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(stages, "stage_meta_train", broken)
    assert run_cli("meta-train", *TINY, "--iterations", 1) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "a bug in metafusion" in err


@pytest.mark.slow
def test_resume_refuses_flags_it_would_not_apply_and_lengthens_a_run_with_iterations(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli("meta-train", *TINY, "--iterations", 2, "--out", run) == 0
    assert run_cli("meta-train", "--resume", run, "--set", "train.meta_lr=0.1", "--algo", "reptile") == 2
    err = capsys.readouterr().err
    assert "--algo, --set would not apply: drop them" in err and "\n" not in err.strip()
    assert run_cli("meta-train", "--resume", run, "--iterations", 1) == 2
    assert "already taken 2 steps" in capsys.readouterr().err
    assert run_cli("meta-train", "--resume", run, "--iterations", 4, "--quiet") == 0
    assert json.loads((run / "train.json").read_text())["iterations"] == 4
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["iterations"] == 4
    edited = yaml.safe_load((run / "config.yaml").read_text())
    edited["model"]["width"] = 32
    (run / "config.yaml").write_text(yaml.safe_dump(edited))
    assert run_cli("meta-train", "--resume", run, "--iterations", 5) == 2
    assert "config.yaml was edited since the run began (model.width)" in capsys.readouterr().err
