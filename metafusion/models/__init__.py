"""Models: per-modality encoders, fusion modules, heads, and the FusionModel that joins them."""

from .encoders import DEFAULT_ENCODERS, ENCODERS
from .fusion import FUSIONS, AttentionFusion, ConcatFusion, LateFusion, MeanFusion, TransformerFusion
from .model import ADAPT_SCOPES, FusionModel, build_model
from .spec import ModelSpec

__all__ = [
    "ENCODERS",
    "DEFAULT_ENCODERS",
    "FUSIONS",
    "AttentionFusion",
    "ConcatFusion",
    "MeanFusion",
    "LateFusion",
    "TransformerFusion",
    "FusionModel",
    "ModelSpec",
    "build_model",
    "ADAPT_SCOPES",
]
