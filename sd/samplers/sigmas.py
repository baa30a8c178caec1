"""The k-diffusion view of SD1.5 and A1111's schedule types ("Schedule type" in its infotext).

The model's noise levels are sigma_t = sqrt((1 - abar_t) / abar_t) for t = 0..999, from abar as the
original LDM code stores it (float64 cumprod, kept as float32). A noise level between two table entries
maps to a fractional U-Net timestep by linear interpolation in log sigma (`sigma_to_t`), the way
k-diffusion's CompVisDenoiser does; every computation here is k-diffusion's / A1111's, in their dtypes
(float32 on the CPU), so the sigmas agree bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from sd.config import ScheduleConfig


def ldm_alphas_cumprod(schedule: ScheduleConfig, downcast: bool = False) -> Tensor:
    """abar as the original checkpoint stores it: float64 arithmetic, kept as float32. `downcast` gives
    it as fp16, as A1111 before v1.7.0-225 kept it ("Downcast alphas_cumprod"): the model's sigma table is
    then computed in fp16 too."""
    betas = torch.linspace(schedule.beta_start**0.5, schedule.beta_end**0.5, schedule.num_train_timesteps,
                           dtype=torch.float64) ** 2  # fmt: skip
    abar = torch.cumprod(1.0 - betas, dim=0).float()
    return abar.half() if downcast else abar


class ModelSigmas:
    """The model's sigma table (k-diffusion's DiscreteSchedule)."""

    def __init__(self, alphas_cumprod: Tensor):
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return self.sigmas[0].item()

    @property
    def sigma_max(self) -> float:
        return self.sigmas[-1].item()

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Fractional timestep of each noise level (linear in log sigma between table entries)."""
        # 1-d, as A1111 passes it (sigma * s_in): with an fp16 table the arithmetic is then float32's
        log_sigma = sigma.reshape(-1).log()
        dists = log_sigma - self.log_sigmas[:, None]
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        low_log, high_log = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = ((low_log - log_sigma) / (low_log - high_log)).clamp(0, 1)
        return ((1 - w) * low + w * (low + 1)).view(sigma.shape)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        t = t.float()
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def uniform(self, n: int) -> Tensor:
        """The model's own schedule: n timesteps evenly spaced from 999 to 0, then 0."""
        t = torch.linspace(len(self.sigmas) - 1, 0, n)
        return _append_zero(self.t_to_sigma(t))


def _append_zero(x: Tensor) -> Tensor:
    return torch.cat([x, x.new_zeros([1])])


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022): evenly spaced in sigma**(1/rho)."""
    ramp = torch.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Evenly spaced in log sigma."""
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> Tensor:
    """A polynomial of degree rho in log sigma."""
    ramp = torch.linspace(1, 0, n) ** rho
    return _append_zero(torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


def sgm_uniform(n: int, sigma_min: float, sigma_max: float, model: ModelSigmas) -> Tensor:
    """Timesteps evenly spaced over n + 1 points from sigma_max's to sigma_min's, the last dropped."""
    start, end = model.sigma_to_t(torch.tensor(sigma_max)), model.sigma_to_t(torch.tensor(sigma_min))
    sigmas = [model.t_to_sigma(t) for t in torch.linspace(start, end, n + 1)[:-1]]
    return torch.FloatTensor([*sigmas, 0.0])


def normal(n: int, sigma_min: float, sigma_max: float, model: ModelSigmas) -> Tensor:
    """Timesteps evenly spaced from sigma_max's to sigma_min's."""
    start, end = model.sigma_to_t(torch.tensor(sigma_max)), model.sigma_to_t(torch.tensor(sigma_min))
    return torch.FloatTensor([*(model.t_to_sigma(t) for t in torch.linspace(start, end, n)), 0.0])


def kl_optimal(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Evenly spaced in arctan(sigma) (Sabour et al. 2024); ends at sigma_min, not 0."""
    alpha_min, alpha_max = torch.arctan(torch.tensor(sigma_min)), torch.arctan(torch.tensor(sigma_max))
    steps = torch.arange(n + 1)
    return torch.tan(steps / n * alpha_min + (1.0 - steps / n) * alpha_max)


# NVIDIA's Align Your Steps levels for SD1.5, used as they are at 11 steps (A1111's rule), interpolated in
# log sigma for other step counts.
ALIGN_YOUR_STEPS_SD15 = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]


def align_your_steps(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    sigmas = list(ALIGN_YOUR_STEPS_SD15)
    if n != len(sigmas):
        xs, ys = np.linspace(0, 1, len(sigmas)), np.log(sigmas[::-1])
        sigmas = np.append(np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1].copy(), [0.0])
    else:
        sigmas.append(0.0)
    return torch.FloatTensor(sigmas)


def simple(n: int, sigma_min: float, sigma_max: float, model: ModelSigmas) -> Tensor:
    """Every (1000 / n)-th table sigma from the top."""
    stride = len(model.sigmas) / n
    return torch.FloatTensor([*(float(model.sigmas[-(1 + int(x * stride))]) for x in range(n)), 0.0])


def ddim(n: int, sigma_min: float, sigma_max: float, model: ModelSigmas) -> Tensor:
    """The table sigmas at DDIM's timesteps 1, 1 + 1000 // n, ..."""
    stride = max(len(model.sigmas) // n, 1)
    sigmas = [float(model.sigmas[x]) for x in range(1, len(model.sigmas), stride)]
    return torch.FloatTensor([*sigmas[::-1], 0.0])


BETA_ALPHA, BETA_BETA = 0.6, 0.6  # A1111's beta_dist_alpha / beta_dist_beta defaults


def beta(n: int, sigma_min: float, sigma_max: float, model: ModelSigmas) -> Tensor:
    """Beta-distribution quantiles between sigma_min and sigma_max (Lee et al. 2024)."""
    from scipy import stats

    quantiles = [stats.beta.ppf(x, BETA_ALPHA, BETA_BETA) for x in 1 - np.linspace(0, 1, n)]
    return torch.FloatTensor([*(sigma_min + x * (sigma_max - sigma_min) for x in quantiles), 0.0])


@dataclass(frozen=True)
class ScheduleType:
    label: str  # as A1111 writes it in "Schedule type"
    function: Callable[..., Tensor] | None  # None: the model's own (uniform) schedule
    default_rho: float | None = None
    needs_model: bool = False


SCHEDULE_TYPES: dict[str, ScheduleType] = {
    "uniform": ScheduleType("Uniform", None),
    "karras": ScheduleType("Karras", karras, default_rho=7.0),
    "exponential": ScheduleType("Exponential", exponential),
    "polyexponential": ScheduleType("Polyexponential", polyexponential, default_rho=1.0),
    "sgm_uniform": ScheduleType("SGM Uniform", sgm_uniform, needs_model=True),
    "kl_optimal": ScheduleType("KL Optimal", kl_optimal),
    "align_your_steps": ScheduleType("Align Your Steps", align_your_steps),
    "simple": ScheduleType("Simple", simple, needs_model=True),
    "normal": ScheduleType("Normal", normal, needs_model=True),
    "ddim": ScheduleType("DDIM", ddim, needs_model=True),
    "beta": ScheduleType("Beta", beta, needs_model=True),
}


def schedule_type(name: str) -> str:
    """The key of a schedule type given by key or A1111 label, any case ("SGM Uniform", "sgm_uniform")."""
    wanted = name.strip().lower().replace(" ", "_")
    aliases = {"sgmuniform": "sgm_uniform"}
    wanted = aliases.get(wanted, wanted)
    for key, kind in SCHEDULE_TYPES.items():
        if wanted in (key, kind.label.lower().replace(" ", "_")):
            return key
    raise ValueError(f"unknown schedule type {name!r}; one of: Automatic, "
                     f"{', '.join(k.label for k in SCHEDULE_TYPES.values())}")  # fmt: skip


def get_sigmas(
    kind: str,
    n: int,
    model: ModelSigmas,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float | None = None,
    discard_penultimate: bool = False,
) -> Tensor:
    """n + 1 noise levels (ending at 0, or sigma_min for KL Optimal) of schedule `kind` (a SCHEDULE_TYPES
    key), as A1111's get_sigmas makes them: over the model's sigma range unless told, and with
    `discard_penultimate`, made for n + 1 steps with the next-to-last level dropped."""
    steps = n + 1 if discard_penultimate else n
    spec = SCHEDULE_TYPES[kind]
    if spec.function is None:
        sigmas = model.uniform(steps)
    else:
        kwargs: dict = {
            "sigma_min": model.sigma_min if sigma_min is None else sigma_min,
            "sigma_max": model.sigma_max if sigma_max is None else sigma_max,
        }
        if spec.default_rho is not None and rho is not None:
            kwargs["rho"] = rho
        if spec.needs_model:
            kwargs["model"] = model
        sigmas = spec.function(steps, **kwargs)
    if discard_penultimate:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas


__all__ = [
    "SCHEDULE_TYPES",
    "ModelSigmas",
    "ScheduleType",
    "get_sigmas",
    "ldm_alphas_cumprod",
    "schedule_type",
]
