"""The encoder contract and registry: each encoder f_i maps its modality batch ``[B, ...]`` to ``[B, out_dim]``.

Adding an encoder: an ``Encoder`` subclass in a file of its own, decorated with
``@ENCODERS.register("name")``, taking ``(out_dim, hidden, input_shape, **options)`` and setting
``out_dim``; its own hyperparameters are an ``Options`` dataclass (``model.<modality>.<key>`` in a
config). One that needs more of the model spec (a vocabulary size, a sample rate) overrides
``from_spec``. No encoder keeps normalisation running statistics: MAML-style inner loops use batch
statistics at train and test (see docs/architecture.md).
"""

from __future__ import annotations

from torch import nn

from ...config import NoOptions
from ...errors import InputError
from ...registry import Registry
from ..batchnorm import BatchNorm1d, BatchNorm2d
from ..spec import ModelSpec

ENCODERS: Registry = Registry("encoder")


class Encoder(nn.Module):
    """``f_i``: a modality's batch ``[B, ...]`` -> features ``[B, out_dim]``."""

    out_dim: int
    # The modalities whose data this encoder reads (None: any array, e.g. an MLP on a feature vector);
    # build_model refuses it for another, where it would run on the wrong kind of data.
    modalities: tuple[str, ...] | None = None

    Options: type = NoOptions  # its own model.<modality>.* keys (a dataclass; fields are __init__ keywords)

    @classmethod
    def from_spec(cls, spec: ModelSpec, modality: str, out_dim: int, hidden: int, **options) -> Encoder:
        """The encoder of ``modality`` in a model built for ``spec`` (what ``build_model`` calls)."""
        return cls(out_dim, hidden, tuple(spec.input_shapes[modality]), **options)


def conv_blocks(dims: int, in_channels: int, hidden: int, depth: int, kernel: int, stride: int = 1):
    """``depth`` x [conv (``hidden`` channels, same padding), BatchNorm with batch statistics only,
    ReLU, maxpool 2] in 1-D or 2-D: the few-shot building block shared by the convolutional encoders.

    The layers run as conv, BatchNorm, maxpool, ReLU: ReLU is monotonic, so ``relu(maxpool(x))`` equals
    ``maxpool(relu(x))`` exactly, values and (sub)gradients alike (the pool picks the same position;
    a non-positive maximum gets zero gradient either way), and ReLU then touches 4x fewer elements
    (docs/performance.md).

    ``stride=2`` downsamples with the convolution itself and drops the max-pool: the Omniglot network
    of the MAML and Reptile reference code (4x fewer convolution FLOPs, no pooling)."""
    conv, norm, pool = {1: (nn.Conv1d, BatchNorm1d, nn.MaxPool1d), 2: (nn.Conv2d, BatchNorm2d, nn.MaxPool2d)}[dims]
    layers, channels = [], in_channels
    for _ in range(depth):
        layers += [
            conv(channels, hidden, kernel, stride=stride, padding=kernel // 2),
            norm(hidden),
            *([pool(2)] if stride == 1 else []),
            nn.ReLU(),
        ]
        channels = hidden
    return nn.Sequential(*layers)


# The encoder each modality gets unless the config names another.
DEFAULT_ENCODERS = {
    "image": "conv4",
    "video": "r2plus1d",
    "audio": "melcnn",
    "text": "tokens",
    "strokes": "conv1d",
    "sequence": "conv1d",
    "tabular": "mlp",
}


def encoder_for(modality: str, name: str) -> type[Encoder]:
    """The encoder class ``name``, checked to read ``modality``'s kind of data."""
    encoder = ENCODERS.get(name)
    if encoder.modalities is not None and modality not in encoder.modalities:
        fits = [
            n for n in ENCODERS.names() if ENCODERS.get(n).modalities is None or modality in ENCODERS.get(n).modalities
        ]
        raise InputError(
            f"--encoder {modality}={name}: encoder {name!r} reads {' or '.join(encoder.modalities)}, not "
            f"{modality}; encoders for {modality}: {', '.join(fits)}"
        )
    return encoder


def default_encoder(modality: str) -> str:
    if modality not in DEFAULT_ENCODERS:
        raise InputError(
            f"no default encoder for modality {modality!r}; name one with "
            f"--encoder {modality}=NAME (encoders: {', '.join(ENCODERS.names())})"
        )
    return DEFAULT_ENCODERS[modality]
