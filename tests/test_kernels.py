"""sd.kernels: the fast formulations give torch's numbers, and step aside where autograd or tracing runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sd import kernels
from sd.config import TINY
from sd.kernels import Linear, PointwiseConv, conv1x1_on_tokens, upsample_conv
from sd.testing import random_models

needs_onednn = pytest.mark.skipif(not kernels.ONEDNN, reason="this torch has no oneDNN linear op")


@needs_onednn
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


@needs_onednn
def test_unet_same_with_and_without_onednn(monkeypatch):
    models = random_models(TINY, seed=3)
    unet = models["diffusion"]
    latents = torch.randn(2, TINY.unet.in_channels, 16, 16)
    context = torch.randn(2, 77, TINY.unet.context_dim)
    t = torch.tensor([999, 10])
    with torch.no_grad():
        fast = unet(latents, context, t)
        monkeypatch.setattr(kernels, "ONEDNN", False)
        plain = unet(latents, context, t)
    assert (fast - plain).abs().max() <= 1e-5 * plain.abs().max()


def reference_upsample(x: torch.Tensor, conv: torch.nn.Conv2d, size=None) -> torch.Tensor:
    return conv(F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest"))


@pytest.mark.parametrize("channels_last", [True, False])
def test_upsample_conv_is_nearest_upsample_then_conv(channels_last):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(12, 10, 3, padding=1)
    x = torch.randn(2, 12, 5, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out, ref = upsample_conv(x, conv), reference_upsample(x, conv)
        assert out.shape == (2, 10, 10, 14)
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
        assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
        # A size other than 2x (the U-Net's odd latent sides) takes the plain path.
        odd = upsample_conv(x, conv, (9, 13))
        assert torch.equal(odd, reference_upsample(x, conv, (9, 13)))


def test_upsample_conv_cache_follows_weight_updates_and_autograd_works():
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(6, 6, 3, padding=1)
    x = torch.randn(1, 6, 4, 4)
    with torch.no_grad():
        before = upsample_conv(x, conv)
        conv.weight.mul_(-2.0)  # an in-place update, as an optimizer step makes
        after = upsample_conv(x, conv)
        assert torch.allclose(after, reference_upsample(x, conv), atol=1e-5)
        assert not torch.allclose(before, after)
    ours = torch.autograd.grad(upsample_conv(x, conv).square().sum(), conv.weight)[0]
    ref = torch.autograd.grad(reference_upsample(x, conv).square().sum(), conv.weight)[0]
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_upsample_conv_traces_shape_generic():
    """The traced graph (what the OpenVINO backend converts) must hold for other input sizes."""
    torch.manual_seed(2)
    conv = torch.nn.Conv2d(4, 5, 3, padding=1)

    class Up(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            return upsample_conv(x, self.conv)

    with torch.no_grad():
        traced = torch.jit.trace(Up(), torch.randn(1, 4, 6, 6), check_trace=False)
        x = torch.randn(2, 4, 5, 9)
        assert torch.allclose(traced(x), reference_upsample(x, conv), atol=1e-5)
