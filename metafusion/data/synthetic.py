"""Built-in synthetic multimodal dataset: glyph images, harmonic audio, keyword text, tabular vectors.

Every modality alone is ambiguous by design. Each modality has only ``num_classes // 10`` prototypes (or
``prototypes``), and every class draws one prototype per modality, so in any one modality about ten
classes (or ``num_classes / prototypes``) look alike; the tuple of prototypes, however, is unique to the
class. A 5-way episode therefore often holds two
classes that collide in one modality but differ in the others, which is what makes fusing modalities
measurably better than the best single one. ``noise`` scales the within-class noise of every modality.

``nuisance`` > 0 renders the class content through fixed generators with variation that carries no class
information but dominates distances between raw inputs, as in real data: each glyph is drawn smaller at a
random place among strokes that belong to no class; each keyword is written as one of several synonyms
(``1 + 7 * nuisance`` surface words per keyword); the tabular vector is the class's attributes and three times
as many nuisance attributes, mixed by a fixed random rotation; each sound carries a hum at a random pitch. A
learned encoder can undo all of this (pooling, embeddings that merge synonyms, a projection), the raw
inputs of the no-training centroid cannot: with ``nuisance`` = 0 (the default) the raw inputs are close
to their class prototypes and the centroid is hard to beat. Everything is a deterministic function of
``seed`` and builds in seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import DataConfig
from ..errors import ConfigError, InputError
from .dataset import MultimodalDataset, split_classes
from .sources import DATASETS

MODALITIES = ("image", "audio", "text", "tabular")
SAMPLE_RATE = 8000
AUDIO_SECONDS = 0.5
TEXT_LENGTH = 12
VOCAB_SIZE = 200  # keywords; token 0 is padding (synonyms add VOCAB_SIZE words each)
TABULAR_DIM = 16
MAX_SYNONYMS = 8
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def vocabulary(size: int = VOCAB_SIZE) -> list[str]:
    """Pronounceable fake words, index i+1 <-> token id i+1 (0 is padding)."""
    n = len(_SYLLABLES)
    return ["<pad>"] + [_SYLLABLES[i % n] + _SYLLABLES[(i // n + 3 * i) % n] for i in range(size)]


def _segments_to_image(points: Tensor, size: int = 28, sigma: float = 0.9) -> Tensor:
    """Render line segments ``points [N, S, 2, 2]`` (pixel coordinates) into ``[N, 1, size, size]``."""
    ys, xs = torch.meshgrid(
        torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij"
    )
    grid = torch.stack([xs, ys], dim=-1).reshape(1, 1, -1, 2)  # (1, 1, P, 2)
    a, b = points[:, :, None, 0], points[:, :, None, 1]  # (N, S, 1, 2)
    ab = b - a
    t = ((grid - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-6)  # (N, S, P)
    closest = a + t.clamp(0, 1)[..., None] * ab  # (N, S, P, 2)
    dist2 = ((grid - closest) ** 2).sum(-1)  # (N, S, P)
    ink = torch.exp(-dist2 / (2 * sigma**2)).amax(dim=1)  # (N, P)
    return ink.reshape(-1, 1, size, size)


def _images(proto: Tensor, noise: float, nuisance: float, g: torch.Generator) -> Tensor:
    """Glyphs of 3 strokes: prototype endpoints, jittered, shifted, plus pixel noise; with ``nuisance``,
    drawn smaller, shifted further and beside ``round(nuisance)`` stroke of no class."""
    n = proto.shape[0]
    scale, shift = 1 - 0.3 * nuisance, 3.0 + 6.0 * nuisance  # shift range, px
    pts = 14 + scale * (proto - 14) + 0.8 * noise * torch.randn(proto.shape, generator=g)
    pts = pts + (torch.rand(n, 1, 1, 2, generator=g) - 0.5) * shift
    clutter = round(nuisance)
    if clutter:
        pts = torch.cat([pts, 2 + 24 * torch.rand(n, clutter, 2, 2, generator=g)], 1)
    out = torch.cat([_segments_to_image(chunk) for chunk in pts.split(1024)])
    return (out + 0.15 * noise * torch.randn(out.shape, generator=g)).clamp(0, 1)


def _audio(f0: Tensor, chirp: Tensor, amps: Tensor, noise: float, nuisance: float, g: torch.Generator) -> Tensor:
    """Harmonic chirps: f(t) = f0 (1 + jitter) + chirp * t, three harmonics with class amplitudes; with
    ``nuisance``, plus a hum of relative amplitude ``nuisance / 2`` at a random pitch (100..1500 Hz)."""
    n = f0.shape[0]
    t = torch.arange(int(SAMPLE_RATE * AUDIO_SECONDS), dtype=torch.float32) / SAMPLE_RATE  # (T,)
    f = f0 * (1 + 0.02 * noise * torch.randn(n, generator=g))
    phase = 2 * math.pi * (f[:, None] * t + 0.5 * chirp[:, None] * t**2)  # (N, T)
    wave = torch.zeros(n, t.shape[0])
    for h in range(amps.shape[1]):
        offset = 2 * math.pi * torch.rand(n, 1, generator=g)
        wave += amps[:, h, None] * torch.sin((h + 1) * phase + offset)
    envelope = torch.sin(math.pi * t / AUDIO_SECONDS) ** 0.5  # fade in/out, (T,)
    wave = wave * envelope / amps.sum(1, keepdim=True)
    if nuisance:
        hum = 100 * 15 ** torch.rand(n, 1, generator=g)
        wave = wave + 0.5 * nuisance * torch.sin(2 * math.pi * hum * t + 2 * math.pi * torch.rand(n, 1, generator=g))
    return (wave + 0.3 * noise * torch.randn(wave.shape, generator=g)).unsqueeze(1)  # (N, 1, T)


def synonyms(nuisance: float) -> int:
    """How many surface words each keyword has."""
    return 1 + round((MAX_SYNONYMS - 1) * nuisance)


def _text(keywords: Tensor, noise: float, nuisance: float, g: torch.Generator) -> Tensor:
    """Token ids: each token is one of the class's 4 keywords with probability p, else any word; keyword
    ``k`` is written as ``k + s * VOCAB_SIZE`` for a random synonym ``s``."""
    n = keywords.shape[0]
    p_keyword = min(0.9, max(0.1, 0.55 - 0.2 * (noise - 1.0) - 0.25 * nuisance))
    use_kw = torch.rand(n, TEXT_LENGTH, generator=g) < p_keyword
    kw = torch.gather(keywords, 1, torch.randint(0, keywords.shape[1], (n, TEXT_LENGTH), generator=g))
    surface = synonyms(nuisance)
    kw = kw + VOCAB_SIZE * torch.randint(0, surface, kw.shape, generator=g)
    background = torch.randint(1, VOCAB_SIZE * surface + 1, (n, TEXT_LENGTH), generator=g)
    return torch.where(use_kw, kw, background)


def _tabular(proto: Tensor, noise: float, nuisance: float, g: torch.Generator) -> Tensor:
    """Class attributes plus noise; with ``nuisance``, three times as many attributes of no class (standard deviation
    ``3 * nuisance``) appended and all of them mixed by a fixed random rotation."""
    x = proto + 0.8 * noise * torch.randn(proto.shape, generator=g)
    if not nuisance:
        return x
    x = torch.cat([x, 3 * nuisance * torch.randn(x.shape[0], 3 * x.shape[1], generator=g)], 1)
    rotation, _ = torch.linalg.qr(torch.randn(x.shape[1], x.shape[1], generator=g))
    return x @ rotation


def make_synthetic(
    num_classes: int = 300,
    samples_per_class: int = 20,
    noise: float = 1.0,
    nuisance: float = 0.0,
    prototypes: int | None = None,
    missing_rate: float = 0.0,
    seed: int = 0,
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
) -> MultimodalDataset:
    """Build the synthetic dataset (about 2 s for 300 x 20 samples)."""
    if num_classes < 10:
        raise InputError(f"synthetic dataset needs at least 10 classes, got {num_classes}")
    g = torch.Generator().manual_seed(seed)
    # Enough prototypes that unique tuples exist (protos ** 4 >= classes), ~10 classes per prototype by default.
    protos = max(2, prototypes or num_classes // 10, math.ceil(num_classes ** (1 / len(MODALITIES))) + 1)

    # One prototype per modality per class, every class's tuple unique: balanced draws (each prototype shared by
    # as many classes) resampled until unique; or, with few prototypes, where such draws are almost never
    # unique, distinct tuples drawn directly.
    if prototypes:
        codes = torch.randperm(protos ** len(MODALITIES), generator=g)[:num_classes]
        assign = torch.stack([codes // protos**j % protos for j in range(len(MODALITIES))], 1)
    else:
        for _ in range(1000):
            assign = torch.stack([torch.randperm(num_classes, generator=g) % protos for _ in MODALITIES], 1)
            if torch.unique(assign, dim=0).shape[0] == num_classes:
                break
        else:
            raise RuntimeError(f"could not give {num_classes} classes unique prototype tuples")

    img_proto = 4 + 20 * torch.rand(protos, 3, 2, 2, generator=g)  # 3 strokes, endpoints in [4, 24] px
    f0 = 150 * (1000 / 150) ** torch.rand(protos, generator=g)  # log-uniform 150..1000 Hz
    chirp = 800 * (torch.rand(protos, generator=g) - 0.5)  # Hz per second
    amps = torch.rand(protos, 3, generator=g) + 0.1
    keywords = torch.stack([torch.randperm(VOCAB_SIZE, generator=g)[:4] + 1 for _ in range(protos)])
    tab_proto = 1.5 * torch.randn(protos, TABULAR_DIM, generator=g)

    targets = torch.arange(num_classes).repeat_interleave(samples_per_class)  # (N,)
    a = assign[targets]  # (N, 4): prototype of each sample in each modality
    data = {
        "image": _images(img_proto[a[:, 0]], noise, nuisance, g),
        "audio": _audio(f0[a[:, 1]], chirp[a[:, 1]], amps[a[:, 1]], noise, nuisance, g),
        "text": _text(keywords[a[:, 2]], noise, nuisance, g),
        "tabular": _tabular(tab_proto[a[:, 3]], noise, nuisance, g),
    }
    present = torch.ones(targets.shape[0], len(MODALITIES), dtype=torch.bool)
    ds = MultimodalDataset(
        data,
        present,
        targets,
        MODALITIES,
        splits=split_classes(list(range(num_classes)), split_fractions, seed),
        metadata={
            "vocabulary": vocabulary(VOCAB_SIZE * synonyms(nuisance)),
            "sample_rate": SAMPLE_RATE,
            "prototypes": assign,
            "text_length": TEXT_LENGTH,
        },
        name="synthetic",
    )
    return ds.with_missing(missing_rate, seed=seed + 1)


def decode_text(ids: Tensor, vocab: list[str]) -> str:
    """Token ids -> the sentence they encode (padding dropped)."""
    return " ".join(vocab[i] for i in ids.tolist() if i != 0)


@dataclass
class SyntheticOptions:
    num_classes: int = 300
    samples_per_class: int = 20
    noise: float = 1.0  # scales every modality's noise
    nuisance: float = 0.0  # variation without class information that raw inputs cannot see past (0 to 1)
    prototypes: int | None = None  # per modality, shared by num_classes / prototypes classes (None: num_classes // 10)

    def __post_init__(self) -> None:
        if (
            self.num_classes < 10
            or self.samples_per_class < 1
            or not self.noise >= 0
            or not 0 <= self.nuisance <= 1
            or (self.prototypes or 2) < 2
        ):
            raise ConfigError(
                f"synthetic data needs data.num_classes >= 10, data.samples_per_class >= 1, data.noise >= 0 and "
                f"0 <= data.nuisance <= 1, data.prototypes >= 2 (got {self.num_classes}, {self.samples_per_class}, "
                f"{self.noise}, {self.nuisance}, {self.prototypes})"
            )


@DATASETS.register("synthetic", options=SyntheticOptions, expects="(built in; no files)", check=lambda root: "ok")
def synthetic(cfg: DataConfig, opts: SyntheticOptions) -> MultimodalDataset:
    return make_synthetic(
        opts.num_classes, opts.samples_per_class, opts.noise, opts.nuisance, opts.prototypes, seed=cfg.data_seed
    )
