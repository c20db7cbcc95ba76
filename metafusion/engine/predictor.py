"""Predictor: a model adapted to one task, saved as one self-describing file and loaded without the
training data; it labels new samples with the task's class names.

The file (``RUN/finetune/model.pt``) holds the meta-trained model (config, ``model_args``, weights), the
task's support set (already through the model's input pipeline), the adapted learner's state and the
class names. Loading rebuilds the learner's structure with a zero-step adaptation on that support set,
then loads the adapted state into it: every algorithm's learner (an adapted network, a fitted head,
prototypes) round-trips the same way.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import to_dict
from ..data import Batch, Episode, MultimodalDataset
from ..errors import InputError
from .build import TrainedModel
from .checkpoint import CHECKPOINT_FORMAT, check_format, file_format, library_versions, read_file, save_checkpoint

FORMAT = "metafusion.adapted-model/1"
# How an adapted model classifies new samples unless told otherwise: with the support set's normalisation
# statistics, so a sample's prediction never depends on the others predicted with it (docs/commands/predict.md).
PREDICT_PROTOCOL = "support"
# Spreadsheets run a cell that starts with one of these as a formula: such text cells get a leading quote.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


@dataclass
class Predictions:
    """One row per sample: its id, class probabilities, present modalities and modality weights."""

    ids: list[str]
    classes: list[str]
    probabilities: Tensor  # (N, ways); rows of NaN where the adapted model's logits were not finite
    modalities: tuple[str, ...]
    present: Tensor  # (N, M) bool
    weights: Tensor | None  # (N, M) attention weight of each modality; None for fusions without weights
    labels: list[str] | None = None  # the true class names, where the data has labels

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def diverged(self) -> Tensor:
        """``[N]`` bool: samples whose logits were not finite (no prediction; they count as wrong)."""
        return ~torch.isfinite(self.probabilities).all(1)

    @property
    def predicted(self) -> list[str | None]:
        best = torch.nan_to_num(self.probabilities, nan=-1.0).argmax(1).tolist()
        return [None if bad else self.classes[b] for b, bad in zip(best, self.diverged.tolist())]

    @property
    def accuracy(self) -> float | None:
        if self.labels is None or not self.ids:
            return None
        return sum(p == y for p, y in zip(self.predicted, self.labels)) / len(self.labels)

    def confusion(self) -> Tensor:
        """``[ways, ways]`` counts: row = true class, column = predicted class (diverged rows left out)."""
        if self.labels is None:
            raise InputError("the data has no labels: there is no confusion matrix")
        matrix = torch.zeros(len(self.classes), len(self.classes), dtype=torch.long)
        for p, y in zip(self.predicted, self.labels):
            if p is not None:
                matrix[self.classes.index(y), self.classes.index(p)] += 1
        return matrix

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for i, sample in enumerate(self.ids):
            row: dict[str, Any] = {"id": sample, "predicted": self.predicted[i] or ""}
            if self.labels is not None:
                row.update(label=self.labels[i], correct=int(self.predicted[i] == self.labels[i]))
            row.update({f"prob_{c}": round(float(p), 6) for c, p in zip(self.classes, self.probabilities[i])})
            row.update({f"present_{m}": int(x) for m, x in zip(self.modalities, self.present[i])})
            if self.weights is not None:
                row.update(
                    {
                        f"weight_{m}": round(float(w), 6) if x else ""
                        for m, w, x in zip(self.modalities, self.weights[i], self.present[i])
                    }
                )
            out.append(row)
        return out

    def write(self, path: str | Path, overwrite: bool = False) -> Path:
        """CSV (``.csv``) or JSON lines (``.jsonl``), by the file's extension; an existing file is replaced
        only with ``overwrite``. Written to a temporary file first, so a failure leaves no half file."""
        path = Path(path)
        if path.suffix not in (".csv", ".jsonl"):
            kind = path.suffix or "no extension"
            raise InputError(f"{path}: predictions are written as .csv or .jsonl, not {kind!r}")
        if path.is_dir():
            raise InputError(f"{path} is a folder; name the predictions file (.csv or .jsonl)")
        if path.exists() and not overwrite:
            raise InputError(
                f"{path} already exists; pass --force (overwrite=True) to replace it or choose another file"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = self.rows()
        tmp = path.with_name(f".{path.name}.tmp")
        try:  # a full disk or an interrupt leaves neither a half-written file nor the temporary one
            if path.suffix == ".jsonl":
                tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            else:
                with tmp.open("w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["id", "predicted"])
                    writer.writeheader()
                    writer.writerows([{k: _spreadsheet_safe(v) for k, v in r.items()} for r in rows])
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path


def _spreadsheet_safe(value: Any) -> Any:
    """A text cell a spreadsheet would run as a formula, quoted (OWASP's advice for CSV injection)."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def _renamed_from_learn2learn_clone(stored: dict[str, Any], expected) -> dict[str, Any]:
    """A learner's saved tensors under the names of the learner now built. Adapted models of the MAML family
    saved by earlier versions hold a learn2learn clone around the network: one ``module.`` more in each name."""
    expected = set(expected)
    return {k if k in expected else k.replace("module.", "", 1): v for k, v in stored.items()}


class Predictor:
    """``Predictor.load(path).predict_files(folder_or_manifest)`` -> ``Predictions``.

    By default (``PREDICT_PROTOCOL``) normalisation layers use the support set's statistics, so each
    sample gets the same prediction whatever else is predicted with it; ``protocol="transductive"``
    normalises over the samples predicted together (as meta-test does), ``"alone"`` classifies each
    sample in a batch of its own with the support set (slowest)."""

    def __init__(
        self, trained: TrainedModel, learner: nn.Module, support: Batch, classes: list[str], path: Path | None = None
    ):
        self.trained, self.learner, self.support, self.classes = trained, learner, support, list(classes)
        self.path = path  # the file it was loaded from

    @property
    def algorithm(self):
        return self.trained.algorithm

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.trained.inputs.modalities

    # -- the file ------------------------------------------------------------------------------
    def save(self, path: str | Path, **extra: Any) -> Path:
        trained = self.trained
        save_checkpoint(
            path,
            {
                "format": FORMAT,
                "config": to_dict(trained.cfg),
                "model_args": trained.model_args(),
                "module": trained.algorithm.module.state_dict(),
                "classes": self.classes,
                "support": {
                    "inputs": self.support.inputs,
                    "mask": self.support.mask,
                    "labels": self.support.labels,
                    "modalities": list(self.support.modalities),
                },
                "learner": self.learner.state_dict(),
                "selection": {"centroid_weight": trained.algorithm.centroid_weight},
                "versions": library_versions(),
                **extra,
            },
        )
        return Path(path)

    @staticmethod
    def load(path: str | Path, device: str = "cpu") -> Predictor:
        path = Path(path)
        if path.is_dir():  # a run folder, or its finetune/ folder
            path = path / "model.pt" if (path / "model.pt").is_file() else path / "finetune" / "model.pt"
        state = read_file(path, "model")
        if file_format(state) == CHECKPOINT_FORMAT:
            raise InputError(
                f"{path} is a meta-training checkpoint, not an adapted model: adapt it to your task first with "
                f"'metafusion fine-tune --run RUN --task YOUR_LABELLED_FILES', then use RUN/finetune/model.pt"
            )
        check_format(state, path, FORMAT, "adapted model (RUN/finetune/model.pt)")
        trained = TrainedModel.restore(state, device, ways=len(state["classes"]))
        s = state["support"]
        support = Batch(s["inputs"], s["mask"], s["labels"], tuple(s["modalities"])).to(device)
        with torch.random.fork_rng(devices=[]):  # structure only: the adapted state is loaded below
            learner = trained.algorithm.task_learner(support, 0)
        learner.load_state_dict(_renamed_from_learn2learn_clone(state["learner"], learner.state_dict().keys()))
        return Predictor(trained, learner, support, state["classes"], path)

    # -- prediction ----------------------------------------------------------------------------
    def predict(self, data: MultimodalDataset, protocol: str = PREDICT_PROTOCOL) -> Predictions:
        """Predictions for every sample of ``data`` (as ``load_user_data`` reads it: the raw format,
        before the model's pipeline)."""
        labels = None
        if data.labelled and len(data.metadata.get("class_names", [])):
            names = data.metadata["class_names"]
            unknown = sorted({names[t] for t in data.labels} - set(self.classes))
            if unknown:
                raise InputError(
                    f"the data's labels {', '.join(map(repr, unknown))} are not classes of this model "
                    f"({', '.join(self.classes)}); drop the label column to predict them anyway"
                )
            labels = [names[t] for t in data.labels]
        ids = data.metadata.get("ids") or [str(i) for i in range(len(data))]
        data = self.trained.prepare(data)
        query = data.batch(torch.arange(len(data))).to(self.trained.cfg.train.device)
        query.labels.fill_(0)  # the class ids of the user's labels mean nothing to the model
        episode = Episode(self.support, query, len(self.classes), 0, len(query), tuple(range(len(self.classes))))
        logits, weights = self.algorithm.predict_with_weights(self.learner, episode, protocol)
        columns = [data.modalities.index(m) for m in self.trained.model.modalities]
        return Predictions(
            list(ids),
            self.classes,
            torch.softmax(logits.double(), 1).float().cpu(),
            self.trained.model.modalities,
            query.mask[:, columns].cpu(),
            weights.cpu() if weights is not None else None,
            labels,
        )

    def predict_files(
        self, path: str | Path, protocol: str = PREDICT_PROTOCOL, skip_errors: bool = False
    ) -> Predictions:
        """Predictions for a folder or manifest (labels optional; see docs/datasets.md)."""
        from ..data.manifest import load_user_data

        data = load_user_data(path, self.modalities, like=self.trained.inputs, skip_errors=skip_errors, labelled=False)
        return self.predict(data, protocol)
