"""From a few labelled examples to predictions on new files: self-describing adapted models, `predict`,
`metafusion.load` / `metafusion.fine_tune`, and the tutorial that walks a user through them."""

import csv
import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from conftest import write_manifest

import metafusion
from metafusion.cli import main
from metafusion.data.manifest import load_user_data
from metafusion.engine.build import TrainedModel
from metafusion.engine.checkpoint import load_checkpoint
from metafusion.engine.predictor import PREDICT_PROTOCOL, Predictor
from metafusion.engine.stages import user_task
from metafusion.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
TINY_RUN = [
    "--dataset", "manifest", "--data-root", str(DATA / "tiny_manifest.csv"), "--ways", "2", "--shots", "1",
    "--queries", "1", "--meta-batch", "2", "--iterations", "2", "--set", "data.val_episodes=2", "--episodes", "4",
    "--set", "model.width=8", "--set", "model.hidden=8", "--quiet",
]  # fmt: skip


def _blocks(doc: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", doc.read_text(), flags=re.S)


def _in_repo_layout(tmp_path, monkeypatch) -> None:
    """Work in ``tmp_path`` as if it were the repository root (tests/data reachable, runs/ written there)."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "data").symlink_to(DATA)
    monkeypatch.chdir(tmp_path)


def _task_queries(tmp_path: Path, shots: int = 1) -> Path:
    """tiny_task.csv's query rows (all but the first ``shots`` of each class), in the order fine-tune
    batches them, with their file paths made absolute."""
    rows = list(csv.DictReader((DATA / "tiny_task.csv").open()))
    queries = [r for c in sorted({r["label"] for r in rows}) for r in [x for x in rows if x["label"] == c][shots:]]
    for r in queries:
        r["image"], r["tabular"] = str(DATA / r["image"]), str(DATA / r["tabular"])
    return write_manifest(tmp_path / "queries.csv", queries)


@pytest.mark.slow
def test_the_tutorial_runs_as_written(tmp_path, monkeypatch, capsys):
    """docs/tutorial-your-data.md, command by command: tiny_manifest.csv -> predictions.csv with class names."""
    _in_repo_layout(tmp_path, monkeypatch)
    doc = ROOT / "docs" / "tutorial-your-data.md"
    commands = [c.strip() for block in _blocks(doc, "bash") for c in block.splitlines() if c.startswith("metafusion ")]
    assert [c.split()[1] for c in commands] == ["meta-train", "meta-test", "fine-tune", "predict"]
    for command in commands:
        assert main(shlex.split(command)[1:]) == 0, command
    assert "metafusion predict --model runs/mine/finetune/model.pt" in capsys.readouterr().out  # fine-tune says so

    with open("runs/mine/predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ["horse0", "horse1", "horse2", "mouse0", "mouse1", "mouse2"]
    for r in rows:
        probs = {k[5:]: float(v) for k, v in r.items() if k.startswith("prob_")}
        assert set(probs) == {"horse", "mouse"} and r["predicted"] == max(probs, key=probs.get)
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
        weights = [float(r[f"weight_{m}"]) for m in ("image", "text", "tabular")]
        assert sum(weights) == pytest.approx(1.0, abs=1e-5)  # attention over the modalities present

    for block in _blocks(doc, "python") + _blocks(ROOT / "docs" / "quickstart.md", "python"):
        exec(compile(block, str(doc), "exec"), {})
    assert Path("runs/mine/predictions_py.csv").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["maml", "reptile", "metasgd", "finetune", "protonet", "centroid"])
def test_a_saved_adapted_model_predicts_what_the_fine_tune_stage_computed(tmp_path, algo):
    """Adapt to a user's task, save, load in a fresh Predictor: the loaded model's probabilities on the
    task's queries equal the in-memory learner's (so ``predict`` == the fine-tune stage)."""
    run = tmp_path / "run"
    assert main(["meta-train", *TINY_RUN, "--algo", algo, "--out", str(run)]) == 0
    trained = TrainedModel.restore(load_checkpoint(run / "best.pt"))
    episode, classes, _ = user_task(str(DATA / "tiny_task.csv"), trained, shots=1)
    learner = trained.algorithm.adapt(episode.support)
    expected = torch.softmax(trained.algorithm.predict(learner, episode, PREDICT_PROTOCOL), 1)
    Predictor(trained, learner, episode.support, classes).save(tmp_path / "model.pt")

    torch.manual_seed(123)  # loading and predicting depend on no global random state
    loaded = metafusion.load(tmp_path / "model.pt")
    predictions = loaded.predict_files(_task_queries(tmp_path))
    assert predictions.classes == ["horse", "mouse"] and predictions.labels == ["horse"] * 2 + ["mouse"] * 2
    torch.testing.assert_close(predictions.probabilities, expected.float(), atol=1e-6, rtol=1e-5)
    if algo in ("maml", "metasgd"):  # files of earlier versions: the learner a learn2learn clone of the network
        state = torch.load(tmp_path / "model.pt", weights_only=False)
        state["learner"] = {f"module.{k}": v for k, v in state["learner"].items()}
        torch.save(state, tmp_path / "clone.pt")
        again = metafusion.load(tmp_path / "clone.pt").predict_files(_task_queries(tmp_path))
        assert torch.equal(again.probabilities, predictions.probabilities)


def test_fine_tune_on_a_users_task_needs_no_training_data_and_predict_agrees_with_it(tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(DATA / "tiny_folder", data / "tiny_folder")
    shutil.copy(DATA / "tiny_manifest.csv", data / "tiny_manifest.csv")
    run = tmp_path / "run"
    args = [a if a != str(DATA / "tiny_manifest.csv") else str(data / "tiny_manifest.csv") for a in TINY_RUN]
    assert main(["meta-train", *args, "--out", str(run)]) == 0
    shutil.rmtree(data)  # the training data is gone: the checkpoint alone rebuilds model and pipeline

    model = metafusion.fine_tune(run, DATA / "tiny_task.csv")
    ft = json.loads((run / "finetune" / "finetune.json").read_text())
    assert ft["classes"] == model.classes == ["horse", "mouse"] and ft["queries"] == 4
    assert model.predict_files(_task_queries(tmp_path)).predicted == ft["query_predictions"]


def test_predict_reports_accuracy_and_handles_mismatched_input(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["meta-train", *TINY_RUN, "--out", str(run)]) == 0
    assert main(["fine-tune", "--run", str(run), "--task", str(DATA / "tiny_task.csv")]) == 0
    capsys.readouterr()

    # Labelled data: accuracy, confusion matrix (printed and as a PNG).
    assert (
        main(["predict", "--model", str(run), "--data", str(DATA / "tiny_task.csv"), "--out", str(tmp_path / "p.csv")])
        == 0
    )
    out = capsys.readouterr().out
    assert "accuracy" in out and (tmp_path / "p.png").is_file()
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert {r["label"] for r in rows} == {"horse", "mouse"} and all(r["correct"] in ("0", "1") for r in rows)

    # A modality missing from the files is masked, with a warning; an unknown column is ignored.
    rows = [{"id": r["id"], "tabular": str(DATA / r["tabular"]), "colour": "red"} for r in
            csv.DictReader((DATA / "tiny_unlabelled.csv").open())]  # fmt: skip
    partial = write_manifest(tmp_path / "tabular_only.csv", rows)
    assert main(["predict", "--model", str(run), "--data", str(partial), "--out", str(tmp_path / "t.csv")]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "has no image data" in err and "has no text data" in err
    assert "column 'colour' ignored" in err
    rows = list(csv.DictReader((tmp_path / "t.csv").open()))
    assert all(r["present_image"] == "0" and r["weight_image"] == "" and r["predicted"] for r in rows)

    # Bad input: one line naming the problem, exit 2.
    assert main(["predict", "--model", str(run / "best.pt"), "--data", str(partial)]) == 2
    assert "a meta-training checkpoint, not an adapted model" in capsys.readouterr().err
    assert main(["predict", "--model", str(run), "--data", str(DATA / "tiny_manifest.csv")]) == 2
    assert "are not classes of this model (horse, mouse)" in capsys.readouterr().err


def test_the_manifest_split_column_is_honoured_and_checked(tmp_path):
    ds = load_user_data(DATA / "tiny_manifest.csv")
    names = ds.metadata["class_names"]
    assert {s: [names[c] for c in cs] for s, cs in ds.splits.items()} == {
        "train": ["bird", "cat", "dog", "owl"],
        "val": ["fish", "frog"],
        "test": ["horse", "mouse"],
    }
    rows = list(csv.DictReader((DATA / "tiny_manifest.csv").open()))
    for r in rows:  # absolute paths; an empty cell (no image) stays empty
        r["image"], r["tabular"] = (str(DATA / r[c]) if r[c] else "" for c in ("image", "tabular"))
    rows[1]["split"] = "test"  # the second cat
    with pytest.raises(InputError, match="class 'cat' is in both the 'train' and 'test' splits"):
        load_user_data(write_manifest(tmp_path / "two.csv", rows))
    rows[1]["split"] = "holdout"
    with pytest.raises(InputError, match="split 'holdout'; use one of: train, val, test"):
        load_user_data(write_manifest(tmp_path / "bad.csv", rows))


def test_split_folders_give_the_class_split(tmp_path):
    import shutil

    for split, classes in {"train": ["cat", "dog"], "val": ["fish"], "test": ["frog", "bird"]}.items():
        for c in classes:
            shutil.copytree(DATA / "tiny_folder" / c, tmp_path / split / c)
    ds = load_user_data(tmp_path)
    names = ds.metadata["class_names"]
    assert {s: [names[c] for c in cs] for s, cs in ds.splits.items()} == {
        "train": ["cat", "dog"],
        "val": ["fish"],
        "test": ["bird", "frog"],
    }


def test_omniglot_strokes_are_named_where_asked_for_on_omniglot(tmp_path, capsys):
    args = ["--dataset", "omniglot", "--modalities", "image,strokes", "--data-root", str(tmp_path)]
    code = main(["meta-train", *args, "--out", str(tmp_path / "run")])
    assert code == 2 and "omniglot-strokes" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; this machine has none")
@pytest.mark.parametrize("algo", ["maml", "metasgd", "finetune", "protonet"])
def test_a_users_task_adapts_and_predicts_on_cuda(tmp_path, algo):
    """Heads reset for the user's number of classes, labels and support set all on the model's device."""
    run = tmp_path / "run"
    assert main(["meta-train", *TINY_RUN, "--algo", algo, "--device", "cuda", "--out", str(run)]) == 0
    model = metafusion.fine_tune(run, DATA / "tiny_task.csv")
    cuda = metafusion.load(run, device="cuda")
    queries = _task_queries(tmp_path)
    assert cuda.predict_files(queries).predicted == model.predict_files(queries).predicted


def _raw_samples(model, rows: torch.Tensor):
    """Samples ``rows`` of the model's dataset, raw (before its pipeline), without labels, as a user's files."""
    from metafusion.engine.build import raw_dataset

    return raw_dataset(model.trained.cfg).unlabelled(rows)


@pytest.fixture(scope="module")
def synthetic_model(tmp_path_factory):
    """A tiny synthetic MAML model (Conv4 image + mel-CNN audio: batch-statistics BatchNorm) adapted to a task."""
    from test_cli import TINY

    run = tmp_path_factory.mktemp("synthetic") / "run"
    assert main(["meta-train", *map(str, TINY), "--iterations", "2", "--out", str(run)]) == 0
    assert main(["fine-tune", "--run", str(run), "--quiet"]) == 0
    return metafusion.load(run)


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["support", "alone"])
def test_a_prediction_does_not_depend_on_the_samples_predicted_with_it(synthetic_model, protocol):
    rows = torch.arange(51) * 3
    alone = synthetic_model.predict(_raw_samples(synthetic_model, rows[:1]), protocol)
    order = torch.randperm(51, generator=torch.Generator().manual_seed(0))
    together = synthetic_model.predict(_raw_samples(synthetic_model, rows[order]), protocol)
    where = int(torch.nonzero(order == 0))
    torch.testing.assert_close(together.probabilities[where], alone.probabilities[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(together.weights[where], alone.weights[0], atol=1e-5, rtol=1e-4)


def test_the_transductive_protocol_does_depend_on_the_batch(synthetic_model):
    """The check above can fail: normalising over the batch moves a sample's probabilities."""
    rows = torch.arange(51) * 3
    alone = synthetic_model.predict(_raw_samples(synthetic_model, rows[:1]), "transductive")
    together = synthetic_model.predict(_raw_samples(synthetic_model, rows), "transductive")
    assert (together.probabilities[0] - alone.probabilities[0]).abs().max() > 1e-3


@pytest.mark.slow
def test_a_one_class_task_and_a_diverged_adaptation_are_errors_with_nothing_saved(tmp_path, monkeypatch):
    import shutil

    from metafusion.algorithms.base import MetaAlgorithm

    run = tmp_path / "run"
    assert main(["meta-train", *TINY_RUN, "--algo", "protonet", "--out", str(run)]) == 0
    one = tmp_path / "one"
    shutil.copytree(DATA / "tiny_folder" / "cat", one / "cat")
    with pytest.raises(InputError, match="at least 2 classes"):
        metafusion.fine_tune(run, one, out=tmp_path / "a")
    assert not (tmp_path / "a").exists()
    metafusion.fine_tune(run, DATA / "tiny_task.csv", out=tmp_path / "good")
    monkeypatch.setattr(MetaAlgorithm, "predict", lambda self, learner, episode, protocol: torch.full(
        (len(episode.query), episode.ways), float("nan")))  # fmt: skip
    with pytest.raises(InputError, match="not finite on 4 of 4 query samples"):
        metafusion.fine_tune(run, DATA / "tiny_task.csv", out=tmp_path / "b")
    assert not (tmp_path / "b" / "model.pt").exists()
    out = tmp_path / "p.csv"
    monkeypatch.setattr(MetaAlgorithm, "predict_with_weights", lambda self, learner, episode, protocol: (
        torch.full((len(episode.query), episode.ways), float("nan")), None))  # fmt: skip
    assert main(["predict", "--model", str(tmp_path / "good"), "--data", str(_task_queries(tmp_path)),
                 "--out", str(out)]) == 2 and not out.exists()  # fmt: skip


def test_constant_features_are_centred_not_blown_up():
    from metafusion.data import MultimodalDataset, Standardizer

    x = torch.zeros(12, 3)
    x[:, 0] = torch.arange(12.0)  # varies
    x[:, 1] = 5.0  # constant on every split
    x[:6, 2], x[6:, 2] = 1.0, torch.linspace(0, 2, 6)  # constant on the meta-train classes only
    ds = MultimodalDataset({"t": x}, torch.ones(12, 1, dtype=torch.bool), torch.arange(12) // 2, ("t",),
                           {"train": [0, 1, 2], "val": [3], "test": [4, 5]})  # fmt: skip
    out = Standardizer.fit(ds)(ds).data["t"]
    assert torch.allclose(out[:, 1], torch.zeros(12)) and torch.allclose(out[6:, 2], x[6:, 2] - 1.0)
    train = x[:6, 0]  # classes 0-2: rows 0-5
    assert torch.allclose(out[:, 0], (x[:, 0] - train.mean()) / train.std())  # a varying feature: scaled as before


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_full_disk_while_writing_predictions_leaves_no_file_behind(tmp_path, monkeypatch, suffix):
    import errno

    from metafusion.engine.predictor import Predictions

    predictions = Predictions(["a", "b"], ["x", "y"], torch.tensor([[0.9, 0.1], [0.2, 0.8]]), ("image",),
                              torch.ones(2, 1, dtype=torch.bool), None)  # fmt: skip
    real_open = Path.open

    def full_disk(self, *args, **kwargs):
        if self.name.endswith(".tmp"):
            with open(self, "wb") as f:  # part of it reached the disk
                f.write(b"id,predi")
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", full_disk)
    with pytest.raises(OSError, match="No space left"):
        predictions.write(tmp_path / f"p{suffix}")
    assert list(tmp_path.iterdir()) == []
