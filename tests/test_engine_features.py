"""Frozen parts of pretrained encoders run once per sample and are cached by content; a model with a
pretrained top goes through every stage (meta-train, meta-test, fine-tune, predict) on a user's files."""

from pathlib import Path

import pytest
import torch
from test_cli import run_cli

import metafusion
from metafusion.config import load_config
from metafusion.data import make_synthetic
from metafusion.engine.features import with_frozen_features
from metafusion.engine.resolve import resolve
from metafusion.models.encoders.speech import FrozenSpeechEmbedding

DATA = Path(__file__).resolve().parent / "data"


def test_frozen_features_are_computed_once_and_cached_by_content(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("METAFUSION_CACHE", str(tmp_path / "cache"))
    calls = []
    run = FrozenSpeechEmbedding.__call__

    def counted(self, waves):
        calls.append(len(waves))
        return run(self, waves)

    monkeypatch.setattr(FrozenSpeechEmbedding, "__call__", counted)
    data = make_synthetic(num_classes=10, samples_per_class=3, missing_rate=0.2).select_modalities(["audio", "tabular"])
    cfg = resolve(load_config(None, {"model.encoders": {"audio": "speech-embedding"}}))
    first, activations = with_frozen_features(cfg, data)
    assert activations == ()  # pooled features: standardised like any feature vector
    present = data.present[:, 0]
    assert first.data["audio"].shape == (30, 96) and sum(calls) == int(present.sum())  # present rows only
    assert (first.data["audio"][~present] == 0).all() and torch.equal(first.data["tabular"], data.data["tabular"])
    assert "samples through speech-embedding" in capsys.readouterr().err  # the time it took is reported
    again, _ = with_frozen_features(cfg, data)
    assert sum(calls) == int(present.sum()) and torch.equal(again.data["audio"], first.data["audio"])  # the cache
    data.data["audio"][0] += 1.0  # other contents: computed again
    with_frozen_features(cfg, data)
    assert sum(calls) == 2 * int(present.sum())


@pytest.mark.slow
def test_a_model_with_a_pretrained_top_runs_every_stage_on_a_users_files(tmp_path):
    """EfficientNet-Lite0 with its top block meta-trained by MAML on tests/data's manifest (RGB from grey),
    saved, restored without the training data, adapted to a user's task and predicting files."""
    run = tmp_path / "run"
    args = [
        "--dataset", "manifest", "--data-root", DATA / "tiny_manifest.csv", "--ways", "2", "--queries", "1",
        "--set", "data.val_episodes=2", "--episodes", "2", "--meta-batch", "2", "--iterations", "2",
        "--modalities", "image,tabular", "--encoder", "image=efficientnet-lite0",
        "--set", "model.image.input_size=32", "--set", "model.image.trainable=1", "--set", "model.width=16",
        "--inner-lr", "0.05", "--quiet",
    ]  # fmt: skip
    assert run_cli("meta-train", *args, "--out", run) == 0
    saved = (run / "config.yaml").read_text()
    assert "input_size: 32" in saved and "trainable: 1" in saved
    assert run_cli("meta-test", "--run", run, "--quiet") == 0
    assert run_cli("fine-tune", "--run", run, "--task", DATA / "tiny_task.csv", "--quiet") == 0
    model = metafusion.load(run)
    assert model.trained.model.encoders["image"].pretrained is not None
    predictions = model.predict_files(DATA / "tiny_unlabelled.csv")
    assert len(predictions) == 6 and torch.isfinite(predictions.probabilities).all()


def test_a_bad_cache_entry_is_rebuilt_and_a_full_disk_only_costs_the_saving(tmp_path, monkeypatch):
    import errno

    from metafusion.data import cache

    monkeypatch.setenv("METAFUSION_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "features").mkdir(parents=True)
    torch.save(torch.zeros(3, 4), tmp_path / "cache" / "features" / "x.pt")  # an entry of the wrong shape
    built = cache.cached("features/x.pt", lambda: torch.ones(5, 4), valid=lambda x: len(x) == 5)
    assert torch.equal(built, torch.ones(5, 4))
    assert torch.equal(torch.load(tmp_path / "cache" / "features" / "x.pt"), built)  # rebuilt and saved

    def full_disk(value, path):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(cache.torch, "save", full_disk)
    with pytest.warns(UserWarning, match=r"cannot write the cache .* \(No space left on device\)"):
        assert torch.equal(cache.cached("features/y.pt", lambda: torch.ones(2)), torch.ones(2))
    assert sorted(p.name for p in (tmp_path / "cache" / "features").iterdir()) == ["x.pt"]  # no .tmp left
