"""Test-time fine-tuning on a task's support set, the way P>M>F does it (Hu et al., CVPR 2022).

Before a task's learner is built, the model's trainable weights are fine-tuned on the support set alone with
a prototype loss (class means of the support features; the support's augmented copies as queries), for each
learning rate of a grid that includes 0. Each rate is scored on pseudo-queries the fine-tuning did not see:
one held-out support sample per class where there are two shots or more, else freshly augmented copies of
the support. A rate other than 0 is kept only when it scores strictly better than the meta-learned weights
as they are, so tuning never replaces them on a tie. Augmentation is in feature space (Gaussian noise on the
model's float inputs, which are frozen features where the encoder is pretrained, and feature dropout), as
cheap as a forward pass.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import TuneConfig
from ..data.batch import Batch
from .nearest_mean import COSINE_SCALE, proto_logits, prototypes


class SupportTuning:
    """Fine-tunes a copy of an algorithm's model on one support set (options: ``config.TuneConfig``)."""

    def __init__(self, options: TuneConfig):
        self.options = options
        self.chosen: dict[float, int] = {}  # rate -> how many support sets chose it (reported by meta-test)

    def tuned(self, algorithm, support: Batch):
        """A copy of ``algorithm`` whose model is fine-tuned on ``support`` at the best-scoring rate (the copy
        untouched where 0 wins; ``algorithm`` itself where there is nothing to tune), plus the chosen rate."""
        o = self.options
        if not any(o.lrs) or not any(p.requires_grad for p in algorithm.module.parameters()):
            self.chosen[0.0] = self.chosen.get(0.0, 0) + 1
            return algorithm, 0.0
        gen = torch.Generator().manual_seed(o.seed)
        twin = copy.deepcopy(algorithm)
        twin.tuning = None
        params = [p for p in twin.module.parameters() if p.requires_grad]
        fit, score_support, score_query = self._splits(support, gen)
        start = [p.detach().clone() for p in params]
        best_lr, best = 0.0, _score(twin, score_support, score_query)
        for lr in sorted(set(o.lrs) - {0.0}):
            self._fit(twin, params, fit, lr, gen)
            score = _score(twin, score_support, score_query)
            if score > best:
                best_lr, best = lr, score
            _restore(params, start)
        if best_lr:
            self._fit(twin, params, support, best_lr, gen)
        self.chosen[best_lr] = self.chosen.get(best_lr, 0) + 1
        return twin, best_lr

    def _splits(self, support: Batch, gen: torch.Generator) -> tuple[Batch, Batch, Batch]:
        """(what the rates fine-tune on, the pseudo-support and pseudo-queries that score them)."""
        labels = support.labels
        last = {int(c): int(torch.nonzero(labels == c).flatten()[-1]) for c in labels.unique()}
        if all(int((labels == c).sum()) >= 2 for c in last):  # one held-out sample per class
            held = torch.zeros(len(labels), dtype=torch.bool)
            held[list(last.values())] = True
            rest = support.index(torch.nonzero(~held).flatten())
            return rest, rest, support.index(torch.nonzero(held).flatten())
        return support, support, self.augment(support, gen)

    def augment(self, batch: Batch, gen: torch.Generator) -> Batch:
        """Noisy copies of ``batch``: Gaussian noise and dropout on float inputs (token ids kept)."""
        inputs = {}
        for m, x in batch.inputs.items():
            if x.is_floating_point():
                noise = torch.randn(x.shape, generator=gen).to(x) * self.options.noise
                keep = (torch.rand(x.shape, generator=gen) >= self.options.dropout).to(x)
                x = (x + noise) * keep
            inputs[m] = x
        return Batch(inputs, batch.mask, batch.labels, batch.modalities)

    def _fit(self, algorithm, params: list, support: Batch, lr: float, gen: torch.Generator) -> None:
        """``steps`` Adam steps of the prototype loss: support class means, augmented support as queries."""
        opt = torch.optim.Adam(params, lr=lr)
        ways = int(support.labels.max()) + 1
        model = algorithm.model
        for _ in range(self.options.steps):
            query = self.augment(support, gen)
            protos = prototypes(model.features(support), support.labels, ways)  # (ways, d)
            loss = F.cross_entropy(
                proto_logits(model.features(query), protos, torch.tensor(COSINE_SCALE)), query.labels
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def _score(algorithm, support: Batch, query: Batch) -> float:
    """Accuracy of the algorithm's learner adapted on ``support`` over ``query``."""
    learner = algorithm.task_learner(support)
    with torch.no_grad():
        logits: Tensor = learner(query)
    return (logits.argmax(1) == query.labels).float().mean().item()


def _restore(params: list, values: list[Tensor]) -> None:
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
