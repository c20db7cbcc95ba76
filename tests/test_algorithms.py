"""Each algorithm proven against a reference (float64, tiny models), and shown to learn."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_episode, tiny_tabular_model

from metafusion.algorithms import ALGORITHMS, FOMAML, MAML, Centroid, MetaSGD, ProtoNet, Reptile
from metafusion.algorithms.centroid import CentroidOptions
from metafusion.algorithms.maml import MAMLOptions
from metafusion.algorithms.protonet import ProtoNetOptions
from metafusion.algorithms.reptile import ReptileOptions
from metafusion.config import load_config
from metafusion.engine import build_experiment, meta_test, meta_train
from metafusion.engine.resolve import resolve

COMMON = dict(inner_lr=0.3, inner_steps=2, inner_lr_test=0.3, inner_steps_test=2)


def _flat(params):
    return torch.cat([p.reshape(-1) for p in params])


def _gradient(model):
    return _flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()])


def _query_loss_after_adaptation(model, episode, lr, steps):
    """Reference: plain SGD steps written out with torch.func, then the query loss."""
    params = dict(model.named_parameters())
    for _ in range(steps):
        loss = F.cross_entropy(torch.func.functional_call(model, params, (episode.support,)), episode.support.labels)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        params = {k: v - lr * g for (k, v), g in zip(params.items(), grads)}
    return F.cross_entropy(torch.func.functional_call(model, params, (episode.query,)), episode.query.labels)


def test_maml_meta_gradient_equals_finite_differences():
    torch.manual_seed(0)
    model, episode = tiny_tabular_model(), tiny_episode()
    algo = MAML(model, **COMMON)
    algo.meta_backward([episode])
    grad = _flat([p.grad for p in model.parameters()])
    theta = _flat(model.parameters()).detach()
    eps = 1e-6
    for seed in range(3):
        v = torch.randn(theta.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        losses = []
        for sign in (1, -1):
            torch.nn.utils.vector_to_parameters(theta + sign * eps * v, model.parameters())
            losses.append(_query_loss_after_adaptation(model, episode, 0.3, 2).item())
        torch.nn.utils.vector_to_parameters(theta, model.parameters())
        fd = (losses[0] - losses[1]) / (2 * eps)
        assert abs(fd - grad @ v) <= 1e-5 * max(1.0, abs(fd)), (fd, (grad @ v).item())


def test_fomaml_is_the_gradient_at_the_adapted_parameters():
    torch.manual_seed(0)
    model, episode = tiny_tabular_model(), tiny_episode()
    second = copy.deepcopy(model)
    FOMAML(model, **COMMON).meta_backward([episode])
    fo_grad = _flat([p.grad for p in model.parameters()])
    # Reference: adapt without second-order terms, then the query gradient at the adapted weights.
    adapted = copy.deepcopy(model)
    opt = torch.optim.SGD(adapted.parameters(), lr=0.3)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(adapted(episode.support), episode.support.labels).backward()
        opt.step()
    adapted.zero_grad()
    F.cross_entropy(adapted(episode.query), episode.query.labels).backward()
    assert torch.allclose(fo_grad, _flat([p.grad for p in adapted.parameters()]), atol=1e-12)
    MAML(second, **COMMON).meta_backward([episode])
    so_grad = _flat([p.grad for p in second.parameters()])
    assert (so_grad - fo_grad).norm() > 1e-3 * so_grad.norm()


@pytest.mark.parametrize("algo_class", [MAML, FOMAML, MetaSGD])
def test_the_inner_loop_matches_learn2learns_clone_and_update(algo_class):
    """The reference: learn2learn's clone() and differentiable update (adapt), on a copy of the model. The
    meta-gradient (MetaSGD's learned rates' too) and the adapted learner's logits agree."""
    from metafusion._learn2learn import MAML as L2LMAML
    from metafusion._learn2learn import MetaSGD as L2LMetaSGD

    torch.manual_seed(0)
    model, episode = tiny_tabular_model(), tiny_episode()
    reference = copy.deepcopy(model)
    algo = algo_class(model, **COMMON)
    first_order = algo_class is FOMAML
    if algo_class is MetaSGD:
        wrapper = L2LMetaSGD(reference, lr=0.3, first_order=False)
    else:
        wrapper = L2LMAML(reference, lr=0.3, first_order=first_order, allow_unused=True)

    def adapted(steps):
        learner = wrapper.clone()
        for _ in range(steps):
            learner.adapt(F.cross_entropy(learner(episode.support), episode.support.labels))
        return learner

    algo.meta_backward([episode])
    F.cross_entropy(adapted(2)(episode.query), episode.query.labels).backward()
    assert torch.allclose(_gradient(model), _gradient(reference), atol=1e-12)
    if algo_class is MetaSGD:
        assert torch.allclose(_flat([r.grad for r in algo.wrapper.lrs]), _flat([r.grad for r in wrapper.lrs]))
    expected = adapted(2)(episode.query).detach()
    assert torch.allclose(algo.adapt(episode.support)(episode.query), expected, atol=1e-12)


def test_first_order_warmup_gives_fomamls_gradient_then_mamls():
    torch.manual_seed(0)
    model, episode = tiny_tabular_model(), tiny_episode()
    grads = {}
    for name, algo_class, options in [
        ("fo", FOMAML, None),
        ("so", MAML, None),
        ("warm", MAML, MAMLOptions(first_order_warmup=0.4)),
    ]:
        algo = algo_class(copy.deepcopy(model), options, **COMMON)
        for progress in (0.0, 0.39, 0.4, 1.0):
            algo.model.zero_grad(set_to_none=True)
            algo.set_progress(progress)
            algo.meta_backward([episode])
            grads[name, progress] = _flat([p.grad for p in algo.model.parameters()])
    for progress in (0.0, 0.39, 0.4, 1.0):
        expected = grads["fo" if progress < 0.4 else "so", progress]
        assert torch.allclose(grads["warm", progress], expected, atol=1e-12)
    assert not torch.allclose(grads["fo", 0.0], grads["so", 0.0])
    with pytest.raises(ValueError, match=r"algo.first_order_warmup is an option of anil and maml"):
        resolve(load_config(None, {"algo.name": "fomaml", "algo.first_order_warmup": 0.5}))
    with pytest.raises(ValueError, match=r"fraction of the run in \[0, 1\)"):
        resolve(load_config(None, {"algo.name": "maml", "algo.first_order_warmup": 1.0}))


def _sgd_reptile(model, episodes, lr, steps):
    kwargs = dict(COMMON, inner_lr=lr, inner_steps=steps)
    return Reptile(model, ReptileOptions(inner_batch=100, inner_optimizer="sgd"), **kwargs)


def test_reptile_one_step_matches_closed_form():
    torch.manual_seed(0)
    model = tiny_tabular_model()
    episodes = [tiny_episode(seed=1), tiny_episode(seed=2)]
    theta = _flat(model.parameters()).detach().clone()
    grads = []
    for ep in episodes:
        model.zero_grad()
        F.cross_entropy(model(ep.support), ep.support.labels).backward()
        grads.append(_flat([p.grad for p in model.parameters()]).clone())
    model.zero_grad()
    algo = _sgd_reptile(model, episodes, lr=0.1, steps=1)
    algo.meta_backward(episodes)
    torch.optim.SGD(model.parameters(), lr=1.0).step()  # epsilon = 1
    expected = theta - 0.1 * (grads[0] + grads[1]) / 2  # theta + mean(theta~ - theta)
    assert torch.allclose(_flat(model.parameters()), expected, atol=1e-12)


@pytest.mark.parametrize("name", ["reptile", "protonet", "maml"])
def test_a_fusions_own_loss_adds_its_gradient_to_the_meta_gradient(name):
    """Matched attention's contrastive loss on the meta-batch's pooled samples adds to whatever meta-gradient
    the algorithm left (Reptile's difference as much as a loss's gradient); the seed's attention adds nothing."""
    from metafusion.data import Batch

    torch.manual_seed(0)
    episodes = [tiny_episode(seed=1), tiny_episode(seed=2)]
    grads = {}
    for with_auxiliary in (False, True):
        torch.manual_seed(1)
        model = tiny_tabular_model(fusion="matched")
        algo = ALGORITHMS.get(name)(model, **COMMON) if name != "reptile" else _sgd_reptile(model, episodes, 0.1, 1)
        algo.meta_backward(episodes)
        if with_auxiliary:
            assert set(algo.auxiliary_backward(episodes)) == {"auxiliary_loss"}
        grads[with_auxiliary] = _gradient(model)
    model.zero_grad()
    pooled = Batch.cat([b for e in episodes for b in (e.support, e.query)])
    model.auxiliary_loss(pooled).backward()
    expected = grads[False] + _gradient(model)
    assert torch.allclose(grads[True], expected, atol=1e-10) and not torch.equal(grads[True], grads[False])
    seed = ProtoNet(tiny_tabular_model(), **COMMON)
    assert seed.auxiliary_backward(episodes) == {}


def test_reptile_k_steps_match_a_hand_rolled_loop():
    torch.manual_seed(0)
    model = tiny_tabular_model()
    episode = tiny_episode(seed=3)
    hand = copy.deepcopy(model)
    opt = torch.optim.SGD(hand.parameters(), lr=0.05)
    for _ in range(4):
        opt.zero_grad()
        F.cross_entropy(hand(episode.support), episode.support.labels).backward()
        opt.step()
    algo = _sgd_reptile(model, [episode], lr=0.05, steps=4)
    algo.meta_backward([episode])  # .grad = -(theta~ - theta)
    adapted = _flat([p - p.grad for p in model.parameters()])
    assert torch.allclose(adapted, _flat(hand.parameters()), atol=1e-12)


def test_reptile_inner_adam_matches_torch_adam_with_beta1_zero():
    """The functional inner loop against torch's Adam (the paper's beta1 = 0), over steps that share moments."""
    torch.manual_seed(0)
    model, episode = tiny_tabular_model(), tiny_episode(seed=3)
    hand = copy.deepcopy(model)
    opt = torch.optim.Adam(hand.parameters(), lr=0.01, betas=(0.0, 0.999), eps=1e-8)
    for _ in range(4):
        opt.zero_grad()
        F.cross_entropy(hand(episode.support), episode.support.labels).backward()
        opt.step()
    algo = Reptile(model, ReptileOptions(inner_batch=100), **dict(COMMON, inner_lr=0.01, inner_steps=4))
    algo.meta_backward([episode])  # .grad = -(theta~ - theta)
    assert torch.allclose(_flat([p - p.grad for p in model.parameters()]), _flat(hand.parameters()), atol=1e-12)


def test_fine_tune_head_fit_matches_torch_sgd_with_momentum_and_weight_decay():
    from metafusion.algorithms.finetune import MOMENTUM, WEIGHT_DECAY, fused_features

    episode = tiny_episode(ways=3, seed=2)
    algo = ALGORITHMS.build("finetune", tiny_tabular_model(ways=3), train_classes=[0, 1, 2], **COMMON)
    algo.inner_lr_test = 0.05
    z, mask = fused_features(algo.model, episode.support)
    head = algo.new_head(3).double()
    opt = torch.optim.SGD(head.parameters(), lr=0.05, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(head(z.detach(), mask), episode.support.labels).backward()
        opt.step()
    learner = algo.adapt(episode.support, steps=5)
    assert torch.allclose(_flat(learner.head.parameters()), _flat(head.parameters()), atol=1e-12)


def test_metasgd_learns_its_inner_learning_rates():
    torch.manual_seed(0)
    model = tiny_tabular_model()
    algo = MetaSGD(model, **COMMON)
    before = [lr.detach().clone() for lr in algo.wrapper.lrs]
    opt = torch.optim.Adam(algo.parameters(), lr=1e-2)
    algo.meta_backward([tiny_episode()])
    opt.step()
    assert any(not torch.equal(b, a) for b, a in zip(before, algo.wrapper.lrs))


def test_maml_learned_per_layer_rates_are_meta_learned():
    torch.manual_seed(0)
    plain_model, learned_model = tiny_tabular_model(), tiny_tabular_model()
    learned_model.load_state_dict(plain_model.state_dict())
    plain = MAML(plain_model, **COMMON)
    learned = MAML(learned_model, MAMLOptions(learn_inner_lr=True), **COMMON)
    assert plain.layer_lrs is None and len(learned.layer_lrs) == len(list(learned_model.parameters()))
    episode = tiny_episode()
    plain.meta_backward([episode])
    learned.meta_backward([episode])
    # Starting at inner_lr, the learned rates reproduce plain MAML's meta-gradient exactly ...
    assert torch.allclose(
        _flat([p.grad for p in plain_model.parameters()]),
        _flat([p.grad for p in learned_model.parameters()]),
        atol=1e-12,
    )
    # ... and receive a gradient of their own, so the outer optimizer changes them.
    assert all(r.grad is not None for r in learned.layer_lrs)
    torch.optim.Adam(learned.parameters(), lr=1e-2).step()
    assert any(r.item() != 0.3 for r in learned.layer_lrs)


def test_protonet_logits_are_negative_squared_distances():
    torch.manual_seed(0)
    model, episode = tiny_tabular_model(), tiny_episode()
    learner = ProtoNet(model, **COMMON).adapt(episode.support)
    with torch.no_grad():
        zs, zq = model.features(episode.support), model.features(episode.query)
        protos = torch.stack([zs[episode.support.labels == c].mean(0) for c in range(3)])
        expected = torch.stack([-((zq - p) ** 2).sum(1) for p in protos], 1)
        assert torch.allclose(learner(episode.query), expected, atol=1e-10)


def test_non_transductive_prediction_sees_one_query_at_a_time():
    torch.manual_seed(0)
    model, episode = tiny_tabular_model(), tiny_episode()
    algo = MAML(model, **COMMON)
    learner = algo.adapt(episode.support)
    together = algo.predict(learner, episode)
    algo.transductive = False
    alone = algo.predict(learner, episode)
    # An MLP has no batch statistics, so both modes must agree exactly on it ...
    assert torch.allclose(together, alone, atol=1e-12)
    # ... and with batch-statistics BatchNorm they differ (each query is normalised with the support set only).
    from metafusion.data import EpisodeSampler, make_synthetic

    ds = make_synthetic(num_classes=30, samples_per_class=6, seed=0).select_modalities(["image"])
    cfg = load_config(None, {"model.width": 8, "model.hidden": 8, "data.queries": 1, "data.val_episodes": 1})
    conv = MAML(build_experiment(cfg, ds).model, **COMMON)
    ep = EpisodeSampler(ds, "train", 5, 1, 1, seed=0).sample()
    learner = conv.adapt(ep.support)
    t = conv.predict(learner, ep)
    conv.transductive = False
    assert not torch.allclose(t, conv.predict(learner, ep))


@pytest.mark.parametrize(
    "encoders",
    [
        {"image": "conv4", "audio": "melcnn", "text": "tokens", "tabular": "mlp"},
        {"strokes": "conv1d", "tabular": "mlp"},
        {"strokes": "gru", "image": "resnet18"},
    ],
)
@pytest.mark.parametrize("fusion", ["attention", "concat", "mean", "late", "transformer", "agreement", "task"])
def test_batched_non_transductive_prediction_equals_one_forward_per_query(encoders, fusion):
    """The vmapped protocol gives the loop's logits, with missing modalities in support and query."""
    from test_models import _batch, example_input

    from metafusion.algorithms.base import predict_each_alone, predict_each_alone_loop
    from metafusion.models import ModelSpec, build_model

    torch.manual_seed(0)
    shapes = {m: example_input(e)[1] for m, e in encoders.items()}
    inputs = {m: example_input(e)[2](11) for m, e in encoders.items()}
    mask = torch.rand(11, len(encoders)) > 0.3
    mask[:, 0] |= ~mask.any(1)  # every sample carries at least one modality
    model = build_model(ModelSpec(shapes), 3, width=8, hidden=8, fusion=fusion, encoders=encoders)
    batch = _batch(inputs, mask)
    support, query = batch.index(slice(0, 4)), batch.index(slice(4, 11))
    with torch.no_grad():
        assert torch.allclose(
            predict_each_alone(model, support, query), predict_each_alone_loop(model, support, query), atol=1e-5
        )


@pytest.mark.parametrize(
    "name,steps,scope,proto_init",
    [
        ("maml", 1, "all", False),
        ("maml", 2, "all", False),
        ("maml", 1, "all", True),
        ("fomaml", 2, "all", False),
        ("anil", 1, "head", False),
    ],
)
def test_task_batched_meta_gradient_equals_the_per_task_loop(name, steps, scope, proto_init):
    """algo.task_batched (one vmapped network for the whole meta-batch) computes the loop's meta-gradient
    (float64) on an image + tabular model with BatchNorm, so second-order terms through it are checked."""
    from metafusion.data import EpisodeSampler, make_synthetic

    ds = make_synthetic(num_classes=30, samples_per_class=8, seed=0).select_modalities(["image", "tabular"])
    cfg = load_config(
        None,
        {
            "algo.name": name,
            "model.width": 8,
            "model.hidden": 8,
            "model.adapt": scope,
            "data.queries": 2,
            "data.val_episodes": 1,
        },
    )
    model = build_experiment(cfg, ds).model.double()
    sampler = EpisodeSampler(ds, "train", 3, 2, 2, seed=0)
    tasks = [sampler.sample().to("cpu", torch.float64) for _ in range(3)]
    grads = {}
    for batched in (False, True):
        algo = ALGORITHMS.build(
            name,
            model,
            ALGORITHMS.get(name).Options(task_batched=batched, proto_init=proto_init),
            inner_lr=0.3,
            inner_steps=steps,
            inner_lr_test=0.3,
            inner_steps_test=1,
            adapt_scope=scope,
        )
        model.zero_grad(set_to_none=True)
        metrics = algo.meta_backward(tasks)
        grads[batched] = _gradient(model)  # Proto-MAML's head has none: it is replaced in every task
        assert 0 <= metrics["accuracy"] <= 1
    assert grads[False].abs().max() > 0
    assert ((grads[True] - grads[False]).norm() / grads[False].norm()).item() < 1e-10


def test_task_batched_refuses_what_it_cannot_batch():
    with pytest.raises(ValueError, match="algo.task_batched is an option of anil and fomaml and maml"):
        resolve(load_config(None, {"algo.name": "reptile", "algo.task_batched": True}))
    with pytest.raises(ValueError, match="learned inner learning rates"):
        MetaSGD(tiny_tabular_model(), MAMLOptions(task_batched=True), **COMMON)
    model, a, b = tiny_tabular_model(), tiny_episode(seed=0), tiny_episode(seed=1)
    b.query.mask[0, 1] = False  # one query sample lacks a modality: the batched network cannot branch per task
    with pytest.raises(ValueError, match="same modality mask"):
        MAML(model, MAMLOptions(task_batched=True), **COMMON).meta_backward([a, b])


def test_reptile_warm_test_optimizer_steps_from_the_training_adams_moments():
    """``warm_test_optimizer``: test-time Adam (beta1 = 0) continues from the second moments and step count that
    meta-training's inner loop left, as the Reptile paper's evaluation does; by default it starts fresh, whose
    first step moves every weight by the learning rate (g / sqrt(g^2)). Neither disturbs the training state."""
    torch.manual_seed(0)
    model, episode = tiny_tabular_model(), tiny_episode(seed=4)
    kwargs = dict(inner_lr=1e-3, inner_steps=3, inner_lr_test=0.01, inner_steps_test=1)
    algo = Reptile(model, ReptileOptions(inner_batch=100, warm_test_optimizer=True), **kwargs)
    algo.meta_backward([tiny_episode(seed=5), tiny_episode(seed=6)])  # 2 tasks x 3 inner Adam steps
    v0 = list(algo._unflatten(algo.adam.second_moment.clone(), algo.layout).values())
    assert set(algo.adam.steps.tolist()) == {6}

    def check_one_step(episode, warm):
        model.zero_grad()
        F.cross_entropy(model(episode.support), episode.support.labels).backward()
        algo.warm_test_optimizer = warm
        learner = algo.adapt(episode.support)
        for p, q, v in zip(model.parameters(), learner.parameters(), v0):
            g, beta2, t = p.grad, 0.999, 7
            if warm and v.shape == p.shape:
                step = g / ((beta2 * v + (1 - beta2) * g * g).sqrt() / math.sqrt(1 - beta2**t) + 1e-8)
            else:
                step = g / (g.abs() + 1e-8)
            assert torch.allclose(q, p - 0.01 * step, atol=1e-10)

    check_one_step(episode, warm=True)
    check_one_step(episode, warm=False)
    algo.reset_head(2)  # a user's task of another number of classes: the new head starts fresh, the rest warm
    check_one_step(tiny_episode(ways=2, seed=7), warm=True)
    assert torch.equal(algo.adam.second_moment, torch.cat([v.flatten() for v in v0]))
    assert set(algo.adam.steps.tolist()) == {6}
    with pytest.raises(ValueError, match="warm_test_optimizer needs algo.inner_optimizer=adam"):
        resolve(
            load_config(None, {"algo.name": "reptile", "algo.inner_optimizer": "sgd", "algo.warm_test_optimizer": True})
        )
    with pytest.raises(ValueError, match="algo.warm_test_optimizer is an option of reptile"):
        resolve(load_config(None, {"algo.name": "maml", "algo.warm_test_optimizer": True}))


def test_reptile_loads_the_torch_adam_state_metafusion_0_1_checkpointed():
    """metafusion 0.1 kept torch's Adam as Reptile's inner optimizer: its state (per adapted parameter, by index)
    becomes the flat second moment and step counts."""
    model = tiny_tabular_model()
    params = list(model.parameters())
    old = torch.optim.Adam(params, lr=1e-3, betas=(0.0, 0.999))
    for p in params:
        p.grad = torch.randn_like(p)
    old.step()
    old.step()
    algo = Reptile(model, ReptileOptions(inner_batch=100), **COMMON)
    algo.load_state_dict({"inner_optimizer": old.state_dict(), "generator": torch.Generator().get_state()})
    expected = torch.cat([old.state[p]["exp_avg_sq"].flatten() for p in params])
    assert torch.equal(algo.adam.second_moment, expected) and set(algo.adam.steps.tolist()) == {2.0}


# Batched evaluation (every episode adapted at once under vmap) against the per-episode loop, float64.
# Two-shot supports of 3 ways with inner_batch 4 make Reptile cycle through shuffled mini-batches.
BATCHED_CASES = [
    ("maml", {}),
    ("maml", {"algo.learn_inner_lr": True}),
    ("maml", {"algo.proto_init": True}),
    ("metasgd", {}),
    ("anil", {}),
    ("fomaml", {"algo.transductive": False}),
    ("reptile", {"algo.inner_batch": 4}),
    ("reptile", {"algo.inner_optimizer": "sgd"}),
    ("reptile", {"algo.transductive": False}),
    ("reptile", {"algo.warm_test_optimizer": True, "algo.inner_batch": 4}),
    ("finetune", {}),
    ("protonet", {}),
    ("protonet", {"algo.metric": "cosine", "algo.transductive": False}),
]


@pytest.mark.parametrize("modalities", [["image", "tabular"], ["text", "tabular"]])
@pytest.mark.parametrize("name,settings", BATCHED_CASES)
def test_batched_evaluation_equals_the_per_episode_loop(name, settings, modalities, small_synthetic):
    """Same logits-derived metrics and modality weights, with BatchNorm (image) and with missing
    modalities (so the episodes fall into several same-mask groups)."""
    ds = small_synthetic.select_modalities(modalities).with_missing(0.3, seed=1)
    cfg = load_config(
        None,
        {
            "algo.name": name,
            "model.width": 8,
            "model.hidden": 8,
            "data.val_episodes": 6,
            "data.ways": 3,
            "data.shots": 2,
            "data.queries": 3,
            "algo.inner_steps_test": 3,
            **settings,
        },
    )
    exp = build_experiment(cfg, ds)
    if settings.get("algo.warm_test_optimizer"):  # moments for the test-time Adam to start from
        exp.algorithm.meta_backward(exp.val_episodes[:2])
    exp.model.double()
    episodes = [e.to("cpu", torch.float64) for e in exp.val_episodes]
    torch.manual_seed(0)  # the fine-tune baseline draws each episode's fresh head from the global RNG
    loop = exp.algorithm.evaluate_many(episodes, batched=False)
    torch.manual_seed(0)
    exp.algorithm.evaluate = None  # the batched path must not fall back to the loop
    batched = exp.algorithm.evaluate_many(episodes, batched=True)
    for a, b in zip(loop, batched):
        assert torch.allclose(a.logits, b.logits, atol=1e-10, rtol=0)
        assert (a.weights is None) == (b.weights is None)
        if a.weights is not None:
            assert torch.allclose(a.weights, b.weights, atol=1e-10, rtol=0)


def test_batched_evaluation_is_used_where_it_pays(small_synthetic):
    from metafusion.models.execution import episodes_vmap_pays

    settings = {"model.width": 8, "model.hidden": 8, "data.val_episodes": 1}
    mlp = build_experiment(load_config(None, settings), small_synthetic.select_modalities(["tabular"])).model
    conv = build_experiment(load_config(None, settings), small_synthetic.select_modalities(["image"])).model
    assert episodes_vmap_pays(mlp, "cpu") and not episodes_vmap_pays(conv, "cpu")
    assert episodes_vmap_pays(conv, "cuda")
    with pytest.raises(ValueError, match="algo.batched_eval='sometimes' is not valid; choose one of: auto, on, off"):
        load_config(None, {"algo.batched_eval": "sometimes"})


def test_metasgd_resizes_its_head_rates_with_the_head():
    """A user's task with another number of classes: the learned rates of the new head keep the old
    head's mean rate and take the new shape, so adaptation runs (it failed on the shape before)."""
    model = tiny_tabular_model(ways=5)
    algo = MetaSGD(model, **COMMON)
    with torch.no_grad():
        for rate in algo.wrapper.lrs:
            rate.uniform_(0.1, 0.5)
    head_mean = [
        r.mean().item() for (n, _), r in zip(model.named_parameters(), algo.wrapper.lrs) if n.startswith("head.")
    ]
    algo.reset_head(3)
    for (n, p), rate in zip(model.named_parameters(), algo.wrapper.lrs):
        assert rate.shape == p.shape, n
    new_head = [r for (n, _), r in zip(model.named_parameters(), algo.wrapper.lrs) if n.startswith("head.")]
    assert [r.unique().item() for r in new_head] == pytest.approx(head_mean)
    episode = tiny_episode(ways=3)
    assert algo.evaluate(episode).logits.shape == (len(episode.query), 3)
    assert torch.allclose(algo.evaluate_many([episode], batched=True)[0].logits, algo.evaluate(episode).logits)


def test_the_fine_tune_baseline_draws_its_task_head_from_its_seed_not_the_global_rng():
    """An evaluation depends on the weights and the episode only, not on what ran before it."""
    episode = tiny_episode(ways=3)
    algo = ALGORITHMS.build("finetune", tiny_tabular_model(ways=3), train_classes=[0, 1, 2, 3], seed=7, **COMMON)
    results = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        results.append(algo.evaluate(episode).logits)
    assert torch.equal(results[0], results[1])
    other = ALGORITHMS.build("finetune", tiny_tabular_model(ways=3), train_classes=[0, 1, 2, 3], seed=8, **COMMON)
    other.model.load_state_dict(algo.model.state_dict())
    assert not torch.equal(other.evaluate(episode).logits, results[0])  # the seed is what fixes the head


def test_reptile_keeps_a_parameter_without_gradient_where_a_modality_is_absent():
    """A mini-batch without a modality gives its encoder a zero gradient: one inner loop (the batched form
    and one episode at a time alike) leaves that encoder's weights where they are."""
    model, episode = tiny_tabular_model(), tiny_episode()
    episode.support.mask[:, 1] = False
    algo = Reptile(model, ReptileOptions(inner_batch=10), **COMMON)
    learner = algo.adapt(episode.support)
    absent = [n for n, _ in model.named_parameters() if n.startswith("encoders.tab1.")]
    moved = dict(learner.named_parameters())
    assert absent and all(torch.equal(moved[n], dict(model.named_parameters())[n]) for n in absent)
    assert torch.allclose(algo.evaluate_many([episode], batched=True)[0].logits, algo.evaluate(episode).logits)


@pytest.mark.parametrize("name", ALGORITHMS.names())
def test_adapt_never_modifies_the_meta_model(name, small_synthetic):
    cfg = load_config(
        None, {"algo.name": name, "model.width": 8, "model.hidden": 8, "data.val_episodes": 1, "data.queries": 2}
    )
    exp = build_experiment(cfg, small_synthetic)
    state = {k: v.clone() for k, v in exp.algorithm.module.state_dict().items()}
    episode = exp.val_episodes[0]
    exp.algorithm.evaluate(episode)
    after = exp.algorithm.module.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state), "evaluation leaked into the meta-model"
    assert not any(b.numel() for n, b in exp.model.named_buffers() if "running" in n)  # no running stats


# Learning within seconds on an easy synthetic 5-way 1-shot task (tabular + text modalities).
@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ALGORITHMS.names() if n != "centroid"])  # centroid learns nothing
def test_each_algorithm_learns_well_above_chance_and_is_deterministic(name):
    from metafusion.data import make_synthetic

    data = make_synthetic(num_classes=60, samples_per_class=12, noise=0.7, seed=1).select_modalities(
        ["tabular", "text"]
    )
    overrides = {
        "algo.name": name,
        "model.width": 16,
        "model.hidden": 16,
        "data.queries": 5,
        "data.val_episodes": 5,
        "train.iterations": 30,
        "train.meta_batch": 4,
    }
    if name == "metasgd":  # one inner step at train and test (its protocol): give it more meta-steps
        overrides["train.iterations"] = 60
    if name == "reptile":
        overrides.update(
            {"data.train_shots": 5, "algo.inner_steps_test": 20, "algo.inner_lr": 0.01, "algo.inner_lr_test": 0.01}
        )
        # 20 test-time steps from random weights already solve most of this task: more meta-steps to improve on
        overrides["train.iterations"] = 60
    results, untrained = [], []
    for _ in range(2):
        exp = build_experiment(load_config(None, overrides), data)
        untrained.append(meta_test(exp.algorithm, exp.test_episodes(40)).accuracy_mean)
        meta_train(exp, None, quiet=True)
        results.append(meta_test(exp.algorithm, exp.test_episodes(40)).accuracy_mean)
    assert results[0] == results[1], "same seed, different numbers"
    assert results[0] > 0.5, f"{name}: {results[0]:.3f} (chance is 0.2)"
    assert results[0] > untrained[0], f"{name}: meta-training did not help ({untrained[0]:.3f} -> {results[0]:.3f})"


def test_centroid_is_the_nearest_mean_of_l2_normalised_modalities():
    model, episode = tiny_tabular_model(), tiny_episode(ways=3, shots=2, queries=3)
    episode.query.mask[0, 1] = False  # an absent modality contributes a zero block
    episode.query.inputs["tab1"][0] = 0.0

    def features(batch):  # written out: each modality L2-normalised, zeros where absent, concatenated
        blocks = [
            batch.inputs[m] / batch.inputs[m].norm(dim=1, keepdim=True).clamp_min(1e-12) * batch.mask[:, [j]]
            for j, m in enumerate(("tab0", "tab1"))
        ]
        return torch.cat(blocks, 1)

    zs, zq = features(episode.support), features(episode.query)
    protos = torch.stack([zs[episode.support.labels == c].mean(0) for c in range(3)])
    cosine = F.normalize(zq, dim=1) @ F.normalize(protos, dim=1).T
    learner = Centroid(model, **COMMON).adapt(episode.support)
    assert torch.allclose(learner(episode.query), 10 * cosine)
    euclid = Centroid(model, CentroidOptions(metric="euclidean"), **COMMON).adapt(episode.support)
    assert torch.allclose(euclid(episode.query), -(torch.cdist(zq, protos) ** 2))
    assert list(Centroid(model, **COMMON).parameters()) == []  # nothing to meta-learn


def test_centroid_reads_token_ids_as_a_bag_of_words():
    from metafusion.algorithms.nearest_mean import frozen_features
    from metafusion.data import Batch

    ids = torch.tensor([[3, 1, 3, 0], [2, 0, 0, 0]])  # 0 is padding
    batch = Batch({"text": ids}, torch.ones(2, 1, dtype=torch.bool), torch.tensor([0, 1]), ("text",))
    z = frozen_features(batch, ("text",), vocab_size=5)
    expected = F.normalize(torch.tensor([[1.0, 0, 2, 0], [0, 1, 0, 0]], dtype=z.dtype), dim=1)  # words 1..4
    assert torch.allclose(z, expected)


def test_protonet_cosine_uses_a_meta_learned_scale():
    model, episode = tiny_tabular_model(), tiny_episode()
    algo = ProtoNet(model, ProtoNetOptions(metric="cosine"), **COMMON)
    algo.meta_backward([episode])
    scale = algo.scale.log_scale
    assert scale.grad is not None and scale.grad.abs() > 0
    assert any(p is scale for p in algo.parameters())  # the outer optimizer updates it
    z_s, z_q = model.features(episode.support), model.features(episode.query)
    protos = torch.stack([z_s[episode.support.labels == c].mean(0) for c in range(episode.ways)])
    expected = scale.exp() * F.normalize(z_q, dim=1) @ F.normalize(protos, dim=1).T
    assert torch.allclose(algo.adapt(episode.support)(episode.query), expected.detach())


def test_proto_maml_starts_the_head_at_the_prototypes_and_trains_the_encoder_through_them():
    model, episode = tiny_tabular_model(), tiny_episode()
    algo = MAML(model, MAMLOptions(proto_init=True), **{**COMMON, "inner_steps_test": 0})
    z_s, z_q = model.features(episode.support), model.features(episode.query)
    c = torch.stack([z_s[episode.support.labels == k].mean(0) for k in range(episode.ways)])
    expected = 2 * z_q @ c.T - (c**2).sum(1)  # = -||z - c||^2 + ||z||^2: ProtoNet's ranking
    learner = algo.adapt(episode.support)
    assert torch.allclose(learner(episode.query), expected)
    algo.meta_backward([episode])
    head = model.head.linear
    assert head.weight.grad is None and head.bias.grad is None  # replaced by the prototypes in every task
    encoder = next(model.encoders["tab0"].parameters())
    assert encoder.grad is not None and encoder.grad.abs().sum() > 0


def test_a_diverged_episode_is_counted_and_its_queries_are_wrong():
    from metafusion.algorithms.base import classification_metrics
    from metafusion.engine import meta_test

    logits = torch.tensor([[1.0, 0.0], [float("nan"), 0.0], [0.0, 1.0]])
    m = classification_metrics(logits, torch.tensor([0, 0, 1]), ways=2)
    assert m["diverged"] and m["accuracy"] == pytest.approx(2 / 3)

    class Diverging(ProtoNet):  # the second episode's adapted learner outputs NaN
        calls = 0

        def adapt(self, support, steps=None):
            Diverging.calls += 1
            learner = super().adapt(support, steps)
            return (lambda batch: learner(batch) * float("nan")) if Diverging.calls == 2 else learner

    model = tiny_tabular_model()
    episodes = [tiny_episode(seed=s) for s in range(3)]
    result = meta_test(Diverging(model, batched_eval="off", **COMMON), episodes)  # adapt() is the loop's
    assert result.episodes_diverged == 1 and result.accuracies[1] == 0.0
    assert torch.isfinite(torch.tensor(result.loss))  # averaged over the finite episodes


def test_encoders_and_head_scope_keeps_the_fusion_fixed_in_the_inner_loop_only():
    """``model.adapt=encoders+head``: the inner loop moves encoders and head but not the (transformer)
    fusion, whose parameters still get a meta-gradient from the outer loop."""
    torch.manual_seed(0)
    model, episode = tiny_tabular_model(fusion="transformer"), tiny_episode()
    algo = MAML(model, adapt_scope="encoders+head", **COMMON)
    learner = algo.adapt(episode.support)
    for (name, before), after in zip(model.named_parameters(), learner.parameters()):
        moved = not torch.equal(before, after)
        assert moved != name.startswith("fusion."), name
    algo.meta_backward([episode])
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith("fusion.")
    )
