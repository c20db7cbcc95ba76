"""BatchNorm with batch statistics only, as few-shot networks use it (no running statistics: an inner
loop must not leak statistics into the meta-model; train and test normalise with the batch at hand)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BatchStatsNorm:
    # Written out as mean/var arithmetic when ``decomposed`` is set: second-order gradients through the
    # fused kernel under ``torch.func.vmap`` inside ``torch.func.grad`` come out wrong (relative error
    # 6e-3 for one MAML step in float64), the written-out form is exact. The fused kernel is faster
    # everywhere else, so only the task-batched MAML engine switches it on
    # (``execution.decomposed_batchnorm``).
    decomposed = False
    # ``execution.support_statistics``: "record" the statistics of the batch at hand (the support set),
    # "use" them for every later batch (so no query sample informs another); None: batch statistics.
    statistics_mode: str | None = None
    recorded: tuple[Tensor, Tensor] | None = None

    def __init__(self, num_features: int):
        super().__init__(num_features, track_running_stats=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.statistics_mode == "record":
            dims = [0, *range(2, x.dim())]
            self.recorded = (x.mean(dims).detach(), x.var(dims, unbiased=False).detach())
        elif self.statistics_mode == "use":
            if self.recorded is None:  # the support set never reached this layer (it lacks the modality):
                return self._per_sample(x)  # each sample normalised alone, still independent of the batch
            mean, var = self.recorded
            return F.batch_norm(x, mean, var, self.weight, self.bias, training=False, eps=self.eps)
        if not self.decomposed:
            return super().forward(x)
        dims = [0, *range(2, x.dim())]  # every dimension but the channels
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, unbiased=False, keepdim=True)
        shape = [1, -1] + [1] * (x.dim() - 2)
        return (x - mean) * (var + self.eps).rsqrt() * self.weight.view(shape) + self.bias.view(shape)

    def _per_sample(self, x: Tensor) -> Tensor:
        dims = list(range(2, x.dim()))  # a sample's own positions; none for [B, C] (its output is the bias)
        shape = [1, -1] + [1] * (x.dim() - 2)
        mean = x.mean(dims, keepdim=True) if dims else x
        var = x.var(dims, unbiased=False, keepdim=True) if dims else torch.zeros_like(x)
        return (x - mean) * (var + self.eps).rsqrt() * self.weight.view(shape) + self.bias.view(shape)


class BatchNorm1d(BatchStatsNorm, nn.BatchNorm1d):
    pass


class BatchNorm2d(BatchStatsNorm, nn.BatchNorm2d):
    pass


class BatchNorm3d(BatchStatsNorm, nn.BatchNorm3d):
    pass
