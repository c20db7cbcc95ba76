"""Pretrained encoders load the weights their packages ship (offline) and split exactly: the frozen part
followed by the trainable top computes what the whole pretrained network computes; the top's BatchNorms
keep their ImageNet statistics, and MAML differentiates through the top twice."""

import math

import pytest
import torch

from metafusion.models import ModelSpec, build_model
from metafusion.models.encoders.efficientnet import EfficientNetTop, FrozenEfficientNet, pretrained_network
from metafusion.models.encoders.pretrained import FeatureProjection
from metafusion.models.encoders.speech import FrozenSpeechEmbedding
from metafusion.models.encoders.text import BertLayerTop, FrozenMiniLM, MiniLMTop, pretrained_minilm

IMAGES = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(0))
TEXTS = ["set an alarm for seven", "what is my balance", "set an alarm for seven", "play some jazz"]


@pytest.mark.parametrize("variant", ["efficientnet-lite0", "efficientnet-lite2"])
def test_efficientnet_frozen_features_are_the_shipped_networks_pooled_features(variant):
    frozen = FrozenEfficientNet(variant, input_size=64, trainable=0)
    features = frozen(IMAGES)
    net = pretrained_network(variant, 64)
    with torch.no_grad():
        reference = net.extract_features(_lite(IMAGES, 64)).mean((2, 3))
    assert features.shape == (3, 1280) and torch.allclose(features, reference, atol=1e-4)
    grey = frozen(IMAGES[:, :1])  # a grey image is its channel replicated
    assert torch.allclose(grey, frozen(IMAGES[:, :1].expand(-1, 3, -1, -1)))


def _lite(images, size):
    return torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True) * 2 - 1


@pytest.mark.parametrize("blocks", [1, 2])
def test_efficientnet_frozen_part_and_trainable_top_compute_the_whole_network(blocks):
    below = FrozenEfficientNet("efficientnet-lite0", 64, blocks)(IMAGES)
    top = EfficientNetTop(pretrained_network("efficientnet-lite0", 64), blocks)
    top.train()  # the training loop's mode: the BatchNorms still use the ImageNet statistics
    assert all(not m.training for m in top.modules() if isinstance(m, torch.nn.BatchNorm2d))
    whole = FrozenEfficientNet("efficientnet-lite0", 64, 0)(IMAGES)
    assert torch.allclose(top(below), whole, atol=1e-4)


def test_maml_differentiates_through_a_pretrained_top_twice():
    from metafusion.algorithms import MAML
    from metafusion.data import Batch

    below = FrozenEfficientNet("efficientnet-lite0", 64, 1)(IMAGES.repeat(2, 1, 1, 1))  # 6 samples
    spec = ModelSpec({"image": tuple(below.shape[1:])})
    model = build_model(spec, ways=3, width=16, hidden=8, encoders={"image": "efficientnet-lite0"},
                        encoder_options={"image": {"input_size": 64, "trainable": 1}})  # fmt: skip
    assert model.encoders.image.pretrained is not None
    batch = Batch({"image": below}, torch.ones(6, 1, dtype=torch.bool), torch.tensor([0, 1, 2] * 2), ("image",))
    algo = MAML(model, inner_lr=0.1, inner_steps=1, inner_lr_test=0.1, inner_steps_test=1)
    from metafusion.data import Episode

    algo.meta_backward([Episode(batch.index(slice(0, 3)), batch.index(slice(3, 6)), 3, 1, 1, (0, 1, 2))])
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("encoders.image.pretrained")]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_minilm_frozen_features_are_deterministic_sentence_features():
    frozen = FrozenMiniLM(0)
    features = frozen(TEXTS)
    assert features.shape == (4, 384) and torch.isfinite(features).all()
    assert torch.allclose(features[0], features[2]) and not torch.allclose(features[0], features[1])


def test_the_multilingual_sentence_encoder_places_a_translation_near_its_original():
    from metafusion.models.encoders.multilingual import FrozenMultilingualUSE

    frozen = FrozenMultilingualUSE()
    texts = ["I forgot my password", "what will the weather be tomorrow", "我忘记了密码", "wie wird das Wetter morgen"]
    z = frozen(texts)
    assert z.shape == (4, 512) and torch.allclose(z.norm(dim=1), torch.ones(4), atol=1e-4)
    similarity = z @ z.T
    assert similarity[0, 2] > similarity[0, 3] + 0.3 and similarity[1, 3] > similarity[1, 2] + 0.3
    assert torch.equal(frozen(texts), z)


def test_the_written_out_bert_layer_is_the_libraries_layer():
    _, model = pretrained_minilm()
    layer = model.encoder.layer[-1]
    x, keep = torch.randn(2, 7, 384), torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    ours = BertLayerTop(layer, model.config.num_attention_heads)(x, keep)
    mask = (~keep)[:, None, None, :].float() * torch.finfo(torch.float32).min  # additive, as BERT takes it
    with torch.no_grad():
        theirs = layer(x, attention_mask=mask)
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    assert torch.allclose(ours[keep], theirs[keep], atol=1e-4)  # padded positions are never read


@pytest.mark.parametrize("layers", [1, 2])
def test_minilm_frozen_part_and_trainable_top_compute_the_whole_network(layers):
    frozen = FrozenMiniLM(layers)
    frozen.prepare(TEXTS)
    packed = frozen(TEXTS)
    assert packed.shape[:2] == (4, frozen.length) and packed.shape[2] == 385 and packed.dtype == torch.float16
    whole = FrozenMiniLM(0)(TEXTS)
    assert torch.allclose(MiniLMTop(layers)(packed), whole, atol=2e-2)  # float16 storage of the states


def test_speech_embedding_runs_the_shipped_model_at_any_sample_rate():
    t = torch.arange(8000) / 8000
    waves = torch.stack([torch.sin(2 * math.pi * f * t) for f in (220.0, 440.0)]).unsqueeze(1)  # (2, 1, 8000)
    features = FrozenSpeechEmbedding(sample_rate=8000)(waves)
    assert features.shape == (2, 96) and torch.isfinite(features).all()
    assert not torch.allclose(features[0], features[1])


def test_the_projection_starts_where_the_pretrained_features_are():
    x = torch.randn(6, 384)
    same = FeatureProjection(384, 384, hidden=16)
    assert torch.equal(same(x), x)  # the identity at the encoder's own width
    narrow = FeatureProjection(384, 96, hidden=16)
    w = narrow.rotate.weight
    assert torch.allclose(w @ w.T, torch.eye(96), atol=1e-5)  # orthonormal rows: a rotation, restricted
    same(x).pow(2).sum().backward()
    assert same.mlp[-1].weight.grad.abs().sum() > 0  # ... and it can move away from them


def test_a_pretrained_encoder_brings_each_algorithms_recipe_where_nothing_else_sets_it():
    from metafusion.config import load_config
    from metafusion.engine.resolve import resolve

    def resolved(**overrides):
        return resolve(load_config(None, {"data.modalities": ["text", "tabular"], **overrides}))

    proto = resolved(**{"algo.name": "protonet", "model.encoders": "text=minilm"})
    assert proto.algo.options["metric"] == "cosine" and proto.model.width == 384
    mine = resolved(**{"algo.name": "protonet", "model.encoders": "text=minilm", "algo.metric": "euclidean"})
    assert mine.algo.options["metric"] == "euclidean" and mine.model.width == 384  # a setting given wins
    maml = resolved(**{"algo.name": "maml", "model.encoders": "text=minilm"})
    assert maml.algo.inner_lr == 0.1 and maml.model.adapt == "all-but-pretrained"
    for own_scope in ("anil", "metasgd"):
        assert resolved(**{"algo.name": own_scope, "model.encoders": "text=minilm"}).model.adapt == "all"
    assert resolved(**{"algo.name": "maml", "model.encoders": "text=minilm", "algo.inner_lr": 0.4}).algo.inner_lr == 0.4
    scratch = resolved(**{"algo.name": "protonet"})  # no pretrained encoder: the plain defaults
    assert scratch.algo.options["metric"] == "euclidean" and scratch.model.width == 64
    assert (
        resolved(**{"algo.name": "maml"}).algo.inner_lr == 0.4
        and resolved(**{"algo.name": "maml"}).model.adapt == "all"
    )


def test_a_clips_frames_go_through_the_image_network_one_by_one():
    clips = torch.rand(2, 3, 3, 40, 40, generator=torch.Generator().manual_seed(1))  # (clips, frames, C, H, W)
    frozen = FrozenEfficientNet("efficientnet-lite0", input_size=64, trainable=0)
    features = frozen(clips)
    assert features.shape == (2, 3, 1280)
    assert torch.allclose(features[1, 2], frozen(clips[1, 2:3])[0], atol=1e-5)
    spec = ModelSpec({"video": (3, 1280), "image": (1280,)})
    model = build_model(spec, ways=2, width=1280, hidden=8, encoders={"video": "efficientnet-lite0",
                        "image": "efficientnet-lite0"})  # fmt: skip
    # the projection starts as the identity and the pooling as the mean: a clip starts as its mean frame
    video, image = model.encoders["video"], model.encoders["image"]
    assert video.frames is not None and image.frames is None
    assert torch.allclose(video(features), features.mean(1), atol=1e-5)
    assert torch.allclose(image(features[:, 0]), features[:, 0], atol=1e-5)
