"""Classifier-free guidance over a run's conditioning: which contexts each model call sees, and how the
predictions combine.

    prediction = uncond + sum_i (cfg_scale * w_i) * (cond_i - uncond)

over the AND parts i of the prompt (A1111's combine_denoised; one part of weight 1 is plain CFG). Model
calls are counted from 0, and prompt editing switches texts by that count, as A1111's CFG denoiser does.

Batching: the negative and positive contexts go through the U-Net in one batch when they have the same
length (the common case, and what diffusers does); a longer prompt (154 tokens against 77) runs as two
calls, A1111's default, unless "Pad conds" pads the shorter one with copies of the empty prompt's
conditioning. AND parts of different lengths are padded by repeating their last vector, as A1111 does.

A1111 can also skip the negative pass (`UncondSkip`): on the first part of a run ("Skip Early CFG") and,
every other call, once sigma is low ("NGMS"); such a call returns the prompt's prediction, AND parts
combined around their first part at scale 1 (A1111's combine_denoised with the first part as uncond).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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


@dataclass(frozen=True)
class UncondSkip:
    """When A1111's CFG denoiser (v1.10.1) leaves out the negative pass.

    `total_steps`: the calls it expects (launch_sampling's count: txt2img its steps, img2img t_enc + 1,
    doubled for second-order samplers); `early`: skip_early_cond, the fraction of them from the start;
    `min_sigma`: s_min_uncond (NGMS), on odd calls below that sigma (the timestep samplers compare their
    timestep, as A1111 does); `every_call`: s_min_uncond_all, on every such call."""

    total_steps: int
    early: float = 0.0
    min_sigma: float = 0.0
    every_call: bool = False

    def reason(self, call: int, sigma: float) -> str | None:
        """Why model call `call` at `sigma` skips the negative pass: "early", "ngms"; None: it does not."""
        if self.early and call / self.total_steps <= self.early:
            return "early"
        if (call % 2 or self.every_call) and self.min_sigma > 0 and sigma < self.min_sigma:
            return "ngms"
        return None


class Guidance:
    """The guided model of one run: call it as model(x, t) once per model call.

    `a1111`: A1111's CFG denoiser instead of diffusers' rule: guidance at every scale but exactly 1 (see
    below), and its batch layout, conditional rows first (image by image, each image's AND parts
    together), then the unconditional ones; with different lengths the conditional call comes first.
    `needs_uncond`: always run the unconditional pass (DDIM CFG++ steps along it). `skip`: A1111's
    skips of the negative pass (`skipped` then says which happened).
    """

    def __init__(
        self,
        conditioning: Conditioning,
        cfg_scale: float,
        a1111: bool = False,
        needs_uncond: bool = False,
        skip: UncondSkip | None = None,
    ):
        self.conditioning = conditioning
        self.skip = skip
        self.skipped: set[str] = set()  # UncondSkip reasons that took effect (A1111 writes only those)
        self.cfg_scale = cfg_scale
        self.a1111 = a1111
        parts = conditioning.parts
        plain = len(parts) == 1 and parts[0][1] == 1.0
        if a1111:
            # A1111 runs the negative pass at CFG 1 too, then computes uncond + 1 * (cond - uncond): the
            # prompt's prediction up to float rounding (~1e-7). Skipping it halves the U-Net work of the
            # CFG-1 paths (LCM-LoRA) and changes no image beyond what another CPU's rounding would.
            self.guided = needs_uncond or not (plain and cfg_scale == 1.0)
        else:
            # Plain prompt below CFG 1: the prompt's prediction alone (diffusers' rule; no negative pass).
            self.guided = needs_uncond or cfg_scale > 1.0 or not plain
        self.calls = 0
        self.padded = False  # whether "Pad conds" padded anything (A1111 records it only then)
        self.uncond_output: torch.Tensor | None = None  # the latest call's (DDIM CFG++ steps along it)
        # which rows of the U-Net batch under way are the prompt's (True) or the negative's (ControlNet)
        self.cond_rows: torch.Tensor | None = None

    def _cond_batch(self, x: torch.Tensor, conds: list[torch.Tensor]):
        """(x rows, context rows, split) of the conditional batch; split(output) gives one output per part."""
        batch, parts = x.shape[0], len(conds)
        if self.a1111:  # image-major: image 0's parts, image 1's parts, ...
            contexts = torch.stack(conds).repeat(batch, 1, 1)

            def by_part(out: torch.Tensor) -> tuple[torch.Tensor, ...]:
                return out.unflatten(0, (batch, parts)).unbind(1)

            return x.repeat_interleave(parts, 0), contexts, by_part
        contexts = torch.cat([c[None].expand(batch, -1, -1) for c in conds])
        return torch.cat([x] * parts), contexts, lambda out: out.chunk(parts)

    def __call__(self, model: Model, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        call, self.calls = self.calls, self.calls + 1
        batch = x.shape[0]
        parts = self.conditioning.parts
        conds = [scheduled.at(call) for scheduled, _ in parts]
        length = max(c.shape[0] for c in conds)
        conds = [pad_by_repeating_last(c, length) for c in conds]
        if not self.guided:
            self.cond_rows = torch.ones(batch, dtype=torch.bool)
            return model(x, conds[0][None].expand(batch, -1, -1), t)

        uncond = self.conditioning.uncond.at(call)
        empty = self.conditioning.empty
        if empty is not None and uncond.shape[0] != length:
            self.padded = True
            length = max(uncond.shape[0], length)
            uncond = pad_with_empty(uncond, length, empty)
            conds = [pad_with_empty(c, length, empty) for c in conds]
        x_cond, cond_rows, split = self._cond_batch(x, conds)
        reason = self.skip.reason(call, float(t.flatten()[0])) if self.skip is not None else None
        if reason is not None:
            self.skipped.add(reason)
            self.cond_rows = torch.ones(len(x_cond), dtype=torch.bool)
            cond_outs = split(model(x_cond, cond_rows, t))
            self.uncond_output = result = cond_outs[0]  # A1111's stand-in for the skipped output
            for cond_out, (_, weight) in zip(cond_outs[1:], parts[1:], strict=True):
                result = result + weight * (cond_out - cond_outs[0])
            return result
        uncond_rows = uncond[None].expand(batch, -1, -1)
        if uncond.shape[0] != length:  # different lengths: two calls, A1111's conditional one first
            ones, zeros = torch.ones(len(x_cond), dtype=torch.bool), torch.zeros(batch, dtype=torch.bool)
            if self.a1111:
                self.cond_rows = ones
                cond_out = model(x_cond, cond_rows, t)
                self.cond_rows = zeros
                uncond_out = model(x, uncond_rows, t)
            else:
                self.cond_rows = zeros
                uncond_out = model(x, uncond_rows, t)
                self.cond_rows = ones
                cond_out = model(x_cond, cond_rows, t)
            cond_outs = split(cond_out)
        elif self.a1111:
            self.cond_rows = torch.arange(len(x_cond) + batch) < len(x_cond)
            out = model(torch.cat([x_cond, x]), torch.cat([cond_rows, uncond_rows]), t)
            cond_outs, uncond_out = split(out[: len(x_cond)]), out[len(x_cond) :]
        else:
            self.cond_rows = torch.arange(batch + len(x_cond)) >= batch
            out = model(torch.cat([x, x_cond]), torch.cat([uncond_rows, cond_rows]), t)
            uncond_out, cond_outs = out[:batch], split(out[batch:])
        self.uncond_output = result = uncond_out
        for cond_out, (_, weight) in zip(cond_outs, parts, strict=True):
            result = result + (self.cfg_scale * weight) * (cond_out - uncond_out)
        return result


__all__ = ["Guidance", "UncondSkip", "pad_by_repeating_last", "pad_with_empty"]
