"""How a network executes, not what it computes: memory layout of the 2-D CNNs and the written-out
BatchNorm. Modules opt in with a class attribute (``memory_format``, ``decomposed``); the context
managers here switch it for a block of forward passes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


def to_memory_format(x: Tensor, memory_format: torch.memory_format) -> Tensor:
    """``x`` with the same values in ``memory_format`` (channels_last for the 2-D CNNs: see ``Conv4``).
    ``.to``, not ``.contiguous``: a one-channel NCHW tensor already counts as channels_last-contiguous,
    so ``.contiguous`` would keep its NCHW strides. Inside a ``torch.func`` transform (vmap over
    episodes or query rows) the physical tensor has more dimensions than the layout allows; it stays
    as it is."""
    if torch._C._functorch.maybe_current_level() is not None:
        return x
    return x.to(memory_format=memory_format)


@contextmanager
def overriding(model: nn.Module, attribute: str, value: object) -> Iterator[None]:
    """Set ``attribute`` to ``value`` on every submodule of ``model`` that has it, for this block."""
    modules = [m for m in model.modules() if hasattr(m, attribute)]
    before = [getattr(m, attribute) for m in modules]
    for m in modules:
        setattr(m, attribute, value)
    try:
        yield
    finally:
        for m, old in zip(modules, before):
            setattr(m, attribute, old)


def memory_format(model: nn.Module, fmt: torch.memory_format):
    """Run the 2-D CNNs inside ``model`` in ``fmt`` for the forward passes in this block (the layout
    is fixed at forward time; a later backward reuses it). MAML uses it for support passes it will
    differentiate twice: BatchNorm's double backward is slower in channels_last than in NCHW, while every
    other pass is faster in channels_last (docs/performance.md has the measurements)."""
    return overriding(model, "memory_format", fmt)


def decomposed_batchnorm(model: nn.Module):
    """BatchNorm written out as mean/var arithmetic inside ``model`` for this block (see batchnorm.py)."""
    return overriding(model, "decomposed", True)


@contextmanager
def support_statistics(model: nn.Module | None, support) -> Iterator[None]:
    """For this block, the layers of ``model`` that read batch statistics (normalisation; a fusion with a
    reference set) use the statistics they see on ``support`` for every batch (``model.forward_features(support)``
    is run once to record them), so a prediction depends on the support set and the sample alone, not on the
    batch it came in. ``model`` None: nothing to do."""
    norms = [m for m in model.modules() if hasattr(m, "statistics_mode")] if model is not None else []
    if not norms:
        yield
        return
    for m in norms:
        m.statistics_mode, m.recorded = "record", None
    try:
        with torch.no_grad():
            model.forward_features(support)
        for m in norms:
            m.statistics_mode = "use"
        yield
    finally:
        for m in norms:
            m.statistics_mode, m.recorded = None, None


def episodes_vmap_pays(model: nn.Module, device: torch.device | str) -> bool:
    """Is adapting many evaluation episodes under ``torch.func.vmap`` faster than one after another?
    On a GPU, yes: the per-episode loop is bound by kernel launches. On a CPU only for models without
    2-D or 3-D convolutions: vmap turns those into grouped convolutions, which run no faster than one
    convolution per episode (3-D ones several times slower), while MLP, embedding and 1-D models are bound
    by per-call overhead and gain several times (docs/performance.md has the measurements)."""
    if torch.device(device).type == "cuda":
        return True
    return not any(isinstance(m, (nn.Conv2d, nn.Conv3d)) for m in model.modules())
