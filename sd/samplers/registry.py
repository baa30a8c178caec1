"""Samplers by name: each bound to a step count as a :class:`Sampler` with diffusers' grid for SD1.5.

Usage (txt2img)::

    sampler = get_sampler("euler", 30)
    x = noise * sampler.init_noise_sigma
    for i, x in sampler.sample(model, x, generator=g):
        ...

img2img starts part-way, as diffusers' img2img pipeline does::

    start = sampler.start_index(strength)
    x = sampler.add_noise(x0, noise, start)
    for i, x in sampler.sample(model, x, generator=g, start=start):
        ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from sd.config import SD15, ScheduleConfig
from sd.samplers import sampling
from sd.samplers.sampling import EpsModel
from sd.samplers.schedule import alphas_cumprod, karras_sigmas, leading_timesteps, sigma_to_t, train_sigmas

Loop = Callable[[EpsModel, Tensor, torch.Generator | None, int], Iterator[Tensor]]


@dataclass(frozen=True, eq=False)
class Sampler:
    """A sampler bound to a number of steps.

    ``timesteps`` are the U-Net timesteps of the model calls, in order, as diffusers' ``scheduler.timesteps``
    after ``set_timesteps(num_steps)`` (2nd-order samplers list two calls per step and have ``order`` 2).
    ``sigmas`` are the VE noise levels of the step boundaries (num_steps + 1, k-diffusion's convention),
    None for the discrete-time samplers.
    """

    name: str
    num_steps: int
    timesteps: Tensor
    sigmas: Tensor | None
    init_noise_sigma: float
    order: int
    stochastic: bool
    _loop: Loop = field(repr=False)
    _noise_scales: Callable[[int], tuple[Tensor, Tensor]] = field(repr=False)

    def start_index(self, strength: float) -> int:
        """Index into ``timesteps`` where img2img at ``strength`` starts (as diffusers' ``get_timesteps``)."""
        init_timestep = min(int(self.num_steps * strength), self.num_steps)
        t_start = max(self.num_steps - init_timestep, 0)
        if t_start >= self.num_steps:
            raise ValueError(f"strength {strength} leaves no steps out of {self.num_steps}")
        return t_start * self.order

    def calls(self, strength: float | None = None) -> int:
        """Model calls a run makes: all of them, or img2img's from ``start_index(strength)``."""
        return len(self.timesteps) - (0 if strength is None else self.start_index(strength))

    def add_noise(self, x0: Tensor, noise: Tensor, start: int = 0) -> Tensor:
        """Noise a clean latent to the level of model call ``start`` (the scheduler's ``add_noise``)."""
        self._check_start(start)
        scale, noise_scale = self._noise_scales(start)
        return scale.to(x0) * x0 + noise_scale.to(x0) * noise

    def sample(
        self, model: EpsModel, x: Tensor, generator: torch.Generator | None = None, start: int = 0
    ) -> Iterator[tuple[int, Tensor]]:
        """Run from model call ``start``, yielding ``(i, x)`` after call ``i`` (an index into ``timesteps``).

        ``x`` is ``noise * init_noise_sigma`` for txt2img or ``add_noise(x0, noise, start)`` for img2img; the
        last yielded latent is the result. Stochastic samplers draw all their noise from ``generator``.
        """
        self._check_start(start)
        if self.stochastic and generator is None:
            raise ValueError(f"sampler {self.name!r} is stochastic: pass an explicit torch.Generator")
        yield from enumerate(self._loop(model, x, generator, start), start)

    def _check_start(self, start: int) -> None:
        if not 0 <= start < len(self.timesteps) or start % self.order:
            raise ValueError(f"start {start} is not the first call of a step of {self.name!r}")


@dataclass(frozen=True)
class _Spec:
    description: str
    build: Callable[[str, int, ScheduleConfig, bool, float], Sampler]
    karras: bool = False
    eta: bool = False


# --- grids --------------------------------------------------------------------------------------------------


def _vp_noise_scales(abar: Tensor, timesteps: Tensor) -> Callable[[int], tuple[Tensor, Tensor]]:
    return lambda start: (abar[timesteps[start]] ** 0.5, (1 - abar[timesteps[start]]) ** 0.5)


def _ve_noise_scales(sigmas: Tensor, order: int) -> Callable[[int], tuple[Tensor, Tensor]]:
    return lambda start: (torch.tensor(1.0), sigmas[start // order])


def _vp_sigma_noise_scales(sigmas: Tensor) -> Callable[[int], tuple[Tensor, Tensor]]:
    def scales(start: int) -> tuple[Tensor, Tensor]:
        alpha_t = 1 / (sigmas[start] ** 2 + 1) ** 0.5
        return alpha_t, sigmas[start] * alpha_t

    return scales


def _k_grid(
    num_steps: int, schedule: ScheduleConfig, karras: bool, round_karras: bool = False
) -> tuple[Tensor, Tensor, float]:
    """Euler-family grid: sigma at each leading timestep (+ 0), or a Karras ramp between the end ones.

    Like diffusers, the Karras ramp spans the sigmas of the first and last *leading* timesteps (t = 751..1
    for 4 steps), not the full training range that k-diffusion and DPM-Solver/UniPC use.
    """
    table = train_sigmas(alphas_cumprod(schedule)).numpy()
    timesteps = leading_timesteps(num_steps, schedule.num_train_timesteps).astype(np.float32)
    sigmas = np.interp(timesteps, np.arange(len(table)), table)
    if karras:
        sigmas = karras_sigmas(sigmas[-1].item(), sigmas[0].item(), num_steps)
        timesteps = sigma_to_t(sigmas, np.log(table))
        if round_karras:  # KDPM2 rounds these (only the timesteps: the sigmas stay on the ramp)
            timesteps = timesteps.round()
    sigmas_t = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
    return torch.from_numpy(timesteps.astype(np.float32)), sigmas_t, float((sigmas_t.max() ** 2 + 1) ** 0.5)


def _multistep_grid(num_steps: int, schedule: ScheduleConfig, karras: bool) -> tuple[Tensor, Tensor]:
    """DPM-Solver/UniPC grid: leading timesteps over num_steps + 1 intervals, or a Karras ramp over the full
    training sigma range with rounded timesteps; always ending at sigma = 0."""
    table = train_sigmas(alphas_cumprod(schedule)).numpy()
    if karras:
        sigmas = karras_sigmas(table[0].item(), table[-1].item(), num_steps)
        timesteps = sigma_to_t(sigmas, np.log(table)).round().astype(np.int64)
    else:
        timesteps = leading_timesteps(num_steps, schedule.num_train_timesteps, drop_first=True)
        sigmas = table[timesteps]
    sigmas_t = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
    return torch.from_numpy(timesteps), sigmas_t


# --- builders -----------------------------------------------------------------------------------------------


def _build_discrete(name: str, num_steps: int, schedule: ScheduleConfig, karras: bool, eta: float) -> Sampler:
    abar = alphas_cumprod(schedule)
    timesteps = torch.from_numpy(leading_timesteps(num_steps, schedule.num_train_timesteps))
    final_abar = abar[0]  # SD1.5: set_alpha_to_one=False
    stochastic = name == "ddpm" or eta > 0
    if name == "ddpm":

        def loop(
            model: EpsModel, x: Tensor, generator: torch.Generator | None, start: int
        ) -> Iterator[Tensor]:
            return sampling.sample_ddpm(model, x, timesteps[start:], abar, generator)

    elif name == "ddim":

        def loop(
            model: EpsModel, x: Tensor, generator: torch.Generator | None, start: int
        ) -> Iterator[Tensor]:
            return sampling.sample_ddim(model, x, timesteps[start:], abar, final_abar, eta, generator)

    else:  # pndm: the second timestep is visited twice (see sample_plms)
        timesteps = torch.cat([timesteps[:2], timesteps[1:]])
        stride = schedule.num_train_timesteps // num_steps

        def loop(
            model: EpsModel, x: Tensor, generator: torch.Generator | None, start: int
        ) -> Iterator[Tensor]:
            return sampling.sample_plms(model, x, timesteps[start:], abar, final_abar, stride)

    return Sampler(
        name, num_steps, timesteps, None, 1.0, 1, stochastic, loop, _vp_noise_scales(abar, timesteps)
    )


LCM_ORIGINAL_STEPS = 50  # the distillation schedule LCM/LCM-LoRA weights were trained on


def _build_lcm(name: str, num_steps: int, schedule: ScheduleConfig, karras: bool, eta: float) -> Sampler:
    abar = alphas_cumprod(schedule)
    if num_steps > LCM_ORIGINAL_STEPS:
        raise ValueError(f"lcm supports at most {LCM_ORIGINAL_STEPS} steps, got {num_steps}")
    # a subset of the 50-step distillation grid 999, 979, ..., 19 (LCM ignores steps_offset)
    k = schedule.num_train_timesteps // LCM_ORIGINAL_STEPS
    grid = (np.arange(1, LCM_ORIGINAL_STEPS + 1) * k - 1)[::-1]
    picks = np.floor(np.linspace(0, len(grid), num=num_steps, endpoint=False)).astype(np.int64)
    timesteps = torch.from_numpy(grid[picks].copy())

    def loop(model: EpsModel, x: Tensor, generator: torch.Generator | None, start: int) -> Iterator[Tensor]:
        return sampling.sample_lcm(model, x, timesteps[start:], abar, generator)

    return Sampler(name, num_steps, timesteps, None, 1.0, 1, True, loop, _vp_noise_scales(abar, timesteps))


def _build_k(name: str, num_steps: int, schedule: ScheduleConfig, karras: bool, eta: float) -> Sampler:
    timesteps, sigmas, init_sigma = _k_grid(num_steps, schedule, karras)
    noise_scales = _ve_noise_scales(sigmas, 1)
    if name == "lms":

        def loop(
            model: EpsModel, x: Tensor, generator: torch.Generator | None, start: int
        ) -> Iterator[Tensor]:
            return sampling.sample_lms(model, x, sigmas, timesteps, first=start)

    elif name == "euler":

        def loop(
            model: EpsModel, x: Tensor, generator: torch.Generator | None, start: int
        ) -> Iterator[Tensor]:
            return sampling.sample_euler(model, x, sigmas[start:], timesteps[start:])

    else:  # euler_a

        def loop(
            model: EpsModel, x: Tensor, generator: torch.Generator | None, start: int
        ) -> Iterator[Tensor]:
            return sampling.sample_euler_ancestral(model, x, sigmas[start:], timesteps[start:], generator)

    return Sampler(name, num_steps, timesteps, sigmas, init_sigma, 1, name == "euler_a", loop, noise_scales)


def _build_heun(name: str, num_steps: int, schedule: ScheduleConfig, karras: bool, eta: float) -> Sampler:
    timesteps, sigmas, init_sigma = _k_grid(num_steps, schedule, karras)
    calls = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)])

    def loop(model: EpsModel, x: Tensor, generator: torch.Generator | None, start: int) -> Iterator[Tensor]:
        return sampling.sample_heun(model, x, sigmas[start // 2 :], timesteps[start // 2 :])

    return Sampler(name, num_steps, calls, sigmas, init_sigma, 2, False, loop, _ve_noise_scales(sigmas, 2))


def _build_dpm2(name: str, num_steps: int, schedule: ScheduleConfig, karras: bool, eta: float) -> Sampler:
    timesteps, sigmas, init_sigma = _k_grid(num_steps, schedule, karras, round_karras=True)
    # geometric mean of each step's end sigmas, computed as diffusers does (torch.lerp of the logs)
    sigmas_mid = sigmas.log().lerp(sigmas.roll(1).log(), 0.5).exp()[1:]
    log_table = np.log(train_sigmas(alphas_cumprod(schedule)).numpy())
    timesteps_mid = torch.from_numpy(sigma_to_t(sigmas_mid.numpy(), log_table).astype(np.float32))
    calls = torch.stack([timesteps[:-1], timesteps_mid[:-1]], dim=1).flatten()
    calls = torch.cat([calls, timesteps[-1:]])

    def loop(model: EpsModel, x: Tensor, generator: torch.Generator | None, start: int) -> Iterator[Tensor]:
        k = start // 2
        return sampling.sample_dpm_2(model, x, sigmas[k:], timesteps[k:], sigmas_mid[k:], timesteps_mid[k:])

    return Sampler(name, num_steps, calls, sigmas, init_sigma, 2, False, loop, _ve_noise_scales(sigmas, 2))


def _build_multistep(
    name: str, num_steps: int, schedule: ScheduleConfig, karras: bool, eta: float
) -> Sampler:
    timesteps, sigmas = _multistep_grid(num_steps, schedule, karras)
    fn = sampling.sample_unipc if name == "unipc" else sampling.sample_dpmpp_2m

    def loop(model: EpsModel, x: Tensor, generator: torch.Generator | None, start: int) -> Iterator[Tensor]:
        if name == "dpmpp_2m_sde":
            return sampling.sample_dpmpp_2m_sde(model, x, sigmas[start:], timesteps[start:], generator)
        return fn(model, x, sigmas[start:], timesteps[start:])

    stochastic = name == "dpmpp_2m_sde"
    return Sampler(
        name, num_steps, timesteps, sigmas, 1.0, 1, stochastic, loop, _vp_sigma_noise_scales(sigmas)
    )


_SPECS: dict[str, _Spec] = {
    "ddpm": _Spec("DDPM ancestral sampling (Ho et al. 2020); stochastic, wants many steps", _build_discrete),
    "ddim": _Spec(
        "DDIM (Song et al. 2021); deterministic at eta=0, eta>0 adds noise", _build_discrete, eta=True
    ),
    "pndm": _Spec("PLMS/PNDM, skip_prk_steps (Liu et al. 2022); SD1.5's default scheduler", _build_discrete),
    "lms": _Spec("linear multistep, order 4, on the sigma ODE (k-diffusion)", _build_k, karras=True),
    "euler": _Spec("Euler on the probability-flow ODE (Karras et al. 2022)", _build_k, karras=True),
    "euler_a": _Spec("Euler ancestral: Euler step plus fresh noise; stochastic", _build_k),
    "heun": _Spec("Heun 2nd order (Karras et al. 2022); 2 model calls per step", _build_heun, karras=True),
    "dpm2": _Spec("DPM-Solver-2 (k-diffusion form); 2 model calls per step", _build_dpm2, karras=True),
    "dpmpp_2m": _Spec(
        "DPM-Solver++(2M) (Lu et al. 2022); multistep 2nd order", _build_multistep, karras=True
    ),
    "dpmpp_2m_sde": _Spec("SDE-DPM-Solver++(2M); stochastic", _build_multistep, karras=True),
    "unipc": _Spec("UniPC bh2 predictor-corrector (Zhao et al. 2023)", _build_multistep, karras=True),
    "lcm": _Spec("Latent Consistency Model sampling, for LCM weights (2-8 steps)", _build_lcm),
}

ALIASES: dict[str, str] = {"plms": "pndm"}

SAMPLERS: dict[str, str] = {name: spec.description for name, spec in _SPECS.items()}
"""Sampler names with one-line descriptions (aliases: :data:`ALIASES`)."""

KARRAS_SAMPLERS: frozenset[str] = frozenset(name for name, spec in _SPECS.items() if spec.karras)
"""Samplers that take ``karras=True`` (diffusers' ``use_karras_sigmas``)."""


def get_sampler(
    name: str,
    num_steps: int,
    schedule: ScheduleConfig = SD15.schedule,
    karras: bool = False,
    eta: float = 0.0,
) -> Sampler:
    """The sampler ``name`` (or an alias) for ``num_steps`` steps over the training noise ``schedule``.

    ``karras`` swaps in the Karras et al. sigma ramp (samplers in :data:`KARRAS_SAMPLERS`); ``eta`` is DDIM's
    noise scale.
    """
    canonical = ALIASES.get(name, name)
    spec = _SPECS.get(canonical)
    if spec is None:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join([*SAMPLERS, *ALIASES])}")
    if karras and not spec.karras:
        raise ValueError(f"sampler {name!r} has no Karras schedule; those that do: {sorted(KARRAS_SAMPLERS)}")
    if eta and not spec.eta:
        raise ValueError(f"eta applies to ddim only, not {name!r}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return spec.build(canonical, num_steps, schedule, karras, eta)
