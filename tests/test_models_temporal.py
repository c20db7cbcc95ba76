"""Pooling over time: every kind starts as the mean of the frames, and the learned ones can read order."""

import pytest
import torch

from metafusion.errors import ConfigError
from metafusion.models.encoders.temporal import TEMPORAL_POOLS, TemporalPool
from metafusion.models.encoders.video import R2Plus1D

FRAMES = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(0))  # (clips, frames, features)


@pytest.mark.parametrize("kind", TEMPORAL_POOLS)
def test_every_pooling_starts_as_the_mean_of_the_frames(kind):
    assert torch.allclose(TemporalPool(8, kind)(FRAMES), FRAMES.mean(1), atol=1e-6)


def test_mean_pooling_ignores_order_and_the_temporal_convolution_can_read_it():
    reversed_ = FRAMES.flip(1)
    assert torch.allclose(TemporalPool(8, "mean")(reversed_), TemporalPool(8, "mean")(FRAMES), atol=1e-6)
    conv = TemporalPool(8, "conv")
    torch.nn.init.normal_(conv.conv.weight, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(conv(reversed_), conv(FRAMES), atol=1e-3)


def test_an_unknown_pooling_is_a_config_error():
    with pytest.raises(ConfigError, match="mean, attention, conv"):
        TemporalPool(8, "max")


def test_r2plus1d_reads_any_clip_length_and_size_it_was_built_for():
    for shape in [(1, 1, 28, 28), (8, 3, 32, 48)]:
        encoder = R2Plus1D(16, input_shape=shape)
        out = encoder(torch.rand(5, *shape))
        assert out.shape == (5, 16) and torch.isfinite(out).all()
