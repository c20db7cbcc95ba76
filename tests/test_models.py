"""Encoders, fusions and FusionModel: shapes, the attention formula, masking, higher-order gradients."""

import inspect
import math

import pytest
import torch
from conftest import tiny_tabular_model

from metafusion._learn2learn import clone_module, update_module
from metafusion.data import Batch
from metafusion.models import ENCODERS, FUSIONS, ModelSpec, build_model
from metafusion.models.fusion import AttentionFusion


def example_input(name: str, small: bool = False) -> tuple[str, tuple[int, ...], object]:
    """(modality, sample shape, input maker) for an encoder, from its declaration: its first modality (any:
    tabular) and its default ``input_shape`` (or ``features``); token ids where it takes a vocabulary.
    ``small``: images and videos at most 16 pixels a side and 4 frames (fewer max-pool switching points for
    finite differences)."""
    cls = ENCODERS.get(name)
    parameters = inspect.signature(cls.__init__).parameters
    shape = tuple(parameters["input_shape"].default or (cls.features,))  # None: a frozen network's feature width
    if small and len(shape) >= 3:  # (C, H, W) or (T, C, H, W)
        shape = (*(min(t, 4) for t in shape[:-3]), shape[-3], min(shape[-2], 16), min(shape[-1], 16))
    if "vocab_size" in parameters:
        vocab = parameters["vocab_size"].default
        return cls.modalities[0], shape, lambda b: torch.randint(0, vocab, (b, *shape))
    return (cls.modalities or ("tabular",))[0], shape, lambda b: torch.rand(b, *shape)


def _batch(inputs: dict, mask=None):
    n = next(iter(inputs.values())).shape[0]
    mask = torch.ones(n, len(inputs), dtype=torch.bool) if mask is None else mask
    return Batch(inputs, mask, torch.zeros(n, dtype=torch.long), tuple(inputs))


@pytest.mark.parametrize("fusion", FUSIONS.names())
@pytest.mark.parametrize("encoder", ENCODERS.names())
def test_every_encoder_and_fusion_gives_finite_logits(encoder, fusion):
    modality, shape, make = example_input(encoder)
    spec = ModelSpec(
        {modality: shape, "tabular": (16,)} if modality != "tabular" else {"tabular": shape, "extra": (16,)}
    )
    encoders = {modality: encoder} if modality != "tabular" else {"tabular": encoder, "extra": "mlp"}
    model = build_model(spec, ways=5, width=16, hidden=8, fusion=fusion, encoders=encoders)
    inputs = {m: (make(6) if m == modality else torch.randn(6, 16)) for m in spec.input_shapes}
    logits = model(_batch(inputs))
    assert logits.shape == (6, 5) and torch.isfinite(logits).all()
    assert model.encoders[modality].out_dim == 16


def _three_modality_model(fusion, mode="vector"):
    spec = ModelSpec({"a": (4,), "b": (4,), "c": (4,)})
    return build_model(
        spec,
        ways=3,
        width=8,
        hidden=8,
        fusion=fusion,
        encoders={"a": "mlp", "b": "mlp", "c": "mlp"},
        fusion_options={"attention": mode} if fusion == "attention" else {},
    )


MASK = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 0, 1], [0, 1, 0], [1, 1, 0]], dtype=torch.bool)


@pytest.mark.parametrize("fusion,mode", [(f, "vector") for f in FUSIONS.names()] + [("attention", "scalar")])
def test_weights_sum_to_one_over_present_modalities(fusion, mode):
    model = _three_modality_model(fusion, mode)
    batch = _batch({m: torch.randn(5, 4) for m in "abc"}, MASK)
    w = model.modality_weights(batch)
    if w is None:  # a fusion without per-modality weights (concat) says so, and its model still predicts
        assert torch.isfinite(model(batch)).all()
        return
    assert torch.allclose(w.sum(1), torch.ones(5), atol=1e-6)
    assert (w[~MASK] == 0).all()


@pytest.mark.parametrize("fusion", FUSIONS.names())
def test_absent_modality_has_exactly_zero_influence(fusion):
    torch.manual_seed(0)
    model = _three_modality_model(fusion)
    clean = {m: torch.randn(5, 4) for m in "abc"}
    garbage = {m: torch.where(MASK[:, i : i + 1], x, 1e3 * torch.randn(5, 4)) for i, (m, x) in enumerate(clean.items())}
    zeroed = {m: torch.where(MASK[:, i : i + 1], x, torch.zeros(())) for i, (m, x) in enumerate(clean.items())}
    out_zero = model(_batch(zeroed, MASK))
    out_garbage = model(_batch(garbage, MASK))
    assert torch.equal(out_zero, out_garbage)


def test_attention_matches_hand_computation():
    torch.manual_seed(0)
    fusion = AttentionFusion(num_modalities=3, dim=4, attention="vector").double()
    h = torch.randn(2, 3, 4, dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, False, True]])
    z, w = fusion(h, mask)
    W, b = fusion.score.weight, fusion.score.bias
    for n in range(2):
        present = [i for i in range(3) if mask[n, i]]
        scores = torch.stack([W @ h[n, i] + b for i in present])  # (P, d)
        a = torch.exp(scores) / torch.exp(scores).sum(0)  # softmax over modalities, per feature
        expected = sum(a[k] * h[n, i] for k, i in enumerate(present))
        assert torch.allclose(z[n], expected)
    # The softmax is over modalities, never over the batch: one sample's output ignores the others.
    z0, _ = fusion(h[:1], mask[:1])
    assert torch.allclose(z0[0], z[0])


def _hvp_matches_finite_differences(model, batch, eps=1e-7, check_fd=True):
    """Hessian-vector product by double backward == central difference of gradients along v.
    (A tiny eps keeps ReLU / max-pool switching points from falling inside the difference.)"""
    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn = lambda: torch.nn.functional.cross_entropy(model(batch), batch.labels)  # noqa: E731
    grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
    v = [torch.randn_like(p) for p in params]
    hv = torch.autograd.grad(sum((g * u).sum() for g, u in zip(grads, v)), params, allow_unused=True)
    first = hv[0]  # the first layer of the encoder: the double backward reached all the way down
    assert first is not None and torch.isfinite(first).all() and first.abs().max() > 0
    if not check_fd:
        return
    with torch.no_grad():
        for p, u in zip(params, v):
            p.add_(eps * u)
    g_plus = torch.autograd.grad(loss_fn(), params, allow_unused=True)
    with torch.no_grad():
        for p, u in zip(params, v):
            p.sub_(2 * eps * u)
    g_minus = torch.autograd.grad(loss_fn(), params, allow_unused=True)
    num = torch.cat(
        [
            ((a if a is not None else 0 * p) - (b if b is not None else 0 * p)).flatten() / (2 * eps)
            for a, b, p in zip(g_plus, g_minus, params)
        ]
    )
    ana = torch.cat([(h if h is not None else torch.zeros_like(p)).flatten() for h, p in zip(hv, params)])
    assert ana.abs().max() > 0
    rel = ((ana - num).norm() / ana.norm()).item()
    assert rel < 1e-4, rel


@pytest.mark.parametrize("encoder", ENCODERS.names())
def test_second_order_gradients_flow_through_every_encoder(encoder):
    torch.manual_seed(0)
    modality, shape, make = example_input(encoder, small=True)
    spec = ModelSpec({modality: shape})
    model = build_model(spec, ways=2, width=4, hidden=3, fusion="attention", encoders={modality: encoder}).double()
    x = make(4)
    x = x.double() if x.is_floating_point() else x
    batch = Batch({modality: x}, torch.ones(4, 1, dtype=torch.bool), torch.tensor([0, 1, 0, 1]), (modality,))
    # ResNet-18's millions of ReLU/max-pool switching points make a central difference of its
    # gradient unreliable; for it we check that the double backward exists, is finite and non-zero
    # down to the first convolution.
    _hvp_matches_finite_differences(model, batch, check_fd=encoder != "resnet18")


@pytest.mark.parametrize("encoder", ["conv4", "conv4s", "melcnn"])
def test_channels_last_changes_speed_not_values_or_second_order_gradients(encoder):
    """The 2-D CNNs run in channels_last order (a speed lever); in float64 the logits and the MAML
    meta-gradient (through the inner step) must equal those of the same weights in NCHW order."""
    torch.manual_seed(0)
    modality, shape, make = example_input(encoder)
    model = build_model(ModelSpec({modality: shape}), ways=3, width=8, hidden=8, encoders={modality: encoder}).double()
    x = make(6).double()
    batch = Batch({modality: x}, torch.ones(6, 1, dtype=torch.bool), torch.tensor([0, 1, 2] * 2), (modality,))

    def meta_gradient(memory_format):
        model.encoders[modality].memory_format = memory_format
        params = list(model.parameters())
        loss = torch.nn.functional.cross_entropy(model(batch), batch.labels)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        clone = clone_module(model)
        for p, g in zip(clone.parameters(), grads):
            p.update = -0.4 * g
        update_module(clone)
        logits = clone(batch)
        outer = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, batch.labels), params)
        return logits.detach(), torch.cat([g.flatten() for g in outer])

    layouts = []  # the lever must really switch kernels: the first convolution's output is NHWC
    model.encoders[modality].body[0].register_forward_hook(
        lambda m, i, out: layouts.append(
            out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
        )
    )
    fast_logits, fast_grad = meta_gradient(torch.channels_last)
    assert layouts and all(layouts)
    layouts.clear()
    plain_logits, plain_grad = meta_gradient(torch.contiguous_format)
    assert not any(layouts)
    assert torch.allclose(fast_logits, plain_logits, rtol=0, atol=1e-12)
    assert ((fast_grad - plain_grad).norm() / plain_grad.norm()).item() < 1e-10


@pytest.mark.parametrize("fusion", FUSIONS.names())
def test_second_order_gradients_flow_through_every_fusion(fusion):
    torch.manual_seed(0)
    model = tiny_tabular_model(fusion=fusion)
    x = {m: torch.randn(6, 4, dtype=torch.float64) for m in ("tab0", "tab1")}
    mask = torch.tensor([[1, 1], [1, 0], [0, 1], [1, 1], [1, 1], [0, 1]], dtype=torch.bool)
    batch = Batch(x, mask, torch.tensor([0, 1, 2, 0, 1, 2]), ("tab0", "tab1"))
    _hvp_matches_finite_differences(model, batch)


@pytest.mark.parametrize("encoder", ["conv1d", "gru", "tokens"])
def test_clone_and_update_module_run_and_backpropagate(encoder):
    torch.manual_seed(0)
    modality, shape, make = example_input(encoder)
    model = build_model(ModelSpec({modality: shape}), ways=2, width=4, hidden=3, encoders={modality: encoder})
    batch = Batch({modality: make(4)}, torch.ones(4, 1, dtype=torch.bool), torch.tensor([0, 1, 0, 1]), (modality,))
    clone = clone_module(model)
    loss = torch.nn.functional.cross_entropy(clone(batch), batch.labels)
    grads = torch.autograd.grad(loss, list(clone.parameters()), create_graph=True, allow_unused=True)
    for p, g in zip(clone.parameters(), grads):
        if g is not None:
            p.update = -0.5 * g
    update_module(clone)
    after = clone(batch)
    assert not torch.allclose(after, model(batch)), "the clone must use its updated weights"
    torch.nn.functional.cross_entropy(after, batch.labels).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.encoders[modality].parameters())


def test_pretrained_text_encoder_loads_offline_and_stays_frozen(monkeypatch):
    from metafusion.models.encoders.text import FrozenMiniLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    frozen = FrozenMiniLM()
    feats = frozen(["a spoken seven", "a handwritten letter", "a spoken seven"])
    before = [p.clone() for p in frozen.model.parameters()]
    from metafusion.algorithms import MAML

    model = build_model(ModelSpec({"text": (384,)}), ways=2, width=8, hidden=8, encoders={"text": "minilm"})
    algo = MAML(model, inner_lr=0.5, inner_steps=2, inner_lr_test=0.5, inner_steps_test=2)
    batch = Batch({"text": feats[:2]}, torch.ones(2, 1, dtype=torch.bool), torch.tensor([0, 1]), ("text",))
    learner = algo.adapt(batch)
    adapted = dict(learner.named_parameters())
    assert not torch.equal(adapted["encoders.text.proj.mlp.0.weight"], model.encoders.text.proj.mlp[0].weight)
    assert all(torch.equal(a, b) for a, b in zip(before, frozen.model.parameters()))


def test_a_sample_with_none_of_the_models_modalities_gets_the_head_bias_not_nan(small_synthetic):
    """model.modalities=[image] on data where some samples lack the image: those samples get z = 0,
    and gradients stay finite, so a single-modality model can run on the fused model's episodes."""
    from metafusion.algorithms import MAML
    from metafusion.config import load_config
    from metafusion.engine import build_experiment

    data = small_synthetic.with_missing(0.5, seed=1)
    overrides = {
        "model.modalities": ["image"],
        "model.width": 8,
        "model.hidden": 8,
        "data.val_episodes": 1,
        "data.test_episodes": 2,
    }
    exp = build_experiment(load_config(None, overrides), data)
    fused = build_experiment(load_config(None, {**overrides, "model.modalities": None}), data)
    assert exp.model.modalities == ("image",) and len(fused.model.modalities) == 4
    episodes = exp.test_episodes()
    assert [e.fingerprint() for e in episodes] == [e.fingerprint() for e in fused.test_episodes()]
    query = episodes[0].query
    blind = ~query.present("image")
    assert blind.any() and not blind.all()
    logits = exp.model(query)
    assert torch.isfinite(logits).all()
    assert torch.allclose(logits[blind], exp.model.head.linear.bias.expand(int(blind.sum()), -1))
    algo = MAML(exp.model, inner_lr=0.1, inner_steps=1, inner_lr_test=0.1, inner_steps_test=1)
    algo.meta_backward(episodes)
    assert all(torch.isfinite(p.grad).all() for p in algo.parameters() if p.grad is not None)


def _episode_attention_at_zero_is_the_seed(fusion, strength: str, modalities: int) -> None:
    """With its episode term's strength at 0 the fusion is the seed's attention; afterwards the strength is 1
    and the seed's scores are 0, so that the episode term alone decides."""
    seed = AttentionFusion(modalities, 8)
    seed.score.load_state_dict(fusion.score.state_dict())
    h, mask = torch.randn(6, modalities, 8), torch.ones(6, modalities, dtype=torch.bool)
    mask[1, -1] = False
    with torch.no_grad():
        getattr(fusion, strength).zero_()
        assert torch.allclose(fusion(h, mask)[0], seed(h, mask)[0])
        getattr(fusion, strength).fill_(1.0)
        fusion.score.weight.zero_(), fusion.score.bias.zero_()


def _weights_against_the_support_set_do_not_depend_on_the_batch(fusion: str) -> None:
    from metafusion.models.execution import support_statistics

    spec = ModelSpec({"a": (4,), "b": (4,)})
    model = build_model(spec, ways=3, width=8, hidden=8, fusion=fusion, encoders={"a": "mlp", "b": "mlp"})
    support = _batch({m: torch.randn(6, 4) for m in "ab"})
    queries = _batch({m: torch.randn(5, 4) for m in "ab"})
    with support_statistics(model, support):
        together = model.modality_weights(queries)
        alone = model.modality_weights(queries.index(torch.tensor([2])))
    assert torch.allclose(together[2], alone[0])


def test_agreement_attention_is_the_seed_at_beta_zero_and_weighs_down_a_disagreeing_modality():
    from metafusion.models.fusion import AgreementAttention

    torch.manual_seed(0)
    fusion = AgreementAttention(3, 8)
    _episode_attention_at_zero_is_the_seed(fusion, "beta", 3)
    # five classes, each the same direction in every modality; the last sample's modality 0 shows class 3
    classes = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    h = torch.stack([classes[[0, 1, 2, 3, 4, 0]]] * 3, dim=1)  # (6, 3, 8)
    h[5, 0] = classes[3]
    _, weights = fusion(h, torch.ones(6, 3, dtype=torch.bool))
    assert weights[5, 0] < 0.5 * weights[5, 1] and torch.isclose(weights[5, 1], weights[5, 2])
    _weights_against_the_support_set_do_not_depend_on_the_batch("agreement")


def test_task_aware_attention_is_the_seed_at_gamma_zero_and_weighs_down_a_modality_that_cannot_separate_the_task():
    from metafusion.models.fusion import TaskAwareAttention

    torch.manual_seed(0)
    fusion = TaskAwareAttention(2, 8)
    _episode_attention_at_zero_is_the_seed(fusion, "gamma", 2)
    # modality 0 places the five samples far apart, modality 1 nearly on one point: weights follow the
    # mean pairwise cosine distances, the same for every sample of the task
    base = torch.randn(8)
    h = torch.stack([torch.randn(5, 8), base + 0.1 * torch.randn(5, 8)], dim=1)
    _, weights = fusion(h, torch.ones(5, 2, dtype=torch.bool))
    unit = torch.nn.functional.normalize(h, dim=-1)
    spread = torch.stack([(1 - unit[:, i] @ unit[:, i].t()).sum() / 20 for i in range(2)])
    assert torch.allclose(weights, (spread / spread.sum()).expand(5, 2), atol=1e-5)
    assert (weights[:, 1] < 0.1 * weights[:, 0]).all()
    _weights_against_the_support_set_do_not_depend_on_the_batch("task")


def test_matched_attention_is_the_seed_at_beta_zero_and_its_trained_matcher_weighs_down_a_swapped_modality():
    from metafusion.models.fusion import MatchedAttention

    torch.manual_seed(0)
    fusion = MatchedAttention(3, 8)
    _episode_attention_at_zero_is_the_seed(fusion, "beta", 3)
    # three views of one latent through fixed linear maps; the matcher alone learns from the contrastive loss
    maps = torch.randn(3, 8, 8)
    views = lambda latent: torch.einsum("bk,mkd->bmd", latent, maps)  # noqa: E731
    mask = torch.ones(64, 3, dtype=torch.bool)
    optimizer = torch.optim.Adam(fusion.matchers.parameters(), lr=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        fusion.auxiliary_loss(views(torch.randn(64, 8)), mask).backward()
        optimizer.step()
    h = views(torch.randn(6, 8)).requires_grad_()
    assert fusion.auxiliary_loss(h, mask[:6]) < 0.5 * math.log(6)  # each entry picks out its own sample
    fusion.auxiliary_loss(h, mask[:6]).backward()
    assert h.grad is None  # the matcher reads detached features: its loss leaves the classifier's alone
    swapped = h.detach().clone()
    swapped[5, 0] = views(torch.randn(1, 8))[0, 0]  # sample 5's first modality is another sample's
    with torch.no_grad():
        fusion.beta.fill_(5.0)
        _, weights = fusion(swapped, mask[:6])
    assert weights[5, 0] < 0.5 * weights[5, 1] and weights[5, 0] < 0.5 * weights[5, 2]
    assert (weights[:5].max(1).values / weights[:5].min(1).values < 1.5).all()  # matched samples: near uniform
