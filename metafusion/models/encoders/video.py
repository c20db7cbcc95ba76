"""A small from-scratch video encoder: (2+1)D convolutions (Tran et al. 2018) on ``[B, T, C, H, W]`` clips.

Each block factorises a 3-D convolution into a spatial one (1x3x3, stride 2 in space: the strided
Omniglot network of ``conv4s``, frame by frame) and a temporal one (3x1x1 over neighbouring frames), each
followed by BatchNorm with batch statistics and ReLU. After ``depth`` blocks the spatial positions are
flattened and the frames pooled (``temporal``: mean, attention or a further temporal convolution;
``temporal.TemporalPool``), then projected to the fusion width.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ...errors import ConfigError
from ..batchnorm import BatchNorm3d
from .base import ENCODERS, Encoder
from .temporal import Temporal, TemporalPool


@dataclass
class R2Plus1DOptions:
    depth: int = 4  # (2+1)D blocks; each halves the frame size
    channels: int = 32  # per block (not model.hidden: 3-D convolutions at 64 cost 4.6x as much on a CPU)
    temporal: Temporal = "mean"  # how the frames' features are pooled

    def __post_init__(self) -> None:
        if not 1 <= self.depth <= 6 or self.channels < 1:
            raise ConfigError(f"r2plus1d takes depth in [1, 6] and channels >= 1 (got {self.depth}, {self.channels})")


@ENCODERS.register("r2plus1d")
class R2Plus1D(Encoder):
    """``depth`` x [conv 1x3x3 stride (1,2,2), BN, ReLU, conv 3x1x1, BN, ReLU] (``channels`` wide) -> pooled
    over time -> d. ``hidden`` (the model's) is unused: the block width is ``channels``."""

    modalities = ("video",)
    Options = R2Plus1DOptions

    def __init__(
        self,
        out_dim: int,
        hidden: int = 64,
        input_shape: tuple[int, ...] = (8, 1, 28, 28),
        depth: int = 4,
        channels: int = 32,
        temporal: Temporal = "mean",
    ):
        super().__init__()
        _, c, h, w = input_shape
        layers = []
        for _ in range(depth):
            layers += [
                nn.Conv3d(c, channels, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
                BatchNorm3d(channels),
                nn.ReLU(),
                nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0)),
                BatchNorm3d(channels),
                nn.ReLU(),
            ]
            c, h, w = channels, (h + 1) // 2, (w + 1) // 2
        self.body = nn.Sequential(*layers)
        self.pool = TemporalPool(c * h * w, temporal)
        self.proj = nn.Linear(c * h * w, out_dim)
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:  # (B, T, C, H, W) -> (B, out_dim)
        z = self.body(x.transpose(1, 2))  # (B, channels, T, h, w)
        return self.proj(self.pool(z.transpose(1, 2).flatten(2)))  # frames' (channels * h * w) features pooled
