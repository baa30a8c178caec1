"""Multi-head attention on torch's fused scaled_dot_product_attention.

The score matrix is never materialised by our code: SDPA picks a flash / memory-efficient kernel
where it can, so a 4096-token self-attention at 512x512 stays linear in memory on the kernels that
support it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import Linear


def multihead_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool = False
) -> torch.Tensor:
    """(B, Nq, C), (B, Nk, C), (B, Nk, C) -> (B, Nq, C), softmax(q k^T / sqrt(C/heads)) v per head."""
    batch, n_q, channels = q.shape
    head_dim = channels // heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, -1, heads, head_dim).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=causal)
    return out.transpose(1, 2).reshape(batch, n_q, channels)


class SelfAttention(nn.Module):
    """CLIP-style self-attention (biased q/k/v/out projections, optional causal mask)."""

    def __init__(self, width: int, heads: int, causal: bool = False):
        super().__init__()
        self.heads = heads
        self.causal = causal
        self.q_proj = Linear(width, width)
        self.k_proj = Linear(width, width)
        self.v_proj = Linear(width, width)
        self.out_proj = Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = multihead_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, self.causal)
        return self.out_proj(out)


class CrossAttention(nn.Module):
    """U-Net transformer attention: queries from the image, keys/values from `context` (or the image).

    Names follow the original checkpoint (to_q/to_k/to_v without bias, to_out.0 with bias).
    """

    def __init__(self, query_dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = Linear(query_dim, query_dim, bias=False)
        self.to_k = Linear(context_dim, query_dim, bias=False)
        self.to_v = Linear(context_dim, query_dim, bias=False)
        self.to_out = nn.Sequential(Linear(query_dim, query_dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        out = multihead_attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)
        return self.to_out(out)
