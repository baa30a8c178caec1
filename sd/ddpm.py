"""The DDPM sampler, kept at the seed's module path; the implementation lives in :mod:`sd.samplers`.

Unlike the seed (timesteps 980, 960, ..., 0 for 50 steps), the grid matches diffusers' SD1.5 scheduler config:
"leading" spacing with ``steps_offset=1``, i.e. 981, 961, ..., 1.
"""

from __future__ import annotations

from sd.config import SD15, ScheduleConfig
from sd.samplers import Sampler, get_sampler
from sd.samplers.sampling import sample_ddpm

__all__ = ["ddpm_sampler", "sample_ddpm"]


def ddpm_sampler(num_steps: int, schedule: ScheduleConfig = SD15.schedule) -> Sampler:
    """``get_sampler("ddpm", num_steps, schedule)``."""
    return get_sampler("ddpm", num_steps, schedule)
