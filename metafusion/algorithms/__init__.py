"""Meta-learning algorithms behind one contract (see ``base.MetaAlgorithm``)."""

from .base import ALGORITHMS, MetaAlgorithm, classification_metrics
from .centroid import Centroid
from .finetune import FineTuneBaseline
from .maml import ANIL, FOMAML, MAML, MetaSGD
from .protonet import ProtoNet
from .reptile import Reptile

__all__ = [
    "ALGORITHMS",
    "MetaAlgorithm",
    "MAML",
    "FOMAML",
    "ANIL",
    "MetaSGD",
    "Reptile",
    "ProtoNet",
    "Centroid",
    "FineTuneBaseline",
    "classification_metrics",
]
