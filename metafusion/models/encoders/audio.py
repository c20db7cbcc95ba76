"""Audio encoder: a fixed torchaudio log-mel front end followed by a small trainable CNN."""

from __future__ import annotations

import torch
import torchaudio
from torch import Tensor, nn

from ..execution import to_memory_format
from .base import ENCODERS, Encoder, conv_blocks


@ENCODERS.register("melcnn")
class MelCNN(Encoder):
    """waveform ``[B, 1, T]`` -> log-mel ``[B, 1, 40, frames]`` -> 3 conv blocks -> mean pool -> d.

    The log-mel front end has no trainable parameters; its filterbank is a buffer. The one-channel
    spectrogram enters the CNN in channels_last order, as in ``Conv4`` (and for the same reason).
    """

    modalities = ("audio",)
    memory_format = torch.channels_last
    n_mels = 40

    @classmethod
    def from_spec(cls, spec, modality: str, out_dim: int, hidden: int, **options) -> MelCNN:
        return cls(out_dim, hidden, tuple(spec.input_shapes[modality]), sample_rate=spec.sample_rate, **options)

    def __init__(
        self, out_dim: int, hidden: int = 64, input_shape: tuple[int, ...] = (1, 4000), sample_rate: int = 8000
    ):
        super().__init__()
        self.frontend = torchaudio.transforms.MelSpectrogram(sample_rate, n_fft=256, hop_length=80, n_mels=self.n_mels)
        self.body = conv_blocks(2, 1, hidden, depth=3, kernel=3)
        self.proj = nn.Linear(hidden, out_dim)
        self.out_dim = out_dim

    def spectrogram(self, wave: Tensor) -> Tensor:  # (B, 1, T) -> (B, 1, 40, frames)
        with torch.no_grad():
            return torch.log(self.frontend(wave) + 1e-6)

    def forward(self, wave: Tensor) -> Tensor:  # (B, 1, T) -> (B, out_dim)
        spec = to_memory_format(self.spectrogram(wave), self.memory_format)
        x = self.body(spec)  # (B, hidden, n_mels/8, frames/8)
        return self.proj(x.mean(dim=(2, 3)))
