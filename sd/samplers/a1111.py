"""A1111's sampler set (v1.10.1, sd_samplers_kdiffusion.py): names, default schedules, and how each is run.

A sampler is bound to a step count and a schedule type as an `A1111Sampler`; `sample()` then runs the
k-diffusion function over a denoiser D(x; sigma), taking its noise from the images' own streams (ancestral
and churn draws) or from per-image Brownian trees (the SDE samplers), as A1111 wires them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from torch import Tensor

from sd.noise import BrownianNoise, ImageNoise
from sd.samplers import kdiffusion
from sd.samplers.sigmas import SCHEDULE_TYPES, ModelSigmas, get_sigmas, schedule_type


@dataclass(frozen=True)
class SamplerSpec:
    function: Callable[..., Iterator[Tensor]]
    schedule: str | None = None  # what "Automatic" means: a SCHEDULE_TYPES key, None for the model's own
    second_order: bool = False  # two model calls per step: prompt-editing steps count double
    brownian: bool = False  # noise from Brownian trees (seeded per image) instead of the streams
    discard_penultimate: bool = False
    uses_ensd: bool = False  # A1111 writes ENSD in the infotext only for these (with eta != 0)
    takes_eta: bool = False
    takes_churn: bool = False  # s_churn, s_tmin, s_tmax
    takes_s_noise: bool = False
    options: dict = field(default_factory=dict)


_ANCESTRAL = dict(uses_ensd=True, takes_eta=True, takes_s_noise=True)
_SDE = dict(brownian=True, takes_eta=True, takes_s_noise=True)
_CHURN = dict(takes_churn=True, takes_s_noise=True)

SAMPLERS: dict[str, SamplerSpec] = {
    "DPM++ 2M": SamplerSpec(kdiffusion.dpmpp_2m, "karras"),
    "DPM++ SDE": SamplerSpec(kdiffusion.dpmpp_sde, "karras", second_order=True, **_SDE),
    "DPM++ 2M SDE": SamplerSpec(kdiffusion.dpmpp_2m_sde, "exponential", **_SDE),
    "DPM++ 2M SDE Heun": SamplerSpec(
        kdiffusion.dpmpp_2m_sde, "exponential", **_SDE, options={"solver_type": "heun"}
    ),
    "DPM++ 2S a": SamplerSpec(kdiffusion.dpmpp_2s_ancestral, "karras", second_order=True, **_ANCESTRAL),
    "DPM++ 3M SDE": SamplerSpec(kdiffusion.dpmpp_3m_sde, "exponential", discard_penultimate=True, **_SDE),
    "Euler a": SamplerSpec(kdiffusion.euler_ancestral, **_ANCESTRAL),
    "Euler": SamplerSpec(kdiffusion.euler, **_CHURN),
    "LMS": SamplerSpec(kdiffusion.lms),
    "Heun": SamplerSpec(kdiffusion.heun, second_order=True, **_CHURN),
    "DPM2": SamplerSpec(kdiffusion.dpm_2, "karras", second_order=True, discard_penultimate=True, **_CHURN),
    "DPM2 a": SamplerSpec(
        kdiffusion.dpm_2_ancestral, "karras", second_order=True, discard_penultimate=True, **_ANCESTRAL
    ),
}

# A1111's aliases (what its API and old configs accept) -> label
ALIASES: dict[str, str] = {
    "k_dpmpp_2m": "DPM++ 2M",
    "k_dpmpp_sde": "DPM++ SDE",
    "k_dpmpp_2m_sde": "DPM++ 2M SDE",
    "k_dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun",
    "k_dpmpp_2s_a": "DPM++ 2S a",
    "k_dpmpp_3m_sde": "DPM++ 3M SDE",
    "k_euler_a": "Euler a",
    "k_euler_ancestral": "Euler a",
    "k_euler": "Euler",
    "k_lms": "LMS",
    "k_heun": "Heun",
    "k_dpm_2": "DPM2",
    "k_dpm_2_a": "DPM2 a",
}


def sampler_label(name: str) -> str:
    """A1111's label for a sampler name, alias or a pre-1.9 name that carried its schedule; ValueError else.
    See `split_schedule` for the schedule part."""
    label, _ = split_schedule(name)
    return label


def split_schedule(name: str) -> tuple[str, str | None]:
    """("DPM++ 2M", "karras") from "DPM++ 2M Karras" (A1111 before 1.9); (label, None) when no schedule is
    in the name. Case and aliases are forgiven."""
    lowered = name.strip().lower()
    by_lower = {label.lower(): label for label in SAMPLERS}
    if lowered in by_lower:
        return by_lower[lowered], None
    if lowered in ALIASES:
        return ALIASES[lowered], None
    for kind in SCHEDULE_TYPES.values():
        suffix = " " + kind.label.lower()
        if lowered.endswith(suffix) and lowered[: -len(suffix)] in by_lower:
            return by_lower[lowered[: -len(suffix)]], schedule_type(kind.label)
    raise ValueError(f"unknown A1111 sampler {name!r}; one of: {', '.join(SAMPLERS)}")


def exact_label(name: str) -> tuple[str, str | None] | None:
    """(label, schedule type key or None) when `name` is exactly as A1111 writes a sampler (with a schedule
    suffix as before v1.9: "DPM++ 2M Karras"), or one of its aliases; None otherwise (e.g. our "dpmpp_2m")."""
    if name in SAMPLERS:
        return name, None
    if name in ALIASES:
        return ALIASES[name], None
    for kind in SCHEDULE_TYPES.values():
        prefix = name.removesuffix(" " + kind.label)
        if prefix != name and prefix in SAMPLERS:
            return prefix, schedule_type(kind.label)
    return None


@dataclass
class A1111Sampler:
    """A1111 sampler `label` bound to `steps` and a schedule type ("Automatic": the sampler's own)."""

    label: str
    steps: int
    model: ModelSigmas
    schedule: str = "Automatic"
    eta: float | None = None  # None: A1111's eta_ancestral default, 1.0
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = 0.0  # 0: infinity, as A1111 reads it
    s_noise: float = 1.0
    sigma_min: float | None = None  # the schedule's range; None: the model's
    sigma_max: float | None = None
    rho: float | None = None
    discard_penultimate: bool = False  # forced on (A1111's always_discard_next_to_last_sigma)

    def __post_init__(self) -> None:
        self.label = sampler_label(self.label)
        self.spec = SAMPLERS[self.label]
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        self.schedule_key = (
            self.spec.schedule if self.schedule.lower() == "automatic" else schedule_type(self.schedule)
        )
        self.sigmas = get_sigmas(
            self.schedule_key or "uniform", self.steps, self.model, self.sigma_min, self.sigma_max, self.rho,
            discard_penultimate=self.spec.discard_penultimate or self.discard_penultimate,
        )  # fmt: skip

    @property
    def schedule_label(self) -> str:
        """What A1111 writes as "Schedule type": the resolved schedule's label, "Automatic" if none."""
        return SCHEDULE_TYPES[self.schedule_key].label if self.schedule_key else "Automatic"

    @property
    def total_steps(self) -> int:
        """Prompt-editing steps: doubled for second-order samplers, as A1111 counts them."""
        return self.steps * 2 if self.spec.second_order else self.steps

    def img2img_start(self, strength: float) -> int:
        """Index of the first sigma img2img runs from (A1111: t_enc = int(min(strength, 0.999) * steps))."""
        t_enc = int(min(strength, 0.999) * self.steps)
        return self.steps - t_enc - 1

    def calls(self, start: int = 0) -> int:
        """Model calls of a run from sigma `start`: one per step, two for second-order steps that do not
        end at sigma 0."""
        steps = len(self.sigmas) - 1 - start
        return steps + (steps - 1 if self.spec.second_order else 0)

    def kwargs(self) -> dict:
        """The settings the function takes, as A1111 passes them."""
        spec, out = self.spec, dict(self.spec.options)
        if spec.takes_eta:
            out["eta"] = 1.0 if self.eta is None else self.eta
        if spec.takes_churn:
            out.update(s_churn=self.s_churn, s_tmin=self.s_tmin, s_tmax=self.s_tmax or math.inf)
        if spec.takes_s_noise:
            out["s_noise"] = self.s_noise
        return out

    def sample(
        self, model: kdiffusion.Denoiser, x: Tensor, noise: ImageNoise, start: int = 0
    ) -> Iterator[Tensor]:
        """Run from sigma `start` (img2img), yielding x after every model call. The Brownian trees of the
        SDE samplers span the whole schedule, img2img included (A1111's choice)."""
        extra = self.kwargs()
        if self.spec.brownian:
            sigmas = self.sigmas
            extra["brownian"] = BrownianNoise(
                x, sigmas[sigmas > 0].min(), sigmas.max(), noise.seeds, noise.source
            )
        else:
            extra["noise"] = lambda: noise.next().to(x)
        yield from self.spec.function(model, x, self.sigmas[start:], **extra)


__all__ = [
    "ALIASES",
    "SAMPLERS",
    "A1111Sampler",
    "SamplerSpec",
    "exact_label",
    "sampler_label",
    "split_schedule",
]
