"""What a denoising loop reports after each model call: progress bars, live previews and interrupts are
built on it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Step:
    """One model call of the denoising loop: `index` of `total`, at U-Net `timestep`; `latents` the
    sampler's (noisy) ones after it, `denoised` the call's guided clean-image prediction (what A1111's
    live previews show and an interrupt returns)."""

    index: int
    total: int
    timestep: float
    latents: torch.Tensor
    denoised: torch.Tensor | None = None


StepCallback = Callable[[Step], None]

__all__ = ["Step", "StepCallback"]
