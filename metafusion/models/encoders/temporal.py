"""Pooling a clip's per-frame features over time, ``[B, T, D] -> [B, D]``: what every video encoder ends with.

``mean`` averages the frames; ``attention`` weights them by a learned score (``softmax_t(w . h_t + b)``);
``conv`` adds a temporal convolution over neighbouring frames (kernel 3, residual) before the mean, so it
can read the order of frames. The learned ones start as the mean (zero-initialised score and residual), so
a model starts from the features and meta-training adds to them.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from ...errors import ConfigError

TEMPORAL_POOLS = ("mean", "attention", "conv")
Temporal = Literal["mean", "attention", "conv"]


class TemporalPool(nn.Module):
    def __init__(self, dim: int, kind: Temporal = "mean"):
        super().__init__()
        if kind not in TEMPORAL_POOLS:
            raise ConfigError(f"unknown temporal pooling {kind!r}; choose {', '.join(TEMPORAL_POOLS)}")
        self.kind = kind
        self.score = self.conv = None
        if kind == "attention":
            self.score = nn.Linear(dim, 1)
            nn.init.zeros_(self.score.weight)
            nn.init.zeros_(self.score.bias)
        elif kind == "conv":
            self.conv = nn.Conv1d(dim, dim, 3, padding=1)
            nn.init.zeros_(self.conv.weight)
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D) -> (B, D)
        if self.score is not None:
            weights = torch.softmax(self.score(x), dim=1)  # (B, T, 1)
            return (weights * x).sum(1)
        if self.conv is not None:
            x = x + torch.relu(self.conv(x.transpose(1, 2))).transpose(1, 2)
        return x.mean(1)
