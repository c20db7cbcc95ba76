"""Research analysis of a meta-test, outside evaluation's hot path: what a fusion's modality weights do.

``Analysis.add`` sees each test episode and what the algorithm predicted for it (``meta_test``'s ``observe``
hook); meta-test's stage asks for it, validation never does (``accuracy_alone`` encodes each episode again).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..algorithms import MetaAlgorithm
from ..algorithms.base import TaskPrediction
from ..algorithms.nearest_mean import proto_logits, prototypes
from ..data import Episode


class CorruptedWeights:
    """The weights a fusion gives corrupted against clean modalities of the same query samples (``corrupted``:
    ``[N, M]`` over the dataset's rows, columns in the model's modality order)."""

    def __init__(self, corrupted: Tensor, modalities: tuple[str, ...]):
        self.corrupted, self.modalities = corrupted, modalities
        self.weights: dict[str, list[Tensor]] = {"corrupted": [], "clean": []}

    def add(self, episode: Episode, weights: Tensor) -> None:
        rows = torch.tensor(episode.indices[len(episode.support) :])
        corrupted = self.corrupted[rows]
        present = episode.query.mask[:, [episode.query.modalities.index(m) for m in self.modalities]].cpu()
        clean = present & ~corrupted
        both = corrupted.any(1) & clean.any(1)
        for kind, mask in (("corrupted", corrupted), ("clean", clean)):
            w, m = weights[both], mask[both].to(weights.dtype)
            self.weights[kind].append((w * m).sum(1) / m.sum(1))  # per sample, the mean over its entries of a kind

    def summary(self) -> dict[str, Any]:
        if not any(len(w) for w in self.weights["corrupted"]):
            return {}
        out: dict[str, Any] = {"samples": sum(len(w) for w in self.weights["corrupted"])}
        for kind, parts in self.weights.items():
            w = torch.cat(parts)
            out[kind] = w.mean().item()
            out[f"{kind}_histogram"] = torch.histc(w.float(), bins=10, min=0.0, max=1.0).long().tolist()
        return out


@torch.no_grad()
def accuracy_alone(model, episode: Episode) -> Tensor:
    """``[M]``: for each of the model's modalities, the accuracy on the episode's query samples that carry it of
    the nearest support class mean (cosine) over that modality's features from the meta-learned encoders
    (before any adaptation): how much this task can be solved with that modality alone. NaN where no query
    carries the modality."""
    (hs, ms), (hq, mq) = model.encode(episode.support), model.encode(episode.query)
    out = []
    for i in range(hs.shape[1]):  # class means over the support samples that carry modality i
        protos = prototypes(hs[ms[:, i], i], episode.support.labels[ms[:, i]], episode.ways)  # (ways, d)
        hit = (proto_logits(hq[:, i], protos, hq.new_ones(())).argmax(1) == episode.query.labels)[mq[:, i]]
        out.append(hit.to(hs.dtype).mean() if len(hit) else hs.new_tensor(float("nan")))
    return torch.stack(out).cpu()


class TaskWeights:
    """Per task, the mean weight a fusion gives each modality over the query samples, against that modality's
    accuracy alone on the task (``accuracy_alone``): do the weights follow what each modality is worth here?"""

    def __init__(self, modalities: tuple[str, ...]):
        self.modalities = modalities
        self.weights: list[Tensor] = []  # per task, [M]
        self.accuracies: list[Tensor] = []

    def add(self, weights: Tensor, accuracies: Tensor) -> None:
        self.weights.append(weights.mean(0))
        self.accuracies.append(accuracies)

    def summary(self) -> dict[str, Any]:
        """Per modality: the Pearson correlation over tasks of its weight with its accuracy alone, and the
        means of both; ``best_weighted``: over the tasks where one modality weighs most, the share in which it
        is (one of) the most accurate alone (None where weights never single one out, as mean fusion's)."""
        if len(self.weights) < 2:
            return {}
        w, a = torch.stack(self.weights), torch.stack(self.accuracies)  # (T, M)
        out: dict[str, Any] = {"tasks": len(self.weights), "modalities": {}}
        for i, m in enumerate(self.modalities):
            ok = torch.isfinite(a[:, i])
            x, y = w[ok, i], a[ok, i]
            x, y = x - x.mean(), y - y.mean()
            r = (x * y).sum() / (x.norm() * y.norm())
            out["modalities"][m] = {
                "correlation": r.item() if torch.isfinite(r) else None,  # None: one of them never varies
                "weight": w[ok, i].mean().item(),
                "accuracy_alone": a[ok, i].mean().item(),
            }
        best = a.nan_to_num(-1.0)
        top = best.gather(1, w.argmax(1, keepdim=True)).squeeze(1) >= best.max(1).values
        first, second = w.topk(2, dim=1).values.unbind(1)
        decided = first > second + 1e-6
        out["best_weighted"] = top[decided].to(w.dtype).mean().item() if decided.any() else None
        return out

    def rows(self) -> list[dict[str, float]]:
        """One row per task: each modality's mean weight and accuracy alone (NaN where no query carries it)."""
        rows = []
        for w, a in zip(self.weights, self.accuracies):
            row = {f"weight_{m}": w[i].item() for i, m in enumerate(self.modalities)}
            rows.append(row | {f"accuracy_alone_{m}": a[i].item() for i, m in enumerate(self.modalities)})
        return rows


class Analysis:
    """Per test episode: the weights of corrupted against clean modalities (where ``corrupted``, ``[N, M]`` over
    the dataset's rows in the model's modality order, is given) and, where the fusion weighs two or more
    modalities, each task's weights against each modality's accuracy alone."""

    def __init__(self, algorithm: MetaAlgorithm, corrupted: Tensor | None = None):
        self.model = algorithm.model
        self.split = CorruptedWeights(corrupted, self.model.modalities) if corrupted is not None else None
        self.per_task = TaskWeights(self.model.modalities)

    def add(self, episode: Episode, prediction: TaskPrediction) -> None:
        weights = prediction.weights
        if weights is None or not bool(torch.isfinite(weights).all()):
            return
        weights = weights.detach().cpu()
        if self.split is not None:
            self.split.add(episode, weights)
        if len(self.model.modalities) > 1:
            self.per_task.add(weights, accuracy_alone(self.model, episode))

    def summary(self) -> dict[str, Any]:
        """``corrupted_weights`` and ``task_weights`` (results.json keys; empty where they do not apply)."""
        return {
            "corrupted_weights": self.split.summary() if self.split is not None else {},
            "task_weights": self.per_task.summary(),
        }

    def rows(self) -> list[dict[str, float]]:
        """Per task, for task_weights.csv and its plot (none with fewer than two tasks)."""
        return self.per_task.rows() if len(self.per_task.weights) > 1 else []
