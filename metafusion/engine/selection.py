"""After meta-training, the model a run hands over: chosen on validation among the start, the trained weights,
their interpolations and mixtures with the untrained centroid.

Meta-learning on strong frozen features can end below the features it started from. Two cheap fallbacks
make the start part of the choice: weight interpolation ``start + alpha * (trained - start)`` (WiSE-FT,
Wortsman et al. 2022; alpha = 0 is the start exactly) and a mixture of the model's class probabilities with
the nearest class mean on the frozen features (``nearest_mean.mix``; weight 1 is the centroid alone, which
needs no training at all). Every (alpha, weight) pair is scored on the fixed validation episodes; the most
accurate is kept, a tie going to the least fallback (the larger alpha, then the smaller weight). The
per-episode accuracies give each candidate's paired difference with the centroid (``paired_difference``).
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..algorithms.nearest_mean import mix
from ..data import Episode
from .checkpoint import load_checkpoint, save_checkpoint
from .evaluate import EPISODES_PER_CALL, confidence_interval, episode_accuracy, paired_difference


@dataclass
class Selection:
    """What selection chose (stored in the checkpoint it writes, read back by ``load_trained``)."""

    alpha: float = 1.0  # weights = start + alpha * (trained - start)
    centroid_weight: float = 0.0  # the centroid's share of every prediction
    accuracy: float = float("nan")  # its validation accuracy
    candidates: list[dict[str, Any]] = field(default_factory=list)  # every candidate's validation numbers
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def describe(self) -> str:
        if self.centroid_weight == 1.0:
            return "the centroid alone (no training): meta-training did not help on validation"
        if self.alpha == 0.0 and self.centroid_weight == 0.0:
            return "the start (untrained weights): meta-training did not help on validation"
        if self.alpha == 1.0:
            parts = ["the trained weights"]
        elif self.alpha == 0.0:
            parts = ["the start (untrained weights)"]
        else:
            parts = [f"weights {self.alpha:g} of the way from the start to the trained ones"]
        if self.centroid_weight:
            parts.append(f"mixed with the centroid at weight {self.centroid_weight:g}")
        return " ".join(parts)


def interpolate(start: dict[str, torch.Tensor], trained: dict[str, torch.Tensor], alpha: float) -> dict:
    """``start + alpha * (trained - start)`` for floating-point entries; others (counters) as trained."""
    return {
        k: start[k] + alpha * (v - start[k]) if v.is_floating_point() and alpha != 1.0 else v
        for k, v in trained.items()
    }


@contextmanager
def loaded(module: nn.Module, state: dict[str, torch.Tensor]):
    """``module`` with ``state`` loaded for the block, its own weights restored after."""
    own = {k: v.clone() for k, v in module.state_dict().items()}
    module.load_state_dict(state)
    try:
        yield module
    finally:
        module.load_state_dict(own)


@torch.no_grad()
def select(
    algorithm, start: dict, trained: dict, episodes: list[Episode], alphas: list[float], weights: list[float]
) -> Selection:
    """Score every (alpha, centroid weight) on ``episodes`` and return the best; ``algorithm.module`` is left
    as it was (the caller loads the chosen weights: ``interpolate(start, trained, selection.alpha)``)."""
    began = time.perf_counter()
    own_weight, algorithm.centroid_weight = algorithm.centroid_weight, 0.0
    device = next(algorithm.module.parameters(), torch.empty(0)).device  # checkpoints load on the CPU
    episodes = [e.to(device) for e in episodes]
    labels = [e.query.labels for e in episodes]
    centroid = [algorithm.centroid(e.support)(e.query) for e in episodes]
    centroid_acc = _accuracies(centroid, labels)
    candidates = []
    try:
        for alpha in sorted(set(alphas), reverse=True):
            if any(w < 1.0 for w in weights):
                with loaded(algorithm.module, interpolate(start, trained, alpha)):
                    learned = [
                        p.logits
                        for i in range(0, len(episodes), EPISODES_PER_CALL)
                        for p in algorithm.evaluate_many(episodes[i : i + EPISODES_PER_CALL])
                    ]
            for w in sorted(set(weights)):
                if w == 1.0 and any(c["centroid_weight"] == 1.0 for c in candidates):
                    continue  # the centroid alone does not depend on alpha
                logits = centroid if w == 1.0 else [mix(lg, c, w) for lg, c in zip(learned, centroid)]
                accs = _accuracies(logits, labels)
                mean, _, ci = confidence_interval(accs)
                candidates.append(
                    {
                        "alpha": alpha,
                        "centroid_weight": w,
                        "accuracy": mean,
                        "ci95": ci,
                        "vs_centroid": paired_difference(accs, centroid_acc),
                    }
                )
    finally:
        algorithm.centroid_weight = own_weight
    best = max(candidates, key=lambda c: (round(c["accuracy"], 9), c["alpha"], -c["centroid_weight"]))
    return Selection(best["alpha"], best["centroid_weight"], best["accuracy"], candidates, time.perf_counter() - began)


def _accuracies(logits: list[torch.Tensor], labels: list[torch.Tensor]) -> list[float]:
    return [episode_accuracy(lg, y) for lg, y in zip(logits, labels)]


def select_run(exp, run_dir: Path, episodes: int | None = None, quiet: bool = False) -> Selection | None:
    """Selection for a meta-trained run folder, on its first ``episodes`` validation episodes (those its
    validation used, so selection costs a few validations): between ``start.pt`` and the best trained state
    (``best.pt``, or ``last.pt`` where the best is the start), written as ``selected.pt`` (the checkpoint every
    later stage reads: ``run_checkpoint``) and ``selection.json``. ``exp.algorithm`` keeps its weights. None
    where there is nothing to choose from (no meta-parameters, a run from before ``start.pt``, or selection
    switched off: ``select.alphas=1`` with ``select.centroid_weights=0``, the trained weights alone)."""
    run_dir = Path(run_dir)
    cfg = exp.cfg.select
    if set(cfg.alphas) == {1.0} and set(cfg.centroid_weights) == {0.0}:
        return None
    if not exp.algorithm.meta_parameters or not (run_dir / "start.pt").is_file():
        return None
    start = load_checkpoint(run_dir / "start.pt")
    trained = load_checkpoint(run_dir / "best.pt")
    if trained["step"] == 0 and (run_dir / "last.pt").is_file():
        trained = load_checkpoint(run_dir / "last.pt")
    val = exp.val_episodes[:episodes]
    chosen = select(exp.algorithm, start["module"], trained["module"], val, cfg.alphas, cfg.centroid_weights)
    payload = {
        **trained,
        "module": interpolate(start["module"], trained["module"], chosen.alpha),
        "selection": chosen.to_dict(),
    }
    save_checkpoint(run_dir / "selected.pt", payload)
    (run_dir / "selection.json").write_text(json.dumps(chosen.to_dict(), indent=2) + "\n")
    if not quiet:
        print(selection_summary(chosen, trained["step"]), file=sys.stderr)
    return chosen


def selection_summary(chosen: Selection, trained_step: int) -> str:
    """One paragraph: the start, the trained state and the centroid on validation, and what was kept."""

    def cell(alpha: float, weight: float) -> str:
        c = next((c for c in chosen.candidates if c["alpha"] == alpha and c["centroid_weight"] == weight), None)
        if c is None:
            return "not a candidate"
        d = c["vs_centroid"]
        return f"{100 * c['accuracy']:.2f} % ({100 * d['mean']:+.2f} ± {100 * d['ci95']:.2f} vs centroid)"

    centroid = next((c for c in chosen.candidates if c["centroid_weight"] == 1.0), None)
    lines = [
        f"selection on {len(chosen.candidates)} candidates ({chosen.seconds:.1f} s), validation accuracy: "
        f"start {cell(0.0, 0.0)}, trained (step {trained_step}) {cell(1.0, 0.0)}"
        + (f", centroid {100 * centroid['accuracy']:.2f} %" if centroid else ""),
        f"kept: {chosen.describe} (alpha {chosen.alpha:g}, centroid weight {chosen.centroid_weight:g}): "
        f"{cell(chosen.alpha, chosen.centroid_weight)}",
    ]
    return "\n".join(lines)
