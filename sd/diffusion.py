"""The diffusion model: sinusoidal time embedding (320 -> 1280) feeding the U-Net.

`diffusion(latents, context, timestep)` predicts the noise in `latents` at `timestep`, conditioned
on the text `context`. Its state dict is the original `model.diffusion_model.*` with the prefix
stripped (time_embed.*, input_blocks.*, middle_block.*, output_blocks.*, out.*).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ScheduleConfig, UNetConfig
from .kernels import Linear
from .unet import UNet


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) timesteps -> (B, dim) float32 [cos | sin] features over geometric frequencies.

    Same order (cos first) and float32 arithmetic as the original and as diffusers with
    flip_sin_to_cos=True, freq_shift=0, so the two agree bit for bit.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs.to(timesteps.device)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Diffusion(UNet):
    """U-Net plus its time embedding MLP; `schedule` is the noise schedule it was trained for, which
    the samplers must follow (stored in our checkpoints' config; SD's own files use SD's)."""

    def __init__(self, config: UNetConfig, schedule: ScheduleConfig | None = None):
        super().__init__(config)
        self.schedule = schedule or ScheduleConfig()
        self.time_embed = time_embed_mlp(config)

    def forward(  # type: ignore[override]
        self,
        latents: torch.Tensor,
        context: torch.Tensor,
        timestep: torch.Tensor | float | int,
        control: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """latents (B, 4, h, w), context (B, 77, 768), timestep scalar or (B,) -> noise (B, 4, h, w);
        `control`: ControlNet residuals to add (sd.unet.UNet.forward)."""
        latents = latents.contiguous(memory_format=torch.channels_last)  # see models.CHANNELS_LAST
        return super().forward(latents, embed_time(self.time_embed, timestep, latents), context, control)


def time_embed_mlp(config: UNetConfig) -> nn.Sequential:
    """The time embedding MLP (original `time_embed`): model_channels -> 4x, SiLU, 4x -> 4x."""
    return nn.Sequential(
        Linear(config.model_channels, config.time_embed_dim),
        nn.SiLU(),
        Linear(config.time_embed_dim, config.time_embed_dim),
    )


def embed_time(mlp: nn.Sequential, timestep: torch.Tensor | float | int, like: torch.Tensor) -> torch.Tensor:
    """(B, 4*model_channels) embedding of a scalar or (B,) `timestep` for a batch `like`."""
    t = torch.as_tensor(timestep, device=like.device).reshape(-1).expand(like.shape[0])
    return mlp(timestep_embedding(t, mlp[0].in_features).to(like.dtype))
