"""A1111's LCM denoiser (v1.10.1, sd_samplers_lcm.py: LCMCompVisDenoiser), as small pure pieces.

LCM was distilled on 50 of the 1000 training timesteps, every 20th from 19 to 999; A1111 gives its "LCM"
sampler a denoiser over just those:

    table       sigma_j = sqrt((1 - abar) / abar) at timestep 20 j + 19, j = 0..49 (float32)
    sigma -> t  the nearest table level in log sigma, as its integer timestep 20 j + 19 (not interpolated)
    schedule    Automatic and Uniform: n timesteps evenly spaced from 999 to 19, mapped back to sigmas by
                interpolating log sigma between table levels, then 0; the other schedule types run over
                this table's range (sigma_min is the level at t = 19, not t = 0)
    denoised    eps = UNet(x / sqrt(sigma^2 + 1), t); x0 = x - sigma eps; then LCM's boundary condition,
                c_out(t) x0 + c_skip(t) x, with c_skip = 0.25 / ((10 t)^2 + 0.25) and
                c_out = 10 t / sqrt((10 t)^2 + 0.25) (sigma_data 0.5, time scaled by 10)

`LCMSigmas` is the table (a `ModelSigmas`, so every schedule type runs over it as A1111's do) and
`lcm_denoised` the boundary condition. Classifier-free guidance combines these denoised outputs as usual.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sd.samplers.sigmas import ModelSigmas

SKIP = 20  # 1000 training timesteps / LCM's 50 original ones
SIGMA_DATA = 0.5
TIME_SCALE = 10.0


class LCMSigmas(ModelSigmas):
    """The 50 noise levels LCM was distilled on, with A1111's quantised sigma <-> timestep maps."""

    def __init__(self, alphas_cumprod: Tensor):
        # A1111 copies the levels into a float32 tensor first, whatever abar's dtype (fp16 when downcast).
        super().__init__(alphas_cumprod[SKIP - 1 :: SKIP].float())

    @classmethod
    def from_model(cls, model: ModelSigmas) -> LCMSigmas:
        """The table from a model's 1000 sigmas: every 20th from t = 19. Exact for a float32 table (the
        per-element arithmetic is the same); for an fp16 one (downcast abar) A1111 computes the 50 levels
        in float32, so build it from abar instead."""
        table = cls.__new__(cls)
        table.sigmas = model.sigmas[SKIP - 1 :: SKIP].float()
        table.log_sigmas = table.sigmas.log()
        return table

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """The integer U-Net timestep (19, 39, ..., 999) of the table level nearest in log sigma."""
        dists = sigma.log() - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape) * SKIP + (SKIP - 1)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """The sigma of a timestep: log sigma interpolated between the table levels around it."""
        index = ((t - (SKIP - 1)) / SKIP).float().clamp(0, len(self.sigmas) - 1)
        return super().t_to_sigma(index)

    def uniform(self, n: int) -> Tensor:
        """LCM's own schedule (A1111's Automatic and Uniform): n timesteps from 999 to 19, then 0."""
        start, end = self.sigma_to_t(self.sigmas[-1]), self.sigma_to_t(self.sigmas[0])
        sigmas = self.t_to_sigma(torch.linspace(start, end, n))
        return torch.cat([sigmas, sigmas.new_zeros([1])])


def boundary_scalings(t: Tensor) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) of LCM's consistency boundary condition at U-Net timestep t."""
    scaled = t * TIME_SCALE
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
    return c_skip, c_out


def lcm_denoised(x: Tensor, x0: Tensor, t: Tensor) -> Tensor:
    """A1111's LCM output from the eps model's x0 = x - sigma eps at timestep t (0-d, or one per row of x)."""
    c_skip, c_out = boundary_scalings(t.reshape(-1, *[1] * (x.ndim - 1)) if t.ndim else t)
    return c_out * x0 + c_skip * x


__all__ = ["LCMSigmas", "boundary_scalings", "lcm_denoised"]
