"""SD1.5 samplers, each matching its diffusers scheduler numerically; pick one by name with get_sampler."""

from sd.samplers.registry import ALIASES, KARRAS_SAMPLERS, SAMPLERS, Sampler, get_sampler
from sd.samplers.sampling import (
    EpsModel,
    eps_from_v,
    sample_ddim,
    sample_ddpm,
    sample_dpm_2,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lcm,
    sample_lms,
    sample_plms,
    sample_unipc,
)

__all__ = [
    "ALIASES",
    "KARRAS_SAMPLERS",
    "SAMPLERS",
    "EpsModel",
    "Sampler",
    "eps_from_v",
    "get_sampler",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpm_2",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_lcm",
    "sample_lms",
    "sample_plms",
    "sample_unipc",
]
