"""Meta-test: adapt on each fixed episode's support set, score its query set, summarise with a 95% CI."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from ..algorithms import MetaAlgorithm
from ..algorithms.protonet import proto_logits, prototypes
from ..data import Episode
from ..data.episodes import fingerprint_of

# Episodes handed to ``evaluate_many`` at once: enough to fill a vmap, few enough to bound its memory
# (the stacked weights and activations of every episode in the call) and to keep the bar moving.
EPISODES_PER_CALL = 50


@dataclass
class EvalResult:
    accuracy_mean: float
    accuracy_std: float
    accuracy_ci95: float
    macro_f1: float
    loss: float
    episodes: int
    fingerprint: str  # hash of the episodes: equal for two runs iff they were tested on the same tasks
    seconds: float
    modality_weights: dict[str, float] = field(default_factory=dict)
    # Where the data has corrupted modalities (data.corrupt_rate): over query samples holding both a corrupted and
    # a clean modality, the mean weight of each kind, and histograms (10 bins over [0, 1]) of those weights.
    corrupted_weights: dict[str, Any] = field(default_factory=dict)
    # Where a fusion weighs two or more modalities: per task, the weights against each modality's accuracy alone.
    task_weights: dict[str, Any] = field(default_factory=dict)
    episodes_diverged: int = 0  # episodes with non-finite logits (their non-finite queries count as wrong)
    accuracies: list[float] = field(default_factory=list, repr=False)
    # TaskWeights.rows(): one row per task, for task_weights.csv and its plot (too long for results.json).
    per_task: list[dict[str, float]] = field(default_factory=list, repr=False)

    def to_dict(self, with_accuracies: bool = False) -> dict:
        d = asdict(self)
        d.pop("per_task")
        if not with_accuracies:
            d.pop("accuracies")
        return d


def confidence_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean, std and the 95% CI half-width ``1.96 * std / sqrt(n)`` (population std, as the MAML and
    Reptile evaluation code compute it)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    return mean, std, 1.96 * std / math.sqrt(n)


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


def meta_test(
    algorithm: MetaAlgorithm,
    episodes: Sequence[Episode],
    quiet: bool = True,
    desc: str = "meta-test",
    device: str = "cpu",
    corrupted: Tensor | None = None,
) -> EvalResult:
    """Adapt on each episode's support set and score its query set; ``EPISODES_PER_CALL`` episodes at a
    time go to ``algorithm.evaluate_many`` (adapted together where that is faster). ``corrupted`` (``[N, M]``
    over the dataset's rows, the model's modality order): report the weights of corrupted modalities. Where the
    fusion weighs several modalities, each task's weights are set against each modality's accuracy alone."""
    start = time.perf_counter()
    accs, f1s, losses, weights, diverged, fingerprints = [], [], [], [], 0, []
    split = CorruptedWeights(corrupted, algorithm.model.modalities) if corrupted is not None else None
    per_task = TaskWeights(algorithm.model.modalities)
    bar = tqdm(total=len(episodes), desc=desc, disable=True if quiet else None, leave=False, dynamic_ncols=True)
    stream = iter(episodes)  # drawn chunk by chunk: memory does not grow with the number of episodes
    while chunk := [e.to(device) for e in itertools.islice(stream, EPISODES_PER_CALL)]:
        fingerprints += [e.fingerprint() for e in chunk]
        for e, m in zip(chunk, algorithm.evaluate_many(chunk)):
            accs.append(m["accuracy"])
            if split is not None and "query_weights" in m:
                split.add(e, m["query_weights"])
            if "query_weights" in m and len(algorithm.model.modalities) > 1:
                per_task.add(m["query_weights"], accuracy_alone(algorithm.model, e))
            f1s.append(m["macro_f1"])
            if m["diverged"]:
                diverged += 1
            else:
                losses.append(m["loss"])
            if "modality_weights" in m:
                weights.append(m["modality_weights"])
        bar.update(len(chunk))
        bar.set_postfix(acc=f"{sum(accs) / len(accs):.3f}")
    bar.close()
    mean, std, ci = confidence_interval(accs)
    mw = {m: sum(w[m] for w in weights) / len(weights) for m in weights[0]} if weights else {}
    if diverged:
        tqdm.write(
            f"warning: {desc}: {diverged} of {len(episodes)} episodes diverged (non-finite logits); their "
            f"non-finite queries count as wrong and the loss is averaged over the other episodes"
        )
    loss = sum(losses) / len(losses) if losses else float("nan")
    return EvalResult(
        mean,
        std,
        ci,
        sum(f1s) / len(f1s),
        loss,
        len(episodes),
        fingerprint_of(fingerprints),
        time.perf_counter() - start,
        mw,
        split.summary() if split is not None else {},
        per_task.summary(),
        diverged,
        accs,
        per_task.rows() if len(per_task.weights) > 1 else [],
    )
