"""Deterministic random weights in the real checkpoint layout, for parity tests and benchmarks.

No real weights can be downloaded, so correctness is shown by giving our modules and the reference
implementation the same random tensors. Scales are chosen so activations stay O(1) through the deep
networks (a fan-in normal for matrices, perturbed ones/zeros for norms), and every tensor, norms
and biases included, is random so a wrong mapping cannot hide behind a default init.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import SD15, ModelConfig
from .keymap import ldm_key
from .models import build_models


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter of `module` in place with seeded random values."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        if param.ndim >= 2:
            fan_in = param[0].numel()
            std = 0.1 if "embedding" in name else fan_in**-0.5
            param.copy_(torch.randn(param.shape, generator=gen) * std)
        elif name.endswith("weight"):  # norm scales
            param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
        else:
            param.copy_(0.05 * torch.randn(param.shape, generator=gen))
    return module


def random_models(config: ModelConfig = SD15, seed: int = 0) -> dict[str, nn.Module]:
    """The four components with seeded random weights."""
    models = build_models(config)
    for i, model in enumerate(models.values()):
        randomize_(model, seed + i)
    return models


def ldm_state_dict(models: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Merge component state dicts into one original-layout (LDM) state dict."""
    state = {}
    for name, model in models.items():
        for key, value in model.state_dict().items():
            state[ldm_key(name, key)] = value.contiguous()  # channels-last weights: files want plain layout
    return state
