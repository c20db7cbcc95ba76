"""Test-time adaptation of many episodes at once.

An algorithm with a *functional form* writes its test-time adaptation as a pure function of a state
(a dict of tensors: the model's parameters, prototypes, a task head) and a support batch, and its
prediction as a pure function of that state and a batch. ``evaluate_batched`` then runs that function
for a group of episodes under ``torch.func.vmap``: one set of adapted weights per episode, stacked
along a leading dimension, and every network call made once for the whole group (batched matmuls,
grouped convolutions). BatchNorm statistics stay per episode, exactly as in separate calls, and the
predictions equal those of the per-episode loop (tests/test_algorithms.py checks it in float64).

The model's code branches on the modality mask, so only episodes whose support and query masks are
identical share a vmap; with missing modalities the groups are smaller, never wrong.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from copy import deepcopy

import torch
from torch import Tensor, nn

from ..data.batch import Batch, Episode

State = dict[str, object]  # nested dicts of tensors (a pytree vmap can map over)


class _Call(nn.Module):
    """``fn(model, *args)`` as a module, so ``torch.func.functional_call`` can swap the model's
    parameters for any computation on it, not only its ``forward``."""

    def __init__(self, model: nn.Module, fn: Callable):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *args):
        return self.fn(self.model, *args)


def functional(model: nn.Module, params: dict[str, Tensor], fn: Callable = nn.Module.__call__, *args):
    """``fn(model, *args)`` computed with ``params`` (name -> tensor) in place of the model's own
    parameters; parameters and buffers not in ``params`` are the model's."""
    return torch.func.functional_call(_Call(model, fn), {f"model.{k}": v for k, v in params.items()}, args)


def model_parameters(model: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


def with_parameters(model: nn.Module, params: dict[str, Tensor]) -> nn.Module:
    """A copy of ``model`` whose parameters named in ``params`` hold those values (an adapted learner)."""
    learner = deepcopy(model)
    with torch.no_grad():
        for name, p in learner.named_parameters():
            if name in params:
                p.copy_(params[name])
    return learner


def episode_groups(episodes: list[Episode]) -> list[list[int]]:
    """Indices of episodes that can share one vmap: same ways, support/query sizes and masks."""
    groups: dict[tuple, list[int]] = {}
    for i, e in enumerate(episodes):
        key = (
            e.ways,
            tuple(e.support.mask.flatten().tolist()),
            tuple(e.query.mask.flatten().tolist()),
            len(e.support),
            len(e.query),
        )
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def stacked(batches: list[Batch]) -> tuple[dict[str, Tensor], Tensor]:
    """The inputs ``{m: [E, B, ...]}`` and labels ``[E, B]`` of same-shaped batches."""
    return (
        {m: torch.stack([b.inputs[m] for b in batches]) for m in batches[0].modalities},
        torch.stack([b.labels for b in batches]),
    )


def stacked_states(states: list) -> object:
    """Same-structured nested dicts of tensors stacked along a new leading dimension (the episodes)."""
    if isinstance(states[0], dict):
        return {k: stacked_states([s[k] for s in states]) for k in states[0]}
    return torch.stack(states)


def predict_alone(logits_fn: Callable[[Batch], Tensor], support: Batch, query: Batch) -> Tensor:
    """The non-transductive protocol (each query row classified in a batch of its own with the support
    set) in a form that composes with vmap: the per-query batches run under an inner vmap, grouped by
    the query's modality mask. ``base.predict_each_alone_loop`` is the definition."""
    n = len(support)
    patterns: dict[tuple[bool, ...], list[int]] = {}
    for i, row in enumerate(query.mask.tolist()):
        patterns.setdefault(tuple(row), []).append(i)
    order, parts = [], []
    for rows in patterns.values():
        idx = torch.tensor(rows, device=query.mask.device)
        mask = torch.cat([support.mask, query.mask[idx[:1]]])
        labels = torch.cat([support.labels, query.labels[idx[:1]]])

        def one(inputs: dict[str, Tensor]) -> Tensor:
            joint = {m: torch.cat([support.inputs[m], x.unsqueeze(0)]) for m, x in inputs.items()}
            return logits_fn(Batch(joint, mask, labels, support.modalities))[n]

        parts.append(torch.func.vmap(one)({m: x[idx] for m, x in query.inputs.items()}))
        order += rows
    inverse = torch.argsort(torch.tensor(order, device=query.mask.device))
    return torch.cat(parts)[inverse]


def evaluate_batched(algorithm, episodes: list[Episode]) -> list[tuple[Tensor, Tensor | None]] | None:
    """Query logits ``[Q, ways]`` and modality weights (``[Q, M]`` or None) of each episode, adapted
    together; None when the algorithm has no functional form for these episodes."""
    with torch.no_grad():
        form = algorithm.functional_form(episodes)
    if form is None:
        return None
    shared, per_episode = form  # per_episode: a list with one state per episode, in episode order
    model = algorithm.model
    weights_vary = model.fusion.weighted and len(model.modalities) > 1
    out: list = [None] * len(episodes)
    for idx in episode_groups(episodes):
        group = [episodes[i] for i in idx]
        first = group[0]
        s_mask, q_mask, mods = first.support.mask, first.query.mask, first.support.modalities
        mine = stacked_states([per_episode[i] for i in idx])

        def one(own: State, s_inputs, s_labels, q_inputs, q_labels) -> tuple[Tensor, Tensor]:
            support, query = Batch(s_inputs, s_mask, s_labels, mods), Batch(q_inputs, q_mask, q_labels, mods)
            state = algorithm.functional_adapt({**shared, **own}, support, first.ways)
            logits_fn = lambda batch: algorithm.functional_logits(state, batch)  # noqa: E731
            weights_fn = lambda batch: algorithm.functional_weights(state, batch)  # noqa: E731
            if algorithm.transductive:
                logits, weights = logits_fn(query), weights_fn(query)
            else:  # as the loop: weights per query alone, where they can vary
                logits, weights = predict_alone(logits_fn, support, query), None
                if weights_vary and weights_fn(query) is not None:
                    weights = predict_alone(weights_fn, support, query)
            return logits, (weights if weights is not None else logits.new_empty(0))

        with torch.no_grad(), warnings.catch_warnings():  # ops without a batching rule loop inside vmap
            warnings.filterwarnings("ignore", message="There is a performance drop")
            logits, weights = torch.func.vmap(one)(
                mine, *stacked([e.support for e in group]), *stacked([e.query for e in group])
            )
        for j, i in enumerate(idx):
            out[i] = (logits[j], weights[j] if weights.shape[-1] else None)
    return out
