"""Per-modality encoders f_i (see ``base`` for the contract); importing this package registers them."""

from . import audio, efficientnet, image, multilingual, sequence, speech, tabular, text, video  # noqa: F401  (registers the encoders)
from .base import DEFAULT_ENCODERS, ENCODERS, Encoder, conv_blocks, default_encoder, encoder_for

__all__ = ["ENCODERS", "DEFAULT_ENCODERS", "Encoder", "default_encoder", "encoder_for", "conv_blocks"]
