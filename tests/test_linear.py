"""sd.linear: oneDNN dense layers give torch's numbers, and step aside wherever autograd or tracing runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sd import linear as sd_linear
from sd.config import TINY
from sd.linear import Linear, PointwiseConv, conv1x1_on_tokens
from sd.testing import random_models

pytestmark = pytest.mark.skipif(not sd_linear.ONEDNN, reason="this torch has no oneDNN linear op")


def test_linear_matches_torch_and_uses_onednn_in_inference(monkeypatch):
    layer = Linear(96, 40).eval()
    x = torch.randn(3, 17, 96)
    with torch.no_grad(), torch.profiler.profile() as profile:
        out = layer(x)
    assert any("_linear_pointwise" in event.name for event in profile.events()), "oneDNN path not taken"
    ref = F.linear(x, layer.weight, layer.bias)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_training_takes_the_autograd_path():
    layer = Linear(8, 4)
    x = torch.randn(5, 8, requires_grad=True)
    layer(x).square().sum().backward()
    expected = torch.autograd.grad(F.linear(x, layer.weight, layer.bias).square().sum(), layer.weight)[0]
    assert torch.allclose(layer.weight.grad, expected)
    assert x.grad is not None


@pytest.mark.parametrize("channels_last", [True, False])
def test_pointwise_conv_is_the_1x1_conv(channels_last):
    conv = PointwiseConv(24, 40).eval()
    x = torch.randn(2, 24, 9, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = conv(x)
        ref = F.conv2d(x, conv.weight, conv.bias)
    assert out.shape == ref.shape and (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    tokens = x.permute(0, 2, 3, 1)
    assert torch.allclose(conv1x1_on_tokens(tokens, conv), ref.permute(0, 2, 3, 1), atol=1e-5)


def test_unet_same_with_and_without_onednn(monkeypatch):
    models = random_models(TINY, seed=3)
    unet = models["diffusion"]
    latents = torch.randn(2, TINY.unet.in_channels, 16, 16)
    context = torch.randn(2, 77, TINY.unet.context_dim)
    t = torch.tensor([999, 10])
    with torch.no_grad():
        fast = unet(latents, context, t)
        monkeypatch.setattr(sd_linear, "ONEDNN", False)
        plain = unet(latents, context, t)
    assert (fast - plain).abs().max() <= 1e-5 * plain.abs().max()
