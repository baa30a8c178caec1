"""ControlNet as A1111's web UI runs it: its ControlNet extension (sd-webui-controlnet v1.1.455), over
A1111's way of sampling (sd.a1111_sampling).

* The hint (`hint_array`): RGB as given, grey replicated, transparency composited onto white (truncated
  to uint8); at the image's size it is used as it is. Another size is fitted by the unit's resize mode
  ("Just Resize", "Crop and Resize": cover and crop centred, "Resize and Fill": fit and pad with the
  border's median colour). The extension resizes with OpenCV (area, cubic or nearest, and re-thresholds
  and thins binary maps); here PIL's box, bicubic and nearest filters stand in, with a warning, so a hint
  of the image's own size is what reproduces A1111's pixels. Then [0, 1], one row for the whole batch.
* Each model call: the ControlNet sees the U-Net's input (A1111's c_in-scaled latents, its timestep, the
  rows' contexts); residual i is scaled by the weight ("Balanced"), or by weight * 0.825^(12 - i) ("My
  prompt is more important", and "ControlNet is more important", which also gives the negative prompt's
  rows none). A shuffle model (global average pooling) also acts on the prompt's rows only, averaged.
* Guidance start/end: the unit acts while start <= p <= end, p = A1111's sampling_step / sampling_steps
  when the call is made, which its step callback sets after each step: step j sees (j - 1) / N (0 at the
  first), both calls of a second-order step alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from .apply import CONTROL_MODES, ControlUnit, add_residuals, pixels_to_hint, unit_residuals

log = logging.getLogger("sd")

SOFT_DECAY = 0.825  # the extension's per-layer weights when the prompt matters more


def hint_array(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 as the extension reads an image (HWC3)."""
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA"):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:] / 255.0
        return (rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    return np.asarray(image.convert("RGB"))


def fit_hint(pixels: np.ndarray, width: int, height: int, resize_mode: str) -> np.ndarray:
    """The hint at width x height by the extension's resize mode (detectmap_proc)."""
    old_h, old_w = pixels.shape[:2]
    if (old_w, old_h) == (width, height):
        return pixels
    log.warning("the ControlNet hint is %dx%d, not the image's %dx%d: resized close to (not exactly as) "
                "A1111's ControlNet extension does; give it at %dx%d for A1111's pixels",
                old_w, old_h, width, height, width, height)  # fmt: skip
    if resize_mode == "Just Resize":
        return _resize(pixels, width, height)
    k = (max if resize_mode == "Crop and Resize" else min)(height / old_h, width / old_w)
    new_w, new_h = int(np.round(old_w * k)), int(np.round(old_h * k))
    resized = _resize(pixels, new_w, new_h)
    if resize_mode == "Crop and Resize":
        top, left = max(0, (new_h - height) // 2), max(0, (new_w - width) // 2)
        return resized[top : top + height, left : left + width]
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    out = np.empty((height, width, 3), np.uint8)
    out[:] = np.median(border, axis=0).astype(np.uint8)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    out[top : top + new_h, left : left + new_w] = resized
    return out


def _resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """high_quality_resize's choices, with PIL filters for OpenCV's: nearest for maps of a few colours,
    area when shrinking, cubic when growing; two-colour (edge) maps thresholded back to two (Otsu)."""
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    binary = colours == 2 and pixels.min() < 16 and pixels.max() > 240
    shrinking = width * height < pixels.shape[0] * pixels.shape[1]
    resample = (
        Image.Resampling.NEAREST
        if 2 < colours < 200
        else Image.Resampling.BOX
        if shrinking
        else Image.Resampling.BICUBIC
    )
    out = np.asarray(Image.fromarray(pixels).resize((width, height), resample))
    if binary:
        grey = out.astype(np.float32).mean(axis=2).clip(0, 255).astype(np.uint8)
        out = np.repeat(np.where(grey > _otsu(grey), 255, 0).astype(np.uint8)[..., None], 3, axis=2)
    return out


def _otsu(grey: np.ndarray) -> int:
    """Otsu's threshold of a uint8 image (values above it are foreground)."""
    counts = np.bincount(grey.ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256)
    weight = np.cumsum(counts)
    mean = np.cumsum(counts * levels)
    total, total_mean = weight[-1], mean[-1]
    between = (total_mean * weight - mean * total) ** 2 / np.maximum(weight * (total - weight), 1e-12)
    return int(np.argmax(between[:-1]))


def layer_scales(unit: ControlUnit, count: int) -> list[float]:
    """The weight of each of the `count` residuals (the middle block's last) for the unit's control mode."""
    if unit.mode == "Balanced":
        return [unit.scale] * count
    return [unit.scale * SOFT_DECAY ** float(count - 1 - i) for i in range(count)]


class A1111ControlRun:
    """The units of one A1111 sampling run: `next_call()` before each model call, then `residuals(...)` per
    U-Net batch. `steps` is A1111's sampling_steps for the run; `step_of_call` maps a model call to its
    step (None: unknown, only allowed when every unit acts throughout)."""

    def __init__(
        self,
        units: list[ControlUnit],
        steps: int,
        step_of_call: Callable[[int], int | None],
        width: int,
        height: int,
        device: torch.device,
    ):
        self.units = units
        self.hints = [
            pixels_to_hint(fit_hint(hint_array(u.image), width, height, u.resize_mode)).to(device)
            for u in units
        ]
        self.steps, self.step_of_call = steps, step_of_call
        self.call = -1
        self.active = [True] * len(units)

    def next_call(self) -> None:
        self.call += 1
        step = self.step_of_call(self.call)
        progress = 0.0 if step is None else max(step - 1, 0) / self.steps
        self.active = [u.start <= progress <= u.end for u in self.units]

    def residuals(
        self, x: torch.Tensor, context: torch.Tensor, t: torch.Tensor, cond_rows: torch.Tensor | None
    ) -> list[torch.Tensor] | None:
        total: list[torch.Tensor] | None = None
        rows = cond_rows if cond_rows is not None else torch.ones(x.shape[0], dtype=torch.bool)
        for unit, hint, active in zip(self.units, self.hints, self.active, strict=True):
            if not active:
                continue
            out = unit_residuals(unit, hint, x, context, t)
            if unit.mode == CONTROL_MODES[2] or unit.model.config.global_average_pooling:
                mark = rows.to(out[0]).reshape(-1, 1, 1, 1)
                out = [r * mark for r in out]
            out = [r * s for r, s in zip(out, layer_scales(unit, len(out)), strict=True)]  # (pooled: already)
            total = add_residuals(total, out)
        return total


__all__ = ["A1111ControlRun", "fit_hint", "hint_array", "layer_scales"]
