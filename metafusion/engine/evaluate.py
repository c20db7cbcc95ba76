"""Meta-test: adapt on each fixed episode's support set, score its query set, summarise with a 95% CI."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from tqdm import tqdm

from ..algorithms import MetaAlgorithm
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
    episodes_diverged: int = 0  # episodes with non-finite logits (their non-finite queries count as wrong)
    accuracies: list[float] = field(default_factory=list, repr=False)

    def to_dict(self, with_accuracies: bool = False) -> dict:
        d = asdict(self)
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


def meta_test(
    algorithm: MetaAlgorithm,
    episodes: Sequence[Episode],
    quiet: bool = True,
    desc: str = "meta-test",
    device: str = "cpu",
) -> EvalResult:
    """Adapt on each episode's support set and score its query set; ``EPISODES_PER_CALL`` episodes at a
    time go to ``algorithm.evaluate_many`` (adapted together where that is faster)."""
    start = time.perf_counter()
    accs, f1s, losses, weights, diverged, fingerprints = [], [], [], [], 0, []
    bar = tqdm(total=len(episodes), desc=desc, disable=True if quiet else None, leave=False, dynamic_ncols=True)
    stream = iter(episodes)  # drawn chunk by chunk: memory does not grow with the number of episodes
    while chunk := [e.to(device) for e in itertools.islice(stream, EPISODES_PER_CALL)]:
        fingerprints += [e.fingerprint() for e in chunk]
        for m in algorithm.evaluate_many(chunk):
            accs.append(m["accuracy"])
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
        diverged,
        accs,
    )
