"""Fusion modules: combine per-modality features ``h [B, M, d]`` under a presence mask ``[B, M]``.

Each fusion returns ``(z, weights)``: the fused feature(s) its head consumes and the per-modality
weights ``[B, M]`` where they mean something (``None`` otherwise). Absent modalities have exactly
zero influence on a sample's output in every fusion: their features are zeroed, masked out of every
softmax and average, and never attended to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import NoOptions
from ..errors import InputError
from ..registry import Registry

FUSIONS: Registry = Registry("fusion")


def _zero_absent(h: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask.unsqueeze(-1), h, torch.zeros((), dtype=h.dtype))  # (B, M, d)


def masked_softmax(scores: Tensor, mask: Tensor, dim: int) -> Tensor:
    """Softmax over ``dim`` where masked-out entries get exactly zero weight. A slice with nothing
    present (a sample carrying none of the model's modalities) gets all-zero weights, not NaN."""
    anything = mask.any(dim, keepdim=True)
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")).masked_fill(~anything, 0.0), dim=dim)
    return torch.where(mask, weights, torch.zeros((), dtype=weights.dtype))


class LinearHead(nn.Module):
    """g: fused feature ``[B, D]`` -> logits ``[B, ways]``."""

    def __init__(self, in_dim: int, ways: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, ways)

    def forward(self, z: Tensor, mask: Tensor) -> Tensor:
        return self.linear(z)


class LateHead(nn.Module):
    """Decision fusion: one linear head per modality, logits averaged over present modalities."""

    def __init__(self, num_modalities: int, dim: int, ways: int):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(dim, ways) for _ in range(num_modalities))

    def forward(self, z: Tensor, mask: Tensor) -> Tensor:  # z: (B, M, d)
        logits = torch.stack([head(z[:, i]) for i, head in enumerate(self.heads)], dim=1)  # (B, M, ways)
        w = mask.to(logits.dtype).unsqueeze(-1)  # (B, M, 1)
        return (logits * w).sum(1) / w.sum(1).clamp_min(1.0)


class Fusion(nn.Module):
    """Base class: ``forward(h, mask) -> (z, weights)``, ``out_dim``, ``make_head(ways)``. Constructed as
    ``(num_modalities, dim, **options)``, its options an ``Options`` dataclass (``model.<key>``)."""

    Options: type = NoOptions
    out_dim: int
    weighted = True  # False: ``weights`` is always None
    has_auxiliary_loss = False  # True: ``auxiliary_loss`` returns a loss meta-training adds

    def make_head(self, ways: int) -> nn.Module:
        return LinearHead(self.out_dim, ways)

    def auxiliary_loss(self, h: Tensor, mask: Tensor) -> Tensor | None:
        """A loss of the fusion's own, added to the meta-loss during meta-training (None: none)."""
        return None


@dataclass
class AttentionOptions:
    # vector: element-wise weights (W_a is d x d, as in the formula); scalar: one weight per modality (1 x d)
    attention: Literal["vector", "scalar"] = "vector"


@FUSIONS.register("attention")
class AttentionFusion(Fusion):
    """The seed method: ``a_i = softmax_i(W_a h_i + b_a)``, ``z = sum_i a_i * h_i``.

    The softmax runs over the modalities present in each sample (dim 1), never over the batch.
    """

    Options = AttentionOptions

    def __init__(self, num_modalities: int, dim: int, attention: str = "vector"):
        super().__init__()
        self.score = nn.Linear(dim, dim if attention == "vector" else 1)
        self.vector = attention == "vector"
        self.out_dim = dim

    def attention(self, h: Tensor, mask: Tensor) -> Tensor:
        """``a [B, M, d or 1]``: softmax over present modalities of ``W_a h_i + b_a``."""
        return masked_softmax(self.score(h), mask.unsqueeze(-1), dim=1)

    def forward(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        a = self.attention(h, mask)  # (B, M, d) or (B, M, 1)
        z = (a * _zero_absent(h, mask)).sum(dim=1)  # (B, d)
        return z, a.mean(dim=-1)  # weights (B, M): mean over feature dims sums to 1 over modalities


@FUSIONS.register("concat")
class ConcatFusion(Fusion):
    """Feature fusion: concatenate all modality features (zeros where absent)."""

    weighted = False

    def __init__(self, num_modalities: int, dim: int):
        super().__init__()
        self.out_dim = num_modalities * dim

    def forward(self, h: Tensor, mask: Tensor) -> tuple[Tensor, None]:
        return _zero_absent(h, mask).flatten(1), None  # (B, M*d)


@FUSIONS.register("mean")
class MeanFusion(Fusion):
    """Average of the present modalities' features."""

    def __init__(self, num_modalities: int, dim: int):
        super().__init__()
        self.out_dim = dim

    def forward(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        w = mask.to(h.dtype)
        w = w / w.sum(1, keepdim=True).clamp_min(1.0)  # (B, M)
        return (_zero_absent(h, mask) * w.unsqueeze(-1)).sum(1), w


@FUSIONS.register("late")
class LateFusion(Fusion):
    """Decision fusion: each modality is classified on its own; logits averaged (see LateHead)."""

    def __init__(self, num_modalities: int, dim: int):
        super().__init__()
        self.num_modalities = num_modalities
        self.out_dim = dim

    def forward(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        w = mask.to(h.dtype)
        return _zero_absent(h, mask), w / w.sum(1, keepdim=True).clamp_min(1.0)  # (B, M, d)

    def make_head(self, ways: int) -> nn.Module:
        return LateHead(self.num_modalities, self.out_dim, ways)


class MathSelfAttention(nn.Module):
    """Multi-head self-attention written out (q k^T / sqrt(d) -> masked softmax -> v).

    PyTorch's fused CPU attention kernel has no double backward (second-order MAML fails with
    "derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"),
    so adapted models use this plain version, which supports any order of differentiation.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise InputError(f"fusion width {dim} is not divisible by {heads} attention heads")
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.heads = heads

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:  # x (B, M, d), key_mask (B, M) True = present
        b, m, d = x.shape
        q, k, v = self.qkv(x).reshape(b, m, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, M, hd)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)  # (B, H, M, M)
        attn = masked_softmax(scores, key_mask[:, None, None, :], dim=-1)
        return self.out((attn @ v).transpose(1, 2).reshape(b, m, d))


@dataclass
class TransformerOptions:
    layers: int = 1
    heads: int = 4  # must divide model.width


@FUSIONS.register("transformer")
class TransformerFusion(Fusion):
    """Interactive attention: modality tokens (+ learned modality embeddings) pass through pre-norm
    transformer layers whose keys exclude absent modalities, then a masked mean over present tokens."""

    Options = TransformerOptions

    def __init__(self, num_modalities: int, dim: int, layers: int = 1, heads: int = 4):
        super().__init__()
        self.modality_embedding = nn.Parameter(torch.zeros(num_modalities, dim))
        nn.init.normal_(self.modality_embedding, std=0.02)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(
                nn.ModuleDict(
                    dict(
                        norm1=nn.LayerNorm(dim),
                        attn=MathSelfAttention(dim, heads),
                        norm2=nn.LayerNorm(dim),
                        mlp=nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)),
                    )
                )
            )
        self.out_dim = dim

    def forward(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        x = _zero_absent(h, mask) + self.modality_embedding  # (B, M, d)
        for block in self.blocks:
            x = x + block["attn"](block["norm1"](x), mask)
            x = x + block["mlp"](block["norm2"](x))
        w = mask.to(x.dtype)
        w = w / w.sum(1, keepdim=True).clamp_min(1.0)  # (B, M)
        return (x * w.unsqueeze(-1)).sum(1), w


class EpisodeAttention(AttentionFusion):
    """The seed's attention with scores that also read the episode: a reference set of samples, which is the
    batch itself or, under ``execution.support_statistics``, the support set (recorded as BatchNorm records
    its statistics), so that a prediction depends on the support set and the sample alone."""

    # ``execution.support_statistics``: "record" the reference of the batch at hand (the support set), "use" it
    # for every later batch; None: the batch is its own reference.
    statistics_mode: str | None = None
    recorded: tuple[Tensor, Tensor] | None = None

    def reference(self, unit: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, bool]:
        """``(reference [R, M, d], its mask [R, M], whether it is the batch itself)`` for unit features."""
        if self.statistics_mode == "record":
            self.recorded = (unit.detach(), mask)
        if self.statistics_mode == "use" and self.recorded is not None:
            return (*self.recorded, False)
        return unit, mask, True


@dataclass
class AgreementOptions:
    temperature: float = 0.1  # of the cosine similarities that place a sample among the reference samples


@FUSIONS.register("agreement")
class AgreementAttention(EpisodeAttention):
    """Cross-modal agreement attention: the seed's scores plus how well each modality of a sample agrees with
    its other modalities about which samples of the episode it resembles,

        p_i(b) = softmax_r(cos(h_bi, h_ri) / tau),   g_bi = sum_r p_i(b)_r * mean_{j != i} p_j(b)_r,
        a_i = softmax_i(W_a h_i + b_a + beta * log g_bi),   z = sum_i a_i * h_i,

    over the reference samples r: the batch itself (each sample left out of its own reference) or, under
    ``execution.support_statistics``, the support set. A modality that places a sample among other samples
    than the sample's other modalities do (a wrong photo of another product) loses weight; ``beta`` is meta-
    learned (0 gives the seed). A form of the cross-modal consistency of multimodal co-attention (Lu et al.
    2016, "Hierarchical question-image co-attention") computed per episode, in the spirit of task-aware
    weighting (Ma et al. 2021, SMIL, learn what a missing or bad modality should weigh).
    """

    Options = AgreementOptions

    def __init__(self, num_modalities: int, dim: int, attention: str = "vector", temperature: float = 0.1):
        super().__init__(num_modalities, dim, attention)
        self.beta = nn.Parameter(torch.ones(()))
        self.temperature = temperature

    def attention(self, h: Tensor, mask: Tensor) -> Tensor:
        unit = F.normalize(h, dim=-1)
        reference, ref_mask, itself = self.reference(unit, mask)
        sim = torch.einsum("bmd,rmd->bmr", unit, reference) / self.temperature  # (B, M, R)
        allowed = ref_mask.t().unsqueeze(0).expand_as(sim)  # the reference samples that have the modality
        if itself:
            allowed = allowed & ~torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device).unsqueeze(1)
        p = masked_softmax(sim, allowed, dim=-1)  # (B, M, R); all zeros where nothing to compare with
        present = mask.to(p.dtype).unsqueeze(-1)  # (B, M, 1)
        others = ((p * present).sum(1, keepdim=True) - p * present) / (
            present.sum(1, keepdim=True) - present
        ).clamp_min(1)
        agreement = (p * others).sum(-1).clamp_min(1e-6)  # (B, M)
        scores = self.score(h) + self.beta * agreement.log().unsqueeze(-1)
        return masked_softmax(scores, mask.unsqueeze(-1), dim=1)


@FUSIONS.register("task")
class TaskAwareAttention(EpisodeAttention):
    """Task-aware attention: the seed's per-sample scores plus, per modality, how far apart that modality
    places the samples of this task,

        s_i = mean_{r != r'} (1 - cos(h_ri, h_r'i)),   a_i = softmax_i(W_a h_i + b_a + gamma * log s_i),
        z = sum_i a_i * h_i,

    over the pairs of reference samples that both carry modality i: the batch itself or, under
    ``execution.support_statistics``, the support set. In a 1-shot support set every sample is its own
    class, so s_i measures how well modality i separates this task's classes: a modality in which the
    task's classes look alike (two shirts that differ only in colour, for the photo) is weighed down for
    this task only. ``gamma`` is meta-learned (0 gives the seed). Task conditioning from the support set
    as in TADAM (Oreshkin et al. 2018, which conditions the feature extractor on the mean of the class
    prototypes), reduced here to one number per modality.
    """

    def __init__(self, num_modalities: int, dim: int, attention: str = "vector"):
        super().__init__(num_modalities, dim, attention)
        self.gamma = nn.Parameter(torch.ones(()))

    def attention(self, h: Tensor, mask: Tensor) -> Tensor:
        reference, ref_mask, _ = self.reference(F.normalize(h, dim=-1), mask)
        distance = 1 - torch.einsum("rmd,smd->mrs", reference, reference)  # (M, R, R)
        pairs = (ref_mask.t().unsqueeze(2) & ref_mask.t().unsqueeze(1)).to(h.dtype)  # (M, R, R)
        pairs = pairs * (1 - torch.eye(pairs.shape[1], dtype=h.dtype, device=h.device))
        spread = (distance * pairs).sum((1, 2)) / pairs.sum((1, 2)).clamp_min(1)  # (M,)
        scores = self.score(h) + self.gamma * spread.clamp_min(1e-6).log().view(1, -1, 1)
        return masked_softmax(scores, mask.unsqueeze(-1), dim=1)


@dataclass
class MatchedOptions:
    attention: Literal["vector", "scalar"] = "vector"
    matching_weight: float = 1.0  # of the contrastive matching loss, added to the meta-loss
    matching_temperature: float = 0.1  # of the contrastive loss's cosine similarities


@FUSIONS.register("matched")
class MatchedAttention(AttentionFusion):
    """Matched attention: the seed's scores plus how well each modality of a sample matches the sample's other
    modalities, as judged by a cross-modal matcher trained for exactly that,

        u_bi = normalize(P_i h_bi),   c_bi = mean_{j != i present} u_bi . u_bj,
        a_i = softmax_i(W_a h_i + b_a + beta * c_bi),   z = sum_i a_i * h_i,

    where ``P_i`` (one two-layer MLP per modality into a shared space) is trained by a contrastive loss added
    to the meta-loss (``auxiliary_loss``): for each pair of modalities, a sample's entry of one must pick out
    the same sample's entry of the other among all the meta-batch's samples (symmetric InfoNCE as in CLIP,
    Radford et al. 2021). A modality replaced by another product's (a wrong photo) should match neither of
    the others and lose weight, a signal the task loss alone does not teach; how well it does depends on how
    well the matcher tells them apart (docs/results.md, the fashion fusion tables). The matcher reads the features
    detached, so that its loss does not reshape what the classifier reads; ``beta`` is meta-learned
    (0 gives the seed). Unlike ``agreement`` it needs no reference samples: a sample's weights are its own.
    """

    Options = MatchedOptions
    has_auxiliary_loss = True

    def __init__(
        self,
        num_modalities: int,
        dim: int,
        attention: str = "vector",
        matching_weight: float = 1.0,
        matching_temperature: float = 0.1,
    ):
        super().__init__(num_modalities, dim, attention)
        self.matchers = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim)) for _ in range(num_modalities)
        )
        # Start with the matcher's say about as large as the seed's scores' spread; meta-learning moves it.
        self.beta = nn.Parameter(torch.full((), 5.0))
        self.matching_weight = matching_weight
        self.matching_temperature = matching_temperature

    def matching_space(self, h: Tensor) -> Tensor:
        """``u [B, M, d]``: each modality's features, detached, mapped into the shared space, unit length."""
        return F.normalize(torch.stack([p(h[:, i].detach()) for i, p in enumerate(self.matchers)], 1), dim=-1)

    def match(self, h: Tensor, mask: Tensor) -> Tensor:
        """``c [B, M]``: each modality's mean cosine to the sample's other present modalities (0 with none)."""
        u = self.matching_space(h)
        present = mask.to(u.dtype)  # (B, M)
        cos = torch.einsum("bmd,bnd->bmn", u, u) * present.unsqueeze(1)  # (B, M, M), with present others only
        others = (present.sum(1, keepdim=True) - present).clamp_min(1)  # (B, M)
        return (cos.sum(-1) - cos.diagonal(dim1=1, dim2=2)) / others

    def attention(self, h: Tensor, mask: Tensor) -> Tensor:
        scores = self.score(h) + self.beta * self.match(h, mask).unsqueeze(-1)
        return masked_softmax(scores, mask.unsqueeze(-1), dim=1)

    def auxiliary_loss(self, h: Tensor, mask: Tensor) -> Tensor | None:
        """``matching_weight`` x the symmetric InfoNCE loss, averaged over the pairs of modalities that at least
        two samples carry together; None where there is none."""
        u, losses = self.matching_space(h), []
        for i in range(u.shape[1]):
            for j in range(i + 1, u.shape[1]):
                rows = torch.nonzero(mask[:, i] & mask[:, j]).flatten()
                if len(rows) < 2:
                    continue
                logits = u[rows, i] @ u[rows, j].t() / self.matching_temperature  # (P, P)
                target = torch.arange(len(rows), device=logits.device)
                losses.append((F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2)
        return self.matching_weight * torch.stack(losses).mean() if losses else None


def build_fusion(name: str, num_modalities: int, dim: int, **options) -> Fusion:
    return FUSIONS.build(name, num_modalities, dim, **options)


__all__ = [
    "FUSIONS",
    "Fusion",
    "AttentionFusion",
    "ConcatFusion",
    "MeanFusion",
    "LateFusion",
    "TransformerFusion",
    "EpisodeAttention",
    "AgreementAttention",
    "TaskAwareAttention",
    "MatchedAttention",
    "LinearHead",
    "LateHead",
    "masked_softmax",
    "build_fusion",
]
