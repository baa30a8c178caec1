"""Faster ways to compute standard layers, giving the same numbers up to summation order.

1. Dense layers on oneDNN. PyTorch computes an fp32 `nn.Linear` on the CPU as a BLAS sgemm (MKL), whose
kernels take a narrower vector path on CPUs that are not Intel's; oneDNN's JIT kernels use the widest
unit the CPU has. On this project's 2-core AMD machine (AVX-512) oneDNN runs SD1.5's projections about
2x faster (benchmarks/README.md). oneDNN's op has no backward, so it serves inference only; whenever
autograd needs a graph, and for tracing (the OpenVINO backend) or compiling, the layers take torch's
usual path. `Linear` keeps `nn.Linear`'s parameters and `PointwiseConv` keeps `nn.Conv2d`'s, so
checkpoints do not change.

2. Nearest 2x upsampling followed by a 3x3 conv (every upsampler of the VAE decoder and the U-Net) as
four 2x2 convs on the small input, one per output pixel phase: after nearest upsampling, two of the
three kernel taps along each axis read the same input pixel, so their weights can be added first. That
is 16 instead of 36 multiply-adds per output pixel and channel pair, and no 4x upsampled copy in memory;
the upsampling convs are ~28% of a 512x512 VAE decode's FLOPs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# A switch for A/B measurements (benchmarks/profile_unet.py) and for tests of the fallback.
ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        ONEDNN
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, on oneDNN where that is safe."""
    if _onednn_applies(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def conv1x1_on_tokens(tokens: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A 1x1 conv applied to (..., C) pixels: the linear map it is."""
    return linear(tokens, conv.weight.flatten(1), conv.bias)


class PointwiseConv(nn.Conv2d):
    """A 1x1 conv; on channels-last input, computed as a linear map over the (B, H, W, C) view."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last)
            and _onednn_applies(x, self.weight)
        ):
            # permute() of a channels-last tensor is a contiguous (B, H, W, C) view, and back again.
            return conv1x1_on_tokens(x.permute(0, 2, 3, 1), self).permute(0, 3, 1, 2)
        return super().forward(x)


def _fold_pairs(kernel: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 3 taps along `dim` folded to 2, for even and for odd output pixels.

    After nearest 2x upsampling, an even output pixel reads input pixels (i-1, i, i) through taps
    (0, 1, 2) and an odd one (i, i, i+1): taps reading the same pixel are summed.
    """
    first, middle, last = kernel.unbind(dim)
    return torch.stack([first, middle + last], dim), torch.stack([first + middle, last], dim)


def _phase_kernels(conv: nn.Conv2d, dtype: torch.dtype, memory_format: torch.memory_format) -> list:
    """The four 2x2 kernels of `conv`, (out, in, 2, 2) each, for phases (0, 0), (0, 1), (1, 0), (1, 1).

    Kept on the module until its weight changes (training steps bump the tensor's version): folding is
    a few memory passes over the weight, cheap but not free next to a conv at 8x8.
    """
    weight = conv.weight
    needs_graph = torch.is_grad_enabled() and weight.requires_grad  # training: fold inside autograd
    key = (weight.data_ptr(), weight._version, dtype, memory_format)
    cached = getattr(conv, "_phase_kernels", None)
    if not needs_graph and cached is not None and cached[0] == key:
        return cached[1]
    # Folded in fp32 on the (out, kh, kw, in) view, which a channels-last weight stores contiguously:
    # the sums then stream through memory. An einsum with 0/1 matrices gave the same numbers 5-15x slower.
    taps = weight.float().permute(0, 2, 3, 1)
    kernels = [
        kernel.permute(0, 3, 1, 2).to(dtype).contiguous(memory_format=memory_format)
        for rows in _fold_pairs(taps, 1)
        for kernel in _fold_pairs(rows, 2)
    ]
    if not needs_graph:  # the cache holds no autograd graph
        conv._phase_kernels = (key, kernels)
    return kernels


def forget_folded_kernels(module: nn.Module) -> None:
    """Drop the folded kernels `module`'s upsampling convs keep (SD1.5's U-Net: 0.24 GB in fp32); the next
    call folds them again. A compiled stand-in (the OpenVINO backend's) keeps none."""
    if not isinstance(module, nn.Module):
        return
    for layer in module.modules():
        if hasattr(layer, "_phase_kernels"):
            del layer._phase_kernels


def upsample_conv(x: torch.Tensor, conv: nn.Conv2d, size: tuple[int, int] | None = None) -> torch.Tensor:
    """`conv(F.interpolate(x, size or 2x, mode="nearest"))` for a 3x3, padding-1 conv."""
    batch, _, height, width = x.shape
    # A trace fixes Python branches, and the U-Net's skip sizes (`size`) are only 2x for even sides: a
    # traced graph must keep the general form there.
    if size is not None and (tuple(size) != (2 * height, 2 * width) or torch.jit.is_tracing()):
        return conv(F.interpolate(x, size=size, mode="nearest"))
    memory_format = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else None
    kernels = _phase_kernels(conv, x.dtype, memory_format or torch.contiguous_format)
    # (a circular conv, sd.seamless: the upsampled image's wrapped border is the input's wrapped border)
    padded = F.pad(x, (1, 1, 1, 1), mode="circular" if conv.padding_mode == "circular" else "constant")
    # Phase (a, b) reads padded rows a .. a+H and columns b .. b+W. Slices without explicit sizes keep a
    # trace (the OpenVINO backend) valid for every input shape.
    ends = (-1, None)

    def phase(a: int, b: int) -> torch.Tensor:
        return F.conv2d(padded[:, :, a : ends[a], b : ends[b]], kernels[2 * a + b], conv.bias)

    if torch.jit.is_tracing():  # interleave without in-place writes: (B, C, H, 2, W, 2) -> (B, C, 2H, 2W)
        rows = [torch.stack([phase(a, 0), phase(a, 1)], dim=-1) for a in (0, 1)]
        return torch.stack(rows, dim=3).flatten(4, 5).flatten(2, 3)
    out = x.new_empty(batch, conv.out_channels, 2 * height, 2 * width)
    if memory_format is not None:
        out = out.contiguous(memory_format=memory_format)
    for a in (0, 1):
        for b in (0, 1):  # one phase alive at a time
            out[:, :, a::2, b::2] = phase(a, b)
    return out
