"""Tabular encoder: a two-layer MLP."""

from __future__ import annotations

from torch import Tensor, nn

from .base import ENCODERS, Encoder


@ENCODERS.register("mlp")
class MLP(Encoder):
    """``[B, F]`` -> Linear(hidden) -> ReLU -> Linear(out_dim)."""

    def __init__(self, out_dim: int, hidden: int = 64, input_shape: tuple[int, ...] = (16,)):
        super().__init__()
        in_dim = 1
        for size in input_shape:
            in_dim *= size
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:  # (B, F) -> (B, out_dim)
        return self.net(x.flatten(1))
