"""A1111's sampler set (v1.10.1, sd_samplers_kdiffusion.py): names, default schedules, and how each is run.

A sampler is bound to a step count and a schedule type as an `A1111Sampler`; `sample()` then runs the
k-diffusion function over a denoiser D(x; sigma), taking its noise from the images' own streams (ancestral
and churn draws) or from per-image Brownian trees (the SDE samplers), as A1111 wires them.

Three kinds differ from the rest in what the caller must do:
- DPM fast / DPM adaptive take a sigma range, not the schedule: txt2img the model's (sigma_min, sigma_max)
  and n = steps, img2img the sliced schedule's ends (its last non-zero sigma and its first) and n = its
  steps. The schedule still gives the initial noise level, sigmas[start]. `sample()` passes them.
  DPM adaptive ignores `steps`: it makes as many model calls as its error control needs (`calls_exact`).
- LCM (`spec.denoiser == "lcm"`) needs LCM's own denoiser (sd.samplers.lcm): its 50-level table gives the
  schedule (`A1111Sampler.table`), integer U-Net timesteps, and the boundary condition on the output.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from torch import Tensor

from sd.noise import BrownianNoise, ImageNoise
from sd.samplers import kdiffusion
from sd.samplers.lcm import LCMSigmas
from sd.samplers.sigmas import SCHEDULE_TYPES, ModelSigmas, get_sigmas, schedule_type
from sd.samplers.timesteps import TIMESTEPS_ALIASES, TIMESTEPS_SAMPLERS, TimestepsSampler


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
    sigma_range: bool = False  # takes (sigma_min, sigma_max), and n with takes_n, instead of the sigmas
    takes_n: bool = False
    adaptive: bool = False  # as many model calls as its error control needs: `calls` is only nominal
    count_calls: Callable[[Tensor], int] | None = None  # model calls over a run's sigmas, if not 1-2 a step
    denoiser: str = "compvis"  # "lcm": LCM's own denoiser (sd.samplers.lcm) instead of CompVis eps -> x0


def _nominal_adaptive_calls(sigmas: Tensor) -> int:
    # A1111's progress counts `steps` tries for DPM adaptive; each try is three model calls.
    return 3 * (len(sigmas) - 1)


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
    # A1111 v1.10.1 passes s_noise to every ancestral sampler but this one (sampler_extra_params).
    "Euler a": SamplerSpec(kdiffusion.euler_ancestral, uses_ensd=True, takes_eta=True),
    "Euler": SamplerSpec(kdiffusion.euler, **_CHURN),
    "LMS": SamplerSpec(kdiffusion.lms),
    "Heun": SamplerSpec(kdiffusion.heun, second_order=True, **_CHURN),
    "DPM2": SamplerSpec(kdiffusion.dpm_2, "karras", second_order=True, discard_penultimate=True, **_CHURN),
    "DPM2 a": SamplerSpec(
        kdiffusion.dpm_2_ancestral, "karras", second_order=True, discard_penultimate=True, **_ANCESTRAL
    ),
    # A1111 passes s_noise to DPM fast, not to DPM adaptive (sampler_extra_params).
    "DPM fast": SamplerSpec(kdiffusion.dpm_fast, **_ANCESTRAL, sigma_range=True, takes_n=True),
    "DPM adaptive": SamplerSpec(
        kdiffusion.dpm_adaptive,
        uses_ensd=True,
        takes_eta=True,
        sigma_range=True,
        adaptive=True,
        count_calls=_nominal_adaptive_calls,
    ),
    "Restart": SamplerSpec(
        kdiffusion.restart, "karras", second_order=True, count_calls=kdiffusion.restart_calls
    ),
    "LCM": SamplerSpec(kdiffusion.lcm, denoiser="lcm"),  # its schedule: LCM's own (LCMSigmas.uniform)
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
    "k_dpm_fast": "DPM fast",
    "k_dpm_ad": "DPM adaptive",
    "restart": "Restart",
    "k_lcm": "LCM",
}


# A1111's whole sampler set: the k-diffusion ones above, then its own timesteps samplers (DDIM, PLMS, UniPC)
LABELS: tuple[str, ...] = (*SAMPLERS, *TIMESTEPS_SAMPLERS)


def sampler_label(name: str) -> str:
    """A1111's label for a sampler name, alias or a pre-1.9 name that carried its schedule; ValueError else.
    See `split_schedule` for the schedule part."""
    label, _ = split_schedule(name)
    return label


def split_schedule(name: str) -> tuple[str, str | None]:
    """("DPM++ 2M", "karras") from "DPM++ 2M Karras" (A1111 before 1.9); (label, None) when no schedule is
    in the name. Case and aliases are forgiven."""
    lowered = name.strip().lower()
    by_lower = {label.lower(): label for label in LABELS}
    if lowered in by_lower:
        return by_lower[lowered], None
    if lowered in ALIASES or lowered in TIMESTEPS_ALIASES:
        return {**ALIASES, **TIMESTEPS_ALIASES}[lowered], None
    for kind in SCHEDULE_TYPES.values():
        suffix = " " + kind.label.lower()
        if lowered.endswith(suffix) and lowered[: -len(suffix)] in by_lower:
            return by_lower[lowered[: -len(suffix)]], schedule_type(kind.label)
    raise ValueError(f"unknown sampler {name!r}; A1111's are: {', '.join(LABELS)}")


def exact_label(name: str) -> tuple[str, str | None] | None:
    """(label, schedule type key or None) when `name` is exactly as A1111 writes a sampler (with a schedule
    suffix as before v1.9: "DPM++ 2M Karras"), or one of its k_ aliases; None otherwise (e.g. our "dpmpp_2m",
    or "ddim", which is ours as much as an A1111 alias)."""
    if name in LABELS:
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
        # The denoiser's sigma table, which the schedule runs over: LCM's 50 levels for LCM.
        self.table: ModelSigmas = self.model
        if self.spec.denoiser == "lcm" and not isinstance(self.model, LCMSigmas):
            self.table = LCMSigmas.from_model(self.model)
        self.sigmas = get_sigmas(
            self.schedule_key or "uniform", self.steps, self.table, self.sigma_min, self.sigma_max, self.rho,
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

    def sampling_steps(self, start: int = 0) -> int:
        """The steps of a run from sigma `start` as A1111 counts them (launch_sampling: txt2img its steps,
        img2img t_enc + 1)."""
        return self.steps - start

    def denoiser_steps(self, start: int = 0) -> int:
        """The calls A1111's CFG denoiser expects of a run from sigma `start` (its total_steps, which
        "Skip Early CFG" is a fraction of): the steps run, doubled if second-order."""
        steps = self.sampling_steps(start)
        return steps * 2 if self.spec.second_order else steps

    def step_of_call(self, call: int) -> int | None:
        """The step model call `call` belongs to (two a step for second-order samplers, one at the last);
        None where calls do not map to steps so (DPM fast and adaptive, Restart)."""
        spec = self.spec
        if spec.sigma_range or spec.adaptive or spec.count_calls is not None:
            return None
        return call // 2 if spec.second_order else call

    def img2img_start(self, strength: float) -> int:
        """Index of the first sigma img2img runs from (A1111: t_enc = int(min(strength, 0.999) * steps))."""
        t_enc = int(min(strength, 0.999) * self.steps)
        return self.steps - t_enc - 1

    def calls(self, start: int = 0) -> int:
        """Model calls of a run from sigma `start`: one per step, two for second-order steps that do not
        end at sigma 0 (Restart: its plan's). Only nominal for DPM adaptive (see `calls_exact`): three
        per step, as A1111's progress counts its tries."""
        if self.spec.count_calls is not None:
            return self.spec.count_calls(self.sigmas[start:])
        steps = len(self.sigmas) - 1 - start
        return steps + (steps - 1 if self.spec.second_order else 0)

    @property
    def calls_exact(self) -> bool:
        """Whether `calls()` is the number of model calls a run makes (not for DPM adaptive)."""
        return not self.spec.adaptive

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

    def inputs(self, start: int = 0, img2img: bool | None = None) -> dict:
        """What the function runs over, as A1111 passes it: the sigmas from `start`, or for DPM fast and
        adaptive a sigma range: txt2img the model's, img2img (None: when start > 0) the sliced schedule's
        last non-zero sigma and first one, and n = the run's steps."""
        if not self.spec.sigma_range:
            return {"sigmas": self.sigmas[start:]}
        img2img = start > 0 if img2img is None else img2img
        if img2img:
            run = self.sigmas[start:]
            out = {"sigma_min": run[-2], "sigma_max": run[0], "n": len(run) - 1}
        else:
            out = {"sigma_min": self.table.sigma_min, "sigma_max": self.table.sigma_max, "n": self.steps}
        if not self.spec.takes_n:
            del out["n"]
        return out

    def sample(
        self, model: kdiffusion.Denoiser, x: Tensor, noise: ImageNoise, start: int = 0,
        img2img: bool | None = None,
    ) -> Iterator[Tensor]:  # fmt: skip
        """Run from sigma `start` (img2img), yielding x after every model call. The Brownian trees of the
        SDE samplers span the whole schedule, img2img included (A1111's choice). `img2img` matters only for
        DPM fast and adaptive (see `inputs`); pass True for an img2img run from start 0."""
        extra = self.kwargs()
        if self.spec.brownian:
            sigmas = self.sigmas
            extra["brownian"] = BrownianNoise(
                x, sigmas[sigmas > 0].min(), sigmas.max(), noise.seeds, noise.source
            )
        else:
            extra["noise"] = lambda: noise.next().to(x)
        yield from self.spec.function(model, x, **self.inputs(start, img2img), **extra)


def writes_ensd(label: str, eta: float | None) -> bool:
    """Whether A1111 names ENSD in the infotext of a run (its is_sampler_using_eta_noise_seed_delta): only
    for the samplers marked as using it, with an eta that is not 0. (It still shifts every sampler's
    noise draws: DDIM with eta, churn.)"""
    spec = SAMPLERS.get(label)
    return spec is not None and spec.uses_ensd and (1.0 if eta is None else eta) != 0


def catalogue() -> list[tuple[str, list[str], str | None, str]]:
    """(label, aliases, Automatic's schedule type key or None, what Automatic means) of each A1111 sampler."""
    aliases = {**ALIASES, **TIMESTEPS_ALIASES}
    out = []
    for label in LABELS:
        spec = SAMPLERS.get(label)
        if spec is None:
            schedule, meaning = None, "none: its own timesteps (1, 1 + 1000 // steps, ...)"
        elif spec.sigma_range:
            schedule, meaning = None, "none: the model's sigma range"
        elif spec.denoiser == "lcm":
            schedule, meaning = None, "LCM's own (its 50 timesteps)"
        else:
            schedule = spec.schedule
            meaning = SCHEDULE_TYPES[schedule].label if schedule else "the model's own (Uniform)"
        out.append((label, [a for a, target in aliases.items() if target == label], schedule, meaning))
    return out


def bind(
    label: str, steps: int, alphas_cumprod: Tensor, schedule: str = "Automatic", *, eta: float | None = None,
    eta_ddim: float | None = None, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = 0.0,
    s_noise: float = 1.0, sigma_min: float | None = None, sigma_max: float | None = None,
    rho: float | None = None, discard_penultimate: bool = False,
) -> A1111Sampler | TimestepsSampler:  # fmt: skip
    """Any A1111 sampler bound to its settings: a k-diffusion one over the model's sigmas, or a timesteps one
    (DDIM, PLMS, UniPC) over its alphas_cumprod, whose eta is `eta` (A1111's p.eta) else `eta_ddim`."""
    label = sampler_label(label)
    if label in TIMESTEPS_SAMPLERS:
        return TimestepsSampler(label, steps, alphas_cumprod, eta if eta is not None else eta_ddim,
                                discard_penultimate)  # fmt: skip
    return A1111Sampler(
        label, steps, ModelSigmas(alphas_cumprod), schedule, eta, s_churn, s_tmin, s_tmax, s_noise,
        sigma_min, sigma_max, rho, discard_penultimate,
    )  # fmt: skip


__all__ = [
    "ALIASES",
    "LABELS",
    "SAMPLERS",
    "A1111Sampler",
    "SamplerSpec",
    "bind",
    "catalogue",
    "exact_label",
    "sampler_label",
    "split_schedule",
    "writes_ensd",
]
