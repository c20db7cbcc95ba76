"""Image encoders: the few-shot Conv4 (Vinyals et al. 2016; Finn et al. 2017) and torchvision ResNet-18."""

from __future__ import annotations

import torch
import torchvision
from torch import Tensor, nn

from ..batchnorm import BatchNorm2d
from ..execution import to_memory_format
from .base import ENCODERS, Encoder, conv_blocks


def _project(in_dim: int, out_dim: int) -> nn.Module:
    # Encoders whose natural width already equals the fusion width add no parameters.
    return nn.Identity() if in_dim == out_dim else nn.Linear(in_dim, out_dim)


@ENCODERS.register("conv4")
class Conv4(Encoder):
    """4 x [conv 3x3 (hidden), BatchNorm (batch statistics), ReLU, maxpool 2], flattened, projected.

    On 1x28x28 inputs the flattened feature is ``hidden`` wide (28 -> 14 -> 7 -> 3 -> 1), so with
    ``out_dim == hidden`` this is exactly MAML's Omniglot network minus its linear head.

    The input is moved to channels_last (NHWC) memory order first and every layer keeps that order.
    Values and gradients are unchanged, but oneDNN's convolution, BatchNorm and max-pool kernels for a
    one-channel input are several times faster in it (docs/performance.md).
    """

    modalities = ("image",)
    stride = 1
    memory_format = torch.channels_last  # benchmarks/throughput.py's reference loop sets contiguous_format

    def __init__(self, out_dim: int, hidden: int = 64, input_shape: tuple[int, ...] = (1, 28, 28)):
        super().__init__()
        self.body = conv_blocks(2, input_shape[0], hidden, depth=4, kernel=3, stride=self.stride)
        h, w = input_shape[1], input_shape[2]
        for _ in range(4):  # maxpool 2 floors; a stride-2 'same' convolution rounds up
            h, w = (h // 2, w // 2) if self.stride == 1 else ((h + 1) // 2, (w + 1) // 2)
        flat = hidden * max(h, 1) * max(w, 1)
        self.proj = _project(flat, out_dim)
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, out_dim)
        return self.proj(self.body(to_memory_format(x, self.memory_format)).flatten(1))


@ENCODERS.register("conv4s")
class Conv4Strided(Conv4):
    """4 x [conv 3x3 stride 2 (hidden), BatchNorm (batch statistics), ReLU], flattened, projected: the
    Omniglot network the MAML and Reptile reference code actually run (strided convolutions instead of
    max-pooling; 28 -> 14 -> 7 -> 4 -> 2, so 4 x hidden features), at a quarter of Conv4's FLOPs.
    ``--set model.width=256`` (= 4 x 64) makes it exactly that network plus the linear head."""

    stride = 2


@ENCODERS.register("resnet18")
class ResNet18(Encoder):
    """torchvision ResNet-18 (randomly initialised), projected.

    BatchNorm uses batch statistics (no running stats) so inner-loop adaptation cannot leak
    statistics into the meta-model. Grey images are fed to a 1-channel first convolution.
    """

    modalities = ("image",)

    def __init__(
        self,
        out_dim: int,
        hidden: int = 64,
        input_shape: tuple[int, ...] = (1, 28, 28),
    ):
        super().__init__()
        net = torchvision.models.resnet18(weights=None, norm_layer=BatchNorm2d)
        if input_shape[0] != 3:
            net.conv1 = nn.Conv2d(input_shape[0], 64, kernel_size=7, stride=2, padding=3, bias=False)
        net.fc = nn.Identity()
        self.net = net
        self.proj = _project(512, out_dim)
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, out_dim)
        return self.proj(self.net(x))
