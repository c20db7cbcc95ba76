"""BatchNorm with batch statistics only, as few-shot networks use it (no running statistics: an inner
loop must not leak statistics into the meta-model; train and test normalise with the batch at hand)."""

from __future__ import annotations

from torch import Tensor, nn


class _BatchStatsNorm:
    # Written out as mean/var arithmetic when ``decomposed`` is set: second-order gradients through the
    # fused kernel under ``torch.func.vmap`` inside ``torch.func.grad`` come out wrong (relative error
    # 6e-3 for one MAML step in float64), the written-out form is exact. The fused kernel is faster
    # everywhere else, so only the task-batched MAML engine switches it on
    # (``execution.decomposed_batchnorm``).
    decomposed = False

    def __init__(self, num_features: int):
        super().__init__(num_features, track_running_stats=False)

    def forward(self, x: Tensor) -> Tensor:
        if not self.decomposed:
            return super().forward(x)
        dims = [0, *range(2, x.dim())]  # every dimension but the channels
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, unbiased=False, keepdim=True)
        shape = [1, -1] + [1] * (x.dim() - 2)
        return (x - mean) * (var + self.eps).rsqrt() * self.weight.view(shape) + self.bias.view(shape)


class BatchNorm1d(_BatchStatsNorm, nn.BatchNorm1d):
    pass


class BatchNorm2d(_BatchStatsNorm, nn.BatchNorm2d):
    pass
