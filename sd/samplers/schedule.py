"""Noise-level tables and the timestep/sigma grids the samplers walk.

One forward process, two coordinates for it:

* VP (DDPM paper), what the U-Net sees:  x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps
* VE (k-diffusion):                      x   = x0 + sigma * eps,   sigma_t = sqrt((1 - abar_t) / abar_t)

so x = x_t / sqrt(abar_t) = x_t * sqrt(sigma**2 + 1). Everything here reproduces diffusers' ``set_timesteps``
for the SD1.5 scheduler config (``timestep_spacing="leading"``, ``steps_offset=1``) in the same dtypes,
because the samplers are checked against diffusers step by step.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from sd.config import ScheduleConfig


def alphas_cumprod(schedule: ScheduleConfig) -> Tensor:
    """abar_t for t = 0..T-1 of the "scaled_linear" schedule, in float32 like diffusers."""
    betas = (
        torch.linspace(
            schedule.beta_start**0.5,
            schedule.beta_end**0.5,
            schedule.num_train_timesteps,
            dtype=torch.float32,
        )
        ** 2
    )
    return torch.cumprod(1.0 - betas, dim=0)


def train_sigmas(abar: Tensor) -> Tensor:
    """VE noise level of every training timestep (ascending in t), float32."""
    return ((1 - abar) / abar) ** 0.5


def abar_at(t: Tensor, log_sigmas: Tensor) -> Tensor:
    """abar at timesteps t, which may be fractional, from the float64 CPU table
    ``train_sigmas(abar.double()).log()``.

    Between table entries log sigma is linear in t, the inverse of ``sigma_to_t``, so for a t that a
    k-diffusion sampler derived from a noise level this returns 1 / (sigma**2 + 1) of that very level.
    """
    t = torch.as_tensor(t).detach().double().cpu().clamp(0, len(log_sigmas) - 1)
    low = t.floor().clamp(max=len(log_sigmas) - 2).long()
    log_sigma = torch.lerp(log_sigmas[low], log_sigmas[low + 1], t - low)
    return 1 / (1 + (2 * log_sigma).exp())


def leading_timesteps(
    num_steps: int, num_train: int, offset: int = 1, drop_first: bool = False
) -> np.ndarray:
    """Descending "leading" timesteps: multiples of a stride, shifted by ``steps_offset``.

    DDPM/DDIM/PNDM/Euler-family use stride T // n and include 0 (so SD1.5 runs 981, ..., 1 for n=50; the
    seed's DDPM sampler ran 980, ..., 0, one timestep off). DPM-Solver and UniPC (``drop_first``) use stride
    T // (n + 1) and drop the 0, e.g. 801, 601, 401, 201 for n=4.
    """
    if not 1 <= num_steps <= num_train:
        raise ValueError(f"num_steps must be in [1, {num_train}], got {num_steps}")
    if drop_first:
        stride = num_train // (num_steps + 1)
        steps = np.arange(1, num_steps + 1)
    else:
        stride = num_train // num_steps
        steps = np.arange(0, num_steps)
    return (steps * stride)[::-1].astype(np.int64) + offset


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) eq. 5: noise levels evenly spaced in sigma**(1/rho), float64, descending."""
    ramp = np.linspace(0, 1, num_steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Timestep of each noise level: t interpolated linearly in log sigma in the training table."""
    log_sigma = np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-10))
    # index of the last table entry <= log_sigma, kept inside the table so there is always a right neighbour
    low = np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(log_sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)
