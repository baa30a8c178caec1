"""A1111's hires fix (v1.10.1 processing.py, StableDiffusionProcessingTxt2Img): a txt2img image made at its
size, upscaled, then repainted by an img2img pass at the large size.

    first pass     txt2img at width x height                          -> latents (B, 4, H/8, W/8)
    upscale        "Latent" modes: F.interpolate of the latents to (tH // 8, tW // 8);
                   image upscalers (None, Lanczos, Nearest): decode to uint8, resize as A1111's
                   images.resize_image(0, ...), VAE-encode
    crop           to the target's aspect when both hr_resize_x and hr_resize_y are given
    second pass    img2img from those latents with fresh noise from the same seeds; A1111 runs exactly
                   `hr_second_pass_steps or steps` steps: a schedule of int(hs / min(ds, 0.999)) steps
                   entered at its step count - hs (ds = denoising strength)

The sizes are A1111's (`hires_size`): the infotext's Size stays the first pass's; the image is the
upscale target rounded down to a multiple of 8, less the crop. Diffusers has no hires fix: with
`a1111=False` the same flow runs on our diffusers-way samplers (the second pass as diffusers' img2img:
int(steps x strength) of `hr_second_pass_steps or steps` steps, its VAE sample and noise from a fresh
generator of the seed), so it equals diffusers' txt2img + img2img composed that way.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .samplers import get_sampler
from .samplers.a1111 import SAMPLERS, exact_label, sampler_label
from .samplers.sigmas import SCHEDULE_TYPES, schedule_type
from .samplers.timesteps import TimestepsSampler, setup_img2img_steps
from .upscalers import IMAGE_UPSCALERS, resize_with, why_not

if TYPE_CHECKING:
    from .params import GenerationParams
    from .pipeline import Pipeline, StepCallback

# shared.latent_upscale_modes: label -> (F.interpolate mode, antialias)
LATENT_UPSCALE_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
DEFAULT_UPSCALER = "Latent"  # shared.latent_upscale_default_mode: what hr_upscaler None means
LATENT_DOWNSCALE = 8  # A1111's opt_f: SD's VAE; a model of ours may have another (the pipeline passes its)


def upscaler_label(name: str | None) -> str:
    """A1111's label of an upscaler given by label, any case ("latent", "latent (bicubic)", "lanczos");
    None means A1111's default, "Latent". ValueError (one line) for any other name."""
    if name is None:
        return DEFAULT_UPSCALER
    known = [*LATENT_UPSCALE_MODES, *IMAGE_UPSCALERS]
    by_lower = {label.lower(): label for label in known}
    found = by_lower.get(name.strip().lower())
    if found is not None:
        return found
    raise ValueError(f"hires upscaler {name!r} {why_not(name)}; one of: {', '.join(known)}")


@dataclass(frozen=True)
class HiresSize:
    """Where the hires pass goes: the upscale target (hr_upscale_to_x/y) and the crop, in latent pixels
    (A1111's truncate_x/y), that takes it to the asked aspect; `downscale`: the VAE's."""

    upscale_width: int
    upscale_height: int
    truncate_x: int = 0
    truncate_y: int = 0
    downscale: int = LATENT_DOWNSCALE

    @property
    def upscaled_latent_shape(self) -> tuple[int, int]:
        """(h, w) of the upscaled latents, before the crop: the target // 8."""
        return self.upscale_height // self.downscale, self.upscale_width // self.downscale

    @property
    def latent_shape(self) -> tuple[int, int]:
        """(h, w) of the second pass's latents: the target // 8, less the crop."""
        h, w = self.upscaled_latent_shape
        return h - self.truncate_y, w - self.truncate_x

    @property
    def width(self) -> int:
        """The final image's width (a multiple of 8)."""
        return self.latent_shape[1] * self.downscale

    @property
    def height(self) -> int:
        return self.latent_shape[0] * self.downscale


def hires_size(
    width: int, height: int, scale: float = 2.0, resize_x: int = 0, resize_y: int = 0,
    downscale: int = LATENT_DOWNSCALE,
) -> HiresSize:  # fmt: skip
    """A1111's calculate_target_resolution: `scale` times the first pass (int() truncates), or a target
    size; with one side 0 the other follows the first pass's aspect (floor division); with both, the image
    is upscaled to cover the target and cropped (centred) to it. ValueError for a scale below 1 or a
    negative size."""
    if resize_x < 0 or resize_y < 0:
        raise ValueError(f"hires resize must be >= 0 (0: from the scale), got {resize_x}x{resize_y}")
    if resize_x == 0 and resize_y == 0:
        if not np.isfinite(scale) or scale < 1:
            raise ValueError(f"hires scale must be at least 1, got {scale}")
        return HiresSize(int(width * scale), int(height * scale), downscale=downscale)
    if resize_y == 0:
        return HiresSize(resize_x, resize_x * height // width, downscale=downscale)
    if resize_x == 0:
        return HiresSize(resize_y * width // height, resize_y, downscale=downscale)
    if width / height < resize_x / resize_y:
        to_x, to_y = resize_x, resize_x * height // width
    else:
        to_x, to_y = resize_y * width // height, resize_y
    return HiresSize(to_x, to_y, (to_x - resize_x) // downscale, (to_y - resize_y) // downscale, downscale)


def crop(latents: torch.Tensor, size: HiresSize) -> torch.Tensor:
    """The centred crop A1111 takes of the upscaled latents (its odd extra row/column comes off the end)."""
    h, w = latents.shape[-2:]
    ty, tx = size.truncate_y, size.truncate_x
    return latents[..., ty // 2 : h - (ty + 1) // 2, tx // 2 : w - (tx + 1) // 2]


def upscale_latents(latents: torch.Tensor, upscaler: str, size: HiresSize) -> torch.Tensor:
    """A "Latent" mode: F.interpolate to the target // 8 (align_corners at its default), uncropped."""
    mode, antialias = LATENT_UPSCALE_MODES[upscaler_label(upscaler)]
    return F.interpolate(latents, size=size.upscaled_latent_shape, mode=mode, antialias=antialias)


def upscale_image(image: Image.Image, upscaler: str, width: int, height: int) -> Image.Image:
    """A1111's images.resize_image(0, image, width, height, upscaler) (sd.upscalers)."""
    return resize_with(image, upscaler_label(upscaler), width, height)


def second_pass_steps(params: GenerationParams) -> int:
    """The steps the second pass runs: hr_second_pass_steps, 0 meaning the first pass's."""
    return params.hr_second_pass_steps or params.steps


def hires_sampler(params: GenerationParams) -> str:
    """The second pass's sampler: hr_sampler_name, None meaning the first pass's."""
    return params.hr_sampler_name or params.sampler


def second_pass_params(params: GenerationParams) -> GenerationParams:
    """The parameters the second pass runs under (A1111's way): its sampler, schedule, prompts and the
    lengthened schedule of explicit-steps img2img (setup_img2img_steps), no initial noise multiplier (an
    img2img-tab setting)."""
    steps, _ = setup_img2img_steps(params.steps, params.strength, explicit_steps=second_pass_steps(params))
    if params.a1111:
        schedule = params.hr_scheduler or params.schedule
    else:
        schedule, steps = params.schedule, second_pass_steps(params)
    return replace(
        params,
        prompt=params.hr_prompt or params.prompt,
        negative_prompt=params.hr_negative_prompt or params.negative_prompt,
        sampler=hires_sampler(params),
        schedule=schedule,
        steps=steps,
        noise_multiplier=1.0,
        enable_hr=False,
    )


def second_pass_start(sampler, requested: int) -> int:
    """Where the second pass enters its (lengthened) schedule: t_enc = requested - 1 (A1111's explicit
    steps), so exactly `requested` steps run: sigmas[steps - t_enc - 1:], or timesteps[:t_enc]."""
    t_enc = requested - 1
    if isinstance(sampler, TimestepsSampler):
        return len(sampler.timesteps) - t_enc
    return sampler.steps - t_enc - 1


def check_hires(params: GenerationParams, downscale: int = LATENT_DOWNSCALE) -> HiresSize:
    """The hires target of `params` (for a VAE of `downscale`), after the checks that need no model:
    upscaler, scale, sizes, steps, strength, sampler (ValueError, one line)."""
    upscaler_label(params.hr_upscaler)
    if params.hr_second_pass_steps < 0:
        steps = params.hr_second_pass_steps
        raise ValueError(f"hires steps must be >= 0 (0: as the first pass), got {steps}")
    if params.strength is None or not 0 < params.strength <= 1:
        raise ValueError(f"hires denoising strength must be in (0, 1], got {params.strength}")
    if params.a1111 and params.hr_sampler_name is not None:
        sampler_label(params.hr_sampler_name)
    elif params.hr_sampler_name is not None:  # diffusers' way: our names (before any pass runs)
        get_sampler(params.hr_sampler_name, 1)
    if params.a1111 and params.hr_scheduler is not None and params.hr_scheduler.lower() != "automatic":
        schedule_type(params.hr_scheduler)
    return hires_size(params.width, params.height, params.hr_scale, params.hr_resize_x, params.hr_resize_y,
                      downscale)  # fmt: skip


def run_second_pass(
    pipe: Pipeline,
    params: GenerationParams,
    latents: torch.Tensor,
    eta: float,
    callback: StepCallback | None,
) -> tuple[torch.Tensor, dict]:
    """Upscale the first pass's `latents` and repaint them: (final latents, what the second pass resolved
    for the infotext: hires sampler and schedule labels)."""
    size = check_hires(params, pipe.config.vae.downscale)
    upscaler = upscaler_label(params.hr_upscaler)
    generator = None if params.a1111 else torch.Generator("cpu").manual_seed(params.seed)
    if upscaler in LATENT_UPSCALE_MODES:
        upscaled = upscale_latents(latents, upscaler, size)  # A1111 neither decodes nor re-encodes here
    else:
        # decoded as the final image is (A1111: truncated to uint8), resized, encoded: A1111 samples the
        # posterior from an RNG the seed does not control, so its mean; diffusers' way its sample
        pixels = pipe.decode(latents, truncate=params.a1111)
        upscaled = torch.cat([
            pipe.encode_image(upscale_image(Image.fromarray(p), upscaler, size.upscale_width,
                                            size.upscale_height), generator).float()
            for p in pixels
        ])  # fmt: skip
    upscaled = crop(upscaled, size)
    second = second_pass_params(params)
    shape = (latents.shape[0], latents.shape[1], *upscaled.shape[-2:])
    named = {} if params.hr_upscaler is None else {"hr_upscaler": upscaler}  # as A1111 spells it
    if params.a1111:
        requested = second_pass_steps(params)
        init = SecondPass(upscaled, requested, total_steps(params.sampler, params.steps),
                          total_steps(second.sampler, requested))  # fmt: skip
        latents, _, _, resolved = pipe._sample_a1111(second, shape, eta, callback, None, init=init)
        hires = {"hr_sampler_name": resolved.get("sampler"), "hr_scheduler": resolved.get("schedule")}
        # a skip of the negative pass is written if either pass took it
        skips = {k: v for k, v in resolved.items() if k in SKIP_FIELDS and v}
        return latents, {**named, **hires, **skips}
    latents, _, _, _ = pipe._sample_diffusers(second, shape, eta, callback, None, init=(upscaled, generator))
    return latents, named


SKIP_FIELDS = ("skip_early_cond", "s_min_uncond", "s_min_uncond_all")  # sd.a1111_sampling.skips_taken


@dataclass(frozen=True)
class SecondPass:
    """What the pipeline's samplers need to run a hires second pass: the upscaled, cropped `latents`, the
    `steps` that must run, and the prompt-editing totals of both passes (A1111's calculate_hr_conds)."""

    latents: torch.Tensor
    steps: int
    first_total: int
    hires_total: int


def total_steps(sampler: str, steps: int) -> int:
    """A1111's prompt-editing steps of `steps` with `sampler`: doubled for second-order samplers."""
    spec = SAMPLERS.get(sampler_label(sampler))
    return steps * 2 if spec is not None and spec.second_order else steps


def schedule_key(sampler: str, schedule: str | None) -> str | None:
    """The schedule an A1111 k-diffusion sampler runs on under `schedule` ("Automatic": its own; None:
    the model's uniform one)."""
    spec = SAMPLERS.get(sampler)
    if spec is None:
        return None
    if schedule is None or schedule.lower() == "automatic":
        return spec.schedule
    return schedule_type(schedule)


def infer_hr_scheduler(sampler: str, schedule: str, hr_sampler: str | None) -> str | None:
    """The hires schedule of an infotext without "Hires schedule type", as A1111 replays it
    (get_hr_sampler_and_scheduler, then hr_scheduler = p.scheduler): with the first pass's sampler, the
    same (None); with another, "Automatic" where the first pass's schedule is its sampler's own (A1111's
    get_sampler_and_scheduler turns that into Automatic), else the first pass's schedule."""
    if hr_sampler is None or sampler not in SAMPLERS:
        return None
    try:
        own = schedule_key(sampler, "Automatic")
        written = None if schedule.lower() == "automatic" else schedule_type(schedule)
    except ValueError:
        return None
    return "Automatic" if written is None or written == own else schedule


def hires_schedule_text(params: GenerationParams) -> str | None:
    """The "Hires schedule type" to write: A1111's (the second pass's schedule label where it has one and it
    differs from the first pass's), and also where a reader would otherwise replay another schedule ("Uniform"
    for the model's own), so that our PNGs replay exactly."""
    hr_sampler = params.hr_sampler_name or params.sampler
    if hr_sampler not in SAMPLERS or params.hr_scheduler is None:
        return None
    actual = schedule_key(hr_sampler, params.hr_scheduler)
    first = schedule_key(params.sampler, params.schedule) if params.sampler in SAMPLERS else None
    if actual is not None and actual != first:
        return SCHEDULE_TYPES[actual].label
    inferred = infer_hr_scheduler(params.sampler, params.schedule, params.hr_sampler_name)
    replayed = schedule_key(hr_sampler, inferred if inferred is not None else params.schedule)
    if replayed != actual:
        return SCHEDULE_TYPES[actual or "uniform"].label
    return None


def hires_sampler_text(params: GenerationParams) -> str | None:
    """ "Hires sampler": written only when it differs from the first pass's."""
    name = params.hr_sampler_name
    if name is None:
        return None
    if params.a1111:
        found = exact_label(name)
        name = found[0] if found is not None else name
    return None if name == params.sampler else name


__all__ = [
    "DEFAULT_UPSCALER",
    "IMAGE_UPSCALERS",
    "LATENT_UPSCALE_MODES",
    "HiresSize",
    "SecondPass",
    "check_hires",
    "crop",
    "hires_schedule_text",
    "hires_size",
    "infer_hr_scheduler",
    "run_second_pass",
    "second_pass_params",
    "second_pass_start",
    "second_pass_steps",
    "upscale_image",
    "upscale_latents",
    "upscaler_label",
]
