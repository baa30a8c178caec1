"""Dense layers that run on oneDNN on the CPU.

PyTorch computes an fp32 `nn.Linear` on the CPU as a BLAS sgemm (MKL), whose kernels take a narrower
vector path on CPUs that are not Intel's; oneDNN's JIT kernels use the widest unit the CPU has. On this
project's 2-core AMD machine (AVX-512) oneDNN runs SD1.5's projections about 2x faster (profile in
benchmarks/README.md), and the same numbers up to summation order (~1e-6 relative).

oneDNN's op has no backward, so it serves inference only; whenever autograd needs a graph, and for
tracing (the OpenVINO backend) or compiling, the layers take torch's usual path. `Linear` keeps
`nn.Linear`'s parameters and `PointwiseConv` keeps `nn.Conv2d`'s, so checkpoints do not change.
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
