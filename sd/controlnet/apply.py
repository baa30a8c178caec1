"""ControlNets during sampling: the units a run uses, their hint images, and the residuals of each model
call, as diffusers' StableDiffusionControlNetPipeline makes them (v0.42).

* The hint image is converted to RGB, resized to the output size with Lanczos and scaled to [0, 1]
  (VaeImageProcessor with do_normalize=False); every row of a model call's batch gets it.
* Each ControlNet sees what the U-Net sees at that call (the latents, timestep and text contexts of the
  batch, negative and positive rows alike); its residuals are multiplied by the unit's scale, and those of
  several units are summed (MultiControlNetModel).
* `start`/`end` (control_guidance_start/end): at model call i of N the unit acts unless i / N < start or
  (i + 1) / N > end.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .model import ControlNet

# A1111's ControlNet extension's names (sd.controlnet.a1111)
RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet for a run: the model, its hint (an edge map, depth map, pose drawing, ... as an image
    the size of the output or any other, resized), and how strongly and when it acts."""

    model: ControlNet
    image: Image.Image
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    # A1111's way only (its ControlNet extension, sd.controlnet.a1111): control mode and resize mode
    mode: str = "Balanced"
    resize_mode: str = "Crop and Resize"

    def check(self, a1111: bool = False) -> None:
        if self.mode not in CONTROL_MODES:
            raise ValueError(
                f"unknown ControlNet control mode {self.mode!r}; one of {', '.join(CONTROL_MODES)}"
            )
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(
                f"unknown ControlNet resize mode {self.resize_mode!r}; one of {', '.join(RESIZE_MODES)}"
            )
        if not a1111 and (self.mode, self.resize_mode) != ("Balanced", "Crop and Resize"):
            raise ValueError("ControlNet control and resize modes are A1111's: use A1111's way (a1111=True)")
        if not 0 <= self.start < self.end <= 1:
            raise ValueError(
                f"ControlNet start and end must satisfy 0 <= start < end <= 1, got {self.start}, {self.end}"
            )
        if not np.isfinite(self.scale) or self.scale < 0:
            raise ValueError(f"ControlNet scale must be a number >= 0, got {self.scale}")


def unit_infotext(unit: ControlUnit) -> str:
    """The value A1111's ControlNet extension writes as "ControlNet i" for a unit with no preprocessor."""
    fields = [
        ("Module", "none"), ("Model", unit.model.name), ("Weight", float(unit.scale)),
        ("Resize Mode", unit.resize_mode), ("Processor Res", 512), ("Threshold A", 0.5), ("Threshold B", 0.5),
        ("Guidance Start", float(unit.start)), ("Guidance End", float(unit.end)), ("Pixel Perfect", False),
        ("Control Mode", unit.mode),
    ]  # fmt: skip
    return ", ".join(f"{k}: {v}" for k, v in fields)


def hint_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """(1, 3, height, width) in [0, 1]: the image in RGB, Lanczos-resized (diffusers' control processor)."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return pixels_to_hint(np.asarray(image))


def pixels_to_hint(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> the (1, 3, H, W) hint in [0, 1] a ControlNet takes."""
    return torch.from_numpy(pixels.astype(np.float32) / 255.0).permute(2, 0, 1)[None]


def unit_residuals(
    unit: ControlUnit, hint: torch.Tensor, x: torch.Tensor, context: torch.Tensor, t: torch.Tensor
) -> list[torch.Tensor]:
    """The unit's ControlNet on a U-Net batch, in its own dtype, the hint on every row (unscaled)."""
    dtype = next(unit.model.parameters()).dtype
    return unit.model(x.to(dtype), hint.to(dtype).expand(x.shape[0], -1, -1, -1), context.to(dtype), t)


def add_residuals(total: list[torch.Tensor] | None, more: list[torch.Tensor]) -> list[torch.Tensor]:
    """Several units' residuals add up (diffusers' MultiControlNetModel, A1111's extension)."""
    return more if total is None else [a + b for a, b in zip(total, more, strict=True)]


class ControlRun:
    """The units of one sampling run of `calls` model calls: call `next_call()` before each model call,
    then `residuals(x, context, t)` for each U-Net batch of it."""

    def __init__(self, units: list[ControlUnit], calls: int, width: int, height: int, device: torch.device):
        self.units = units
        self.hints = [hint_tensor(unit.image, width, height).to(device) for unit in units]
        self.calls = calls
        self.call = -1
        self.scales = [0.0] * len(units)

    def next_call(self) -> None:
        self.call += 1
        i, n = self.call, self.calls
        self.scales = [
            0.0 if (i / n < unit.start or (i + 1) / n > unit.end) else unit.scale for unit in self.units
        ]

    def residuals(self, x: torch.Tensor, context: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor] | None:
        """The summed, scaled residuals for the U-Net's `control` (None when no unit acts at this call)."""
        total: list[torch.Tensor] | None = None
        for unit, hint, scale in zip(self.units, self.hints, self.scales, strict=True):
            if scale == 0:
                continue
            out = [r * scale for r in unit_residuals(unit, hint, x, context, t)]
            total = add_residuals(total, out)
        return total


__all__ = [
    "CONTROL_MODES", "RESIZE_MODES", "ControlRun", "ControlUnit", "add_residuals", "hint_tensor",
    "pixels_to_hint", "unit_infotext", "unit_residuals",
]  # fmt: skip
