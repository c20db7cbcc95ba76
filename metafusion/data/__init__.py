"""Data: multimodal datasets held as tensors, explicit Batch/Episode types, episodic samplers."""

from ..registry import Registry

DATASETS: Registry = Registry("dataset")

from . import sources  # noqa: E402,F401  (registers the datasets with DATASETS)
from .batch import Batch, Episode  # noqa: E402
from .dataset import DataError, MultimodalDataset, split_classes  # noqa: E402
from .episodes import EpisodeSampler, drop_modalities, episodes_fingerprint, fixed_episodes  # noqa: E402
from .preprocess import Standardizer  # noqa: E402
from .synthetic import make_synthetic  # noqa: E402

__all__ = [
    "DATASETS",
    "Batch",
    "Episode",
    "DataError",
    "MultimodalDataset",
    "split_classes",
    "EpisodeSampler",
    "drop_modalities",
    "episodes_fingerprint",
    "fixed_episodes",
    "Standardizer",
    "make_synthetic",
]
