"""Meta-test: adapt on each fixed episode's support set, score its query set, summarise with a 95% CI."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor
from tqdm import tqdm

from ..algorithms import MetaAlgorithm, classification_metrics
from ..algorithms.base import TaskPrediction
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
    modality_weights: dict[str, float] = field(default_factory=dict)  # mean weight of each modality
    episodes_diverged: int = 0  # episodes with non-finite logits (their non-finite queries count as wrong)
    accuracies: list[float] = field(default_factory=list, repr=False)  # per episode, in episode order

    def to_dict(self, with_accuracies: bool = False) -> dict:
        d = asdict(self)
        if not with_accuracies:
            d.pop("accuracies")
        return d


def confidence_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean, std and the 95% CI half-width ``1.96 * std / sqrt(n)`` (population std, as the MAML and
    Reptile evaluation code compute it)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    return mean, std, 1.96 * std / math.sqrt(n)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """``a - b`` episode by episode (two methods on the same episodes): the mean difference and its 95 % CI
    half-width. Pairing removes what the episodes share (an easy episode is easy for both), so the interval
    is far narrower than either method's own."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired difference needs equally many episodes, got {len(a)} and {len(b)}")
    mean, _, ci = confidence_interval([x - y for x, y in zip(a, b)])
    return {"mean": mean, "ci95": ci}


def episode_accuracy(logits: Tensor, labels: Tensor) -> float:
    """The share of queries right, a query with non-finite logits counting as wrong (``classification_metrics``)."""
    pred = torch.where(torch.isfinite(logits).all(1), torch.nan_to_num(logits).argmax(1), -1)
    return (pred == labels).float().mean().item()


@torch.no_grad()
def centroid_accuracies(algorithm: MetaAlgorithm, episodes: Sequence[Episode], device: str = "cpu") -> list[float]:
    """Per episode, the accuracy of the nearest class mean on the frozen features of the algorithm's model's
    modalities (``MetaAlgorithm.centroid``): the untrained baseline on exactly these episodes."""
    out = []
    for e in episodes:
        e = e.to(device)
        out.append(episode_accuracy(algorithm.centroid(e.support)(e.query), e.query.labels))
    return out


def meta_test(
    algorithm: MetaAlgorithm,
    episodes: Sequence[Episode],
    quiet: bool = True,
    desc: str = "meta-test",
    device: str = "cpu",
    observe: Callable[[Episode, TaskPrediction], None] | None = None,
) -> EvalResult:
    """Adapt on each episode's support set and score its query set; ``EPISODES_PER_CALL`` episodes at a
    time go to ``algorithm.evaluate_many`` (adapted together where that is faster). ``observe(episode,
    prediction)``, where given, sees every episode (analysis: ``engine.analysis``)."""
    start = time.perf_counter()
    accs, f1s, losses, weights, diverged, fingerprints = [], [], [], [], 0, []
    bar = tqdm(total=len(episodes), desc=desc, disable=True if quiet else None, leave=False, dynamic_ncols=True)
    stream = iter(episodes)  # drawn chunk by chunk: memory does not grow with the number of episodes
    while chunk := [e.to(device) for e in itertools.islice(stream, EPISODES_PER_CALL)]:
        fingerprints += [e.fingerprint() for e in chunk]
        for e, p in zip(chunk, algorithm.evaluate_many(chunk)):
            m = classification_metrics(p.logits, e.query.labels, e.ways)
            accs.append(m["accuracy"])
            f1s.append(m["macro_f1"])
            if m["diverged"]:
                diverged += 1
            else:
                losses.append(m["loss"])
            if p.weights is not None and bool(p.weights.isfinite().all()):
                weights.append(p.weights.mean(0).tolist())
            if observe is not None:
                observe(e, p)
        bar.update(len(chunk))
        bar.set_postfix(acc=f"{sum(accs) / len(accs):.3f}")
    bar.close()
    mean, std, ci = confidence_interval(accs)
    modalities = algorithm.model.modalities
    mw = {m: sum(w[i] for w in weights) / len(weights) for i, m in enumerate(modalities)} if weights else {}
    if diverged:
        tqdm.write(
            f"warning: {desc}: {diverged} of {len(episodes)} episodes diverged (non-finite logits); their "
            f"non-finite queries count as wrong and the loss is averaged over the other episodes"
        )
    return EvalResult(
        accuracy_mean=mean,
        accuracy_std=std,
        accuracy_ci95=ci,
        macro_f1=sum(f1s) / len(f1s),
        loss=sum(losses) / len(losses) if losses else float("nan"),
        episodes=len(episodes),
        fingerprint=fingerprint_of(fingerprints),
        seconds=time.perf_counter() - start,
        modality_weights=mw,
        episodes_diverged=diverged,
        accuracies=accs,
    )
