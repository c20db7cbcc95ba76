"""Data: multimodal datasets held as tensors, explicit Batch/Episode types, episodic samplers."""

from . import clinc150, fashion, fsdd, manifest, omniglot, synthetic  # noqa: F401  (each registers its dataset)
from .batch import Batch, Episode
from .dataset import DataError, MultimodalDataset, split_classes
from .episodes import EpisodeSampler, drop_modalities, episodes_fingerprint, fixed_episodes
from .preprocess import Standardizer
from .sources import DATASETS
from .synthetic import make_synthetic

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
