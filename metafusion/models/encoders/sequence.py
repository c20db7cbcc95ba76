"""Sequence encoders for pen strokes and sensor series ``[B, T, C]``: 1-D CNN or GRU."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import ENCODERS, Encoder, conv_blocks


@ENCODERS.register("conv1d")
class Conv1dEncoder(Encoder):
    """3 x [conv1d k5 (hidden), BatchNorm (batch statistics), ReLU, maxpool 2] -> mean over time -> d."""

    modalities = ("strokes", "sequence")

    def __init__(self, out_dim: int, hidden: int = 64, input_shape: tuple[int, ...] = (64, 3)):
        super().__init__()
        self.body = conv_blocks(1, input_shape[-1], hidden, depth=3, kernel=5)
        self.proj = nn.Linear(hidden, out_dim)
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:  # (B, T, C) -> (B, out_dim)
        return self.proj(self.body(x.transpose(1, 2)).mean(dim=2))


@ENCODERS.register("gru")
class GRUEncoder(Encoder):
    """A GRU unrolled with ``nn.GRUCell`` -> last hidden state -> d.

    ``nn.GRU`` keeps its weights in a cuDNN "flat buffer" that learn2learn's ``clone_module`` /
    ``update_module`` do not re-point, so adapted weights would be silently ignored. ``GRUCell``
    reads its parameters on every call, which makes cloning and second-order gradients exact.
    """

    modalities = ("strokes", "sequence")

    def __init__(self, out_dim: int, hidden: int = 64, input_shape: tuple[int, ...] = (64, 3)):
        super().__init__()
        self.cell = nn.GRUCell(input_shape[-1], hidden)
        self.proj = nn.Linear(hidden, out_dim)
        self.hidden = hidden
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:  # (B, T, C) -> (B, out_dim)
        h = torch.zeros(x.shape[0], self.hidden, dtype=x.dtype, device=x.device)
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
        return self.proj(h)
