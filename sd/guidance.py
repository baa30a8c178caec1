"""Classifier-free guidance over a run's conditioning: which contexts each model call sees, and how the
predictions combine.

    prediction = uncond + sum_i (cfg_scale * w_i) * (cond_i - uncond)

over the AND parts i of the prompt (A1111's combine_denoised; one part of weight 1 is plain CFG). Model
calls are counted from 0, and prompt editing switches texts by that count, as A1111's CFG denoiser does.

Batching: the negative and positive contexts go through the U-Net in one batch when they have the same
length (the common case, and what diffusers does); a longer prompt (154 tokens against 77) runs as two
calls, A1111's default, unless "Pad conds" pads the shorter one with copies of the empty prompt's
conditioning. AND parts of different lengths are padded by repeating their last vector, as A1111 does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .conditioning import Conditioning

# model(x, context, t) -> prediction, both batched alike
Model = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def pad_by_repeating_last(context: torch.Tensor, length: int) -> torch.Tensor:
    """(T, width) -> (length, width), repeating the last row (A1111's stack_conds)."""
    extra = length - context.shape[0]
    return context if extra <= 0 else torch.cat([context, context[-1:].expand(extra, -1)])


def pad_with_empty(context: torch.Tensor, length: int, empty: torch.Tensor) -> torch.Tensor:
    """(T, width) -> (length, width) with copies of the empty prompt's 77 rows ("Pad conds")."""
    repeats = (length - context.shape[0]) // empty.shape[0]
    return context if repeats <= 0 else torch.cat([context, empty.repeat(repeats, 1)])


class Guidance:
    """The guided model of one run: call it as model(x, t) once per model call."""

    def __init__(self, conditioning: Conditioning, cfg_scale: float):
        self.conditioning = conditioning
        self.cfg_scale = cfg_scale
        parts = conditioning.parts
        # Plain prompt below CFG 1: the prompt's prediction alone (diffusers' rule; no negative pass).
        self.guided = cfg_scale > 1.0 or len(parts) > 1 or parts[0][1] != 1.0
        self.calls = 0
        self.padded = False  # whether "Pad conds" padded anything (A1111 records it only then)

    def __call__(self, model: Model, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        call, self.calls = self.calls, self.calls + 1
        batch = x.shape[0]
        parts = self.conditioning.parts
        conds = [scheduled.at(call) for scheduled, _ in parts]
        length = max(c.shape[0] for c in conds)
        conds = [pad_by_repeating_last(c, length) for c in conds]

        def rows(context: torch.Tensor) -> torch.Tensor:
            return context[None].expand(batch, -1, -1)

        if not self.guided:
            return model(x, rows(conds[0]), t)
        uncond = self.conditioning.uncond.at(call)
        empty = self.conditioning.empty
        if empty is not None and uncond.shape[0] != length:
            self.padded = True
            length = max(uncond.shape[0], length)
            uncond = pad_with_empty(uncond, length, empty)
            conds = [pad_with_empty(c, length, empty) for c in conds]
        if uncond.shape[0] == length:
            contexts = torch.cat([rows(c) for c in [uncond, *conds]])
            out = model(torch.cat([x] * (1 + len(conds))), contexts, t).chunk(1 + len(conds))
            uncond_out, cond_outs = out[0], out[1:]
        else:  # different lengths: two calls
            uncond_out = model(x, rows(uncond), t)
            cond_outs = model(torch.cat([x] * len(conds)), torch.cat([rows(c) for c in conds]), t).chunk(
                len(conds)
            )
        result = uncond_out
        for cond_out, (_, weight) in zip(cond_outs, parts, strict=True):
            result = result + (self.cfg_scale * weight) * (cond_out - uncond_out)
        return result


__all__ = ["Guidance", "pad_by_repeating_last", "pad_with_empty"]
