"""Exponential moving average of a model's weights, the copy that is sampled from and saved.

Averaging the weights over the last ~1/(1 - decay) steps smooths out the optimizer's noise; diffusion
models sample visibly better from the average than from the raw weights (SD's files hold EMA weights).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """shadow <- decay * shadow + (1 - decay) * weights, after each optimizer step.

    The decay ramps up as min(decay, (1 + n) / (10 + n)) over the first updates n, so the average
    starts out following the fast-changing early weights instead of remembering the random init.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        model_params = dict(model.named_parameters())
        for name, shadow in self.shadow.named_parameters():
            # lerp_: shadow + (1 - decay) * (param - shadow), in place and in the shadow's dtype.
            shadow.lerp_(model_params[name].detach().to(shadow.dtype), 1.0 - decay)
        model_buffers = dict(model.named_buffers())
        for name, buffer in self.shadow.named_buffers():
            buffer.copy_(model_buffers[name])
        self.updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates,
                "shadow": self.shadow.state_dict()}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.warmup, self.updates = state["decay"], state["warmup"], state["updates"]
        self.shadow.load_state_dict(state["shadow"])
