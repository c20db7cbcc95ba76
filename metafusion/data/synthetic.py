"""Built-in synthetic multimodal dataset: glyph images, harmonic audio, keyword text, tabular vectors.

Every modality alone is ambiguous by design. Each modality has only ``num_classes // 10`` prototypes,
and every class draws one prototype per modality, so in any one modality about ten classes look alike;
the tuple of prototypes, however, is unique to the class. A 5-way episode therefore often holds two
classes that collide in one modality but differ in the others, which is what makes fusing modalities
measurably better than the best single one. ``noise`` scales the within-class noise of every modality.
Everything is a deterministic function of ``seed`` and builds in seconds.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import InputError
from .dataset import MultimodalDataset, split_classes

MODALITIES = ("image", "audio", "text", "tabular")
SAMPLE_RATE = 8000
AUDIO_SECONDS = 0.5
TEXT_LENGTH = 12
VOCAB_SIZE = 200  # words; token 0 is padding
TABULAR_DIM = 16
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


def _images(proto: Tensor, noise: float, g: torch.Generator) -> Tensor:
    """Glyphs of 3 strokes: prototype endpoints, jittered, shifted, plus pixel noise."""
    n = proto.shape[0]
    pts = proto + 0.8 * noise * torch.randn(proto.shape, generator=g)
    pts = pts + (torch.rand(n, 1, 1, 2, generator=g) - 0.5) * 3.0  # global shift, +-1.5 px
    out = torch.cat([_segments_to_image(chunk) for chunk in pts.split(1024)])
    return (out + 0.15 * noise * torch.randn(out.shape, generator=g)).clamp(0, 1)


def _audio(f0: Tensor, chirp: Tensor, amps: Tensor, noise: float, g: torch.Generator) -> Tensor:
    """Harmonic chirps: f(t) = f0 (1 + jitter) + chirp * t, three harmonics with class amplitudes."""
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
    return (wave + 0.3 * noise * torch.randn(wave.shape, generator=g)).unsqueeze(1)  # (N, 1, T)


def _text(keywords: Tensor, noise: float, g: torch.Generator) -> Tensor:
    """Token ids: each token is one of the class's 4 keywords with probability p, else any word."""
    n = keywords.shape[0]
    p_keyword = min(0.9, max(0.1, 0.55 - 0.2 * (noise - 1.0)))
    use_kw = torch.rand(n, TEXT_LENGTH, generator=g) < p_keyword
    kw = torch.gather(keywords, 1, torch.randint(0, keywords.shape[1], (n, TEXT_LENGTH), generator=g))
    background = torch.randint(1, VOCAB_SIZE + 1, (n, TEXT_LENGTH), generator=g)
    return torch.where(use_kw, kw, background)


def make_synthetic(
    num_classes: int = 300,
    samples_per_class: int = 20,
    noise: float = 1.0,
    missing_rate: float = 0.0,
    seed: int = 0,
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
) -> MultimodalDataset:
    """Build the synthetic dataset (about 2 s for 300 x 20 samples)."""
    if num_classes < 10:
        raise InputError(f"synthetic dataset needs at least 10 classes, got {num_classes}")
    g = torch.Generator().manual_seed(seed)
    # Enough prototypes that unique tuples exist (protos ** 4 >= classes), ~10 classes per prototype.
    protos = max(2, num_classes // 10, math.ceil(num_classes ** (1 / len(MODALITIES))) + 1)

    # One prototype per modality per class; resample until every class's tuple is unique.
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
        "image": _images(img_proto[a[:, 0]], noise, g),
        "audio": _audio(f0[a[:, 1]], chirp[a[:, 1]], amps[a[:, 1]], noise, g),
        "text": _text(keywords[a[:, 2]], noise, g),
        "tabular": tab_proto[a[:, 3]] + 0.8 * noise * torch.randn(targets.shape[0], TABULAR_DIM, generator=g),
    }
    present = torch.ones(targets.shape[0], len(MODALITIES), dtype=torch.bool)
    ds = MultimodalDataset(
        data,
        present,
        targets,
        MODALITIES,
        splits=split_classes(list(range(num_classes)), split_fractions, seed),
        metadata={
            "vocabulary": vocabulary(),
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
