"""Pretrained encoders: a frozen lower part run once per sample, a trainable top the model holds.

A ``PretrainedEncoder`` splits a pretrained network in two. Its ``frozen_part(...)`` (the network up to
where meta-training stops reaching) turns a modality's raw data into features or activations when the
data is prepared; ``engine.features`` runs it once per sample, with a progress bar, and caches the
result on disk, so an episode never runs it again. The encoder module itself holds only what
meta-training updates: optionally the network's top block(s) (``pretrained``, loaded with the shipped
weights; the joint optimisation of feature extractor and meta-learner) and always a projection to the
fusion width that starts where the pretrained features are (``FeatureProjection``).
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import Encoder


class FrozenPart:
    """The frozen lower part of a pretrained encoder, as ``engine.features`` runs it.

    ``name`` names the network, its settings and where it stops (it keys the disk cache); ``reads`` is
    what it takes: ``"data"`` (the modality's tensor rows, ``[b, ...]``) or ``"texts"`` (the samples'
    strings); ``standardize`` says whether its output is a feature vector the pipeline may standardise
    (False for activations a pretrained top block reads, which expects them as they are).
    """

    name: str
    reads = "data"
    batch_size = 32
    standardize = True

    def prepare(self, source) -> None:
        """Called once with every sample before the chunks (e.g. to pad all chunks to one length)."""

    def __call__(self, chunk) -> Tensor:  # a chunk of samples -> [b, ...]
        raise NotImplementedError


class PretrainedEncoder(Encoder):
    """An encoder whose lower part is frozen and computed once per sample (``frozen_part``)."""

    @classmethod
    def frozen_part(cls, metadata: dict, **options) -> FrozenPart:
        """The frozen part for a dataset (``metadata``: its facts, e.g. the sample rate) and the encoder's
        options (its ``Options`` fields)."""
        raise NotImplementedError


class FrozenFeatures(PretrainedEncoder):
    """A pretrained network frozen whole: its feature vector ``[B, features]`` -> ``FeatureProjection`` -> d.
    A subclass names ``features`` and its ``frozen_part``."""

    features: int

    def __init__(self, out_dim: int, hidden: int = 64, input_shape: tuple[int, ...] | None = None):
        super().__init__()
        self.proj = FeatureProjection(self.features, out_dim, hidden)
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:  # (B, features) -> (B, out_dim)
        return self.proj(x)


class FeatureProjection(nn.Module):
    """Frozen features ``[B, F]`` -> ``[B, d]``, starting where the features are.

    ``h = y + MLP(y)`` with the MLP's last layer zero, where ``y = x`` when ``d == F`` (the projection
    starts as the identity) and ``y = P x`` otherwise, ``P`` with orthonormal rows (a random rotation
    restricted to ``d`` dimensions: norms and distances approximately kept, Johnson-Lindenstrauss). So
    meta-learning starts from what the pretrained encoder knows and adds to it, instead of from a random
    projection that first has to rediscover it."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int):
        super().__init__()
        self.rotate = None
        if in_dim != out_dim:
            self.rotate = nn.Linear(in_dim, out_dim, bias=False)
            nn.init.orthogonal_(self.rotate.weight)  # (d, F) with orthonormal rows (d < F) or columns
        self.mlp = nn.Sequential(nn.Linear(out_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: Tensor) -> Tensor:  # (B, F) -> (B, d)
        y = x if self.rotate is None else self.rotate(x)
        return y + self.mlp(y)


class PretrainedTop(nn.Module):
    """Base of a pretrained network's trainable top: its BatchNorms stay in eval mode whatever
    ``train()`` says. A pretrained block normalises with the statistics it was trained with (few-shot
    batches are too small to re-estimate them, and an inner loop must not move them); the affine
    weights stay trainable."""

    def train(self, mode: bool = True) -> PretrainedTop:
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self


def content_key(*tensors_or_texts) -> str:
    """A short hash of the inputs' contents (tensors' bytes, read in place; lists of strings), for the
    feature cache."""
    import hashlib

    h = hashlib.sha1()
    for x in tensors_or_texts:
        if isinstance(x, Tensor):
            h.update(str((tuple(x.shape), x.dtype)).encode())
            h.update(x.contiguous().numpy().reshape(-1).view("uint8"))  # no copy of a contiguous tensor
        else:
            h.update("\x00".join(x).encode())
    return h.hexdigest()[:16]
