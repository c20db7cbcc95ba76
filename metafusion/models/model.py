"""FusionModel: per-modality encoders f_i -> fusion -> head g, plus adaptation scopes."""

from __future__ import annotations

from contextlib import ExitStack
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..data.batch import Batch
from ..errors import InputError
from .encoders import default_encoder, encoder_for
from .execution import decomposed_batchnorm, memory_format
from .fusion import build_fusion
from .spec import ModelSpec

# Adaptation scope -> which parameters (by name) an inner loop adapts under it; the others are meta-learned
# by the outer loop only. ``encoders+head`` keeps the fusion fixed inside the inner loop: a transformer
# fusion's LayerNorms and MLP do not take MAML's inner rate for convolutions (docs/results.md, multimodal
# Omniglot). ``all-but-pretrained`` keeps the pretrained top blocks of encoders (``*.pretrained.*``) fixed.
ADAPT_SCOPES = {
    "all": lambda name: True,
    "head": lambda name: name.startswith("head."),
    "fusion+head": lambda name: name.startswith(("fusion.", "head.")),
    "encoders+head": lambda name: name.startswith(("encoders.", "head.")),
    "all-but-pretrained": lambda name: ".pretrained." not in name,
}


class Features(NamedTuple):
    """What ``forward_features`` returns: the fused feature ``z`` (``[B, D]``; ``[B, M, d]`` for late
    fusion), the modality mask ``[B, M]`` the head reads, and the per-sample modality weights ``[B, M]``
    (None for fusions without them, e.g. concat)."""

    z: Tensor
    mask: Tensor
    weights: Tensor | None


class FusionModel(nn.Module):
    """``logits = head(fusion({f_m(x_m)}, mask), mask)``, as a timm-like contract:
    ``forward_features(batch) -> Features``, ``forward_head(features) -> logits``, ``reset_head(ways)``,
    adaptation scopes by parameter name (``adapted``), and the execution policy for special passes
    (``differentiated_twice``, ``vmapped_over_tasks``) kept here, not in the algorithms.

    Each encoder runs only on the samples where its modality is present, so an absent modality
    (whatever its placeholder values) has exactly zero influence, including through the batch
    statistics of normalisation layers.
    """

    def __init__(self, encoders: dict[str, nn.Module], fusion: nn.Module, ways: int):
        super().__init__()
        self.modalities = tuple(encoders)
        self.encoders = nn.ModuleDict(encoders)
        self.fusion = fusion
        self.head = fusion.make_head(ways)
        self.width = next(iter(encoders.values())).out_dim

    def encode(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Per-modality features ``h [B, M, d]`` (zeros where absent) and the mask ``[B, M]``."""
        cols = []
        for m in self.modalities:
            if m not in batch.modalities:
                raise InputError(f"batch has no modality {m!r} (it has {', '.join(batch.modalities)})")
            cols.append(batch.modalities.index(m))
        mask = batch.mask[:, cols]  # (B, M)
        feats = []
        for j, m in enumerate(self.modalities):
            x, present = batch.inputs[m], mask[:, j]
            if bool(present.all()):
                feats.append(self.encoders[m](x))  # (B, d)
            elif bool(present.any()):
                rows = torch.nonzero(present).flatten()
                h = self.encoders[m](x[rows])  # (P, d)
                feats.append(h.new_zeros(x.shape[0], h.shape[1]).index_copy(0, rows, h))
            else:
                feats.append(x.new_zeros(x.shape[0], self.width, dtype=torch.get_default_dtype()))
        return torch.stack(feats, dim=1), mask  # (B, M, d), (B, M)

    def forward_features(self, batch: Batch) -> Features:
        h, mask = self.encode(batch)
        z, weights = self.fusion(h, mask)
        return Features(z, mask, weights)

    def forward_head(self, features: Features) -> Tensor:  # -> (B, ways)
        return self.head(features.z, features.mask)

    def forward(self, batch: Batch) -> Tensor:  # -> (B, ways)
        return self.forward_head(self.forward_features(batch))

    def features(self, batch: Batch) -> Tensor:
        """The fused feature z alone (an embedding for prototypes)."""
        return self.forward_features(batch).z

    @property
    def has_auxiliary_loss(self) -> bool:
        """Whether the fusion trains a part of itself on a loss of its own (it overrides ``auxiliary_loss``)."""
        return self.fusion.has_auxiliary_loss

    def auxiliary_loss(self, batch: Batch) -> Tensor | None:
        """The fusion's own loss on ``batch`` (e.g. matched attention's contrastive loss); None for most."""
        return self.fusion.auxiliary_loss(*self.encode(batch)) if self.has_auxiliary_loss else None

    @torch.no_grad()
    def modality_weights(self, batch: Batch) -> Tensor | None:
        """Per-sample modality weights ``[B, M]`` (None for fusions without them, e.g. concat)."""
        return self.forward_features(batch).weights

    def new_head(self, ways: int) -> nn.Module:
        """A fresh, randomly initialised head for ``ways`` classes, on the model's device and in its dtype."""
        like = next(self.parameters())
        return self.fusion.make_head(ways).to(like.device, like.dtype)

    def reset_head(self, ways: int) -> None:
        """Replace the model's head by ``new_head(ways)``."""
        self.head = self.new_head(ways)

    def adapted(self, scope: str) -> set[str]:
        """The names of the parameters an inner loop adapts under ``scope``."""
        if scope not in ADAPT_SCOPES:
            raise InputError(f"unknown adaptation scope {scope!r}; choose one of: {', '.join(ADAPT_SCOPES)}")
        return {n for n, p in self.named_parameters() if p.requires_grad and ADAPT_SCOPES[scope](n)}

    # -- execution policy: how the model runs special passes (the values are the same either way) --------
    def differentiated_twice(self) -> ExitStack:
        """For forward passes whose graph is differentiated twice (MAML's support passes): 2-D CNNs in
        NCHW, where BatchNorm's double backward is faster than in channels_last (docs/performance.md)."""
        stack = ExitStack()
        stack.enter_context(memory_format(self, torch.contiguous_format))
        return stack

    def vmapped_over_tasks(self) -> ExitStack:
        """For forward passes vmapped over tasks: NCHW, and BatchNorm written out as mean/var arithmetic
        (whose batching rules keep per-task statistics; batchnorm.py)."""
        stack = self.differentiated_twice()
        stack.enter_context(decomposed_batchnorm(self))
        return stack


def build_model(
    spec: ModelSpec,
    ways: int,
    width: int = 64,
    hidden: int = 64,
    fusion: str = "mean",  # the config's default (config.ModelConfig.fusion)
    encoders: dict[str, str] | None = None,
    fusion_options: dict | None = None,
    encoder_options: dict[str, dict] | None = None,
) -> FusionModel:
    """Build a FusionModel for the modalities in ``spec``: the encoder per modality from ``encoders``
    (else the modality's default) with its options from ``encoder_options[modality]``, and the fusion
    ``fusion`` with ``fusion_options``."""
    chosen, options = dict(encoders or {}), dict(encoder_options or {})
    unknown = [m for m in [*chosen, *options] if m not in spec.input_shapes]
    if unknown:
        raise InputError(
            f"an encoder is configured for modality {', '.join(map(repr, sorted(set(unknown))))}, which the data "
            f"does not provide ({', '.join(spec.input_shapes)})"
        )
    modules = {}
    for m in spec.input_shapes:
        encoder = encoder_for(m, chosen.get(m) or default_encoder(m))
        modules[m] = encoder.from_spec(spec, m, width, hidden, **options.get(m, {}))
    return FusionModel(modules, build_fusion(fusion, len(modules), width, **(fusion_options or {})), ways)
