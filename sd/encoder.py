"""VAE encoder: image (B, 3, H, W) in [-1, 1] -> latent distribution over (B, 4, H/8, W/8).

Names mirror the original `first_stage_model.encoder.*` / `quant_conv` keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import VAEConfig
from .decoder import MidBlock, VAELevel, norm_silu, vae_norm


@dataclass
class LatentDistribution:
    """Diagonal Gaussian over unscaled latents."""

    mean: torch.Tensor
    logvar: torch.Tensor

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        # Drawn on the generator's device, then moved: the same seed gives the same latents on any
        # device, and the same numbers as diffusers' `latent_dist.sample(generator)`.
        gen_device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=gen_device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)


class Downsample(nn.Module):
    """Stride-2 conv with the original's asymmetric (right/bottom) zero padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class VAEEncoderNet(nn.Module):
    """The original `Encoder`: conv_in, down levels, mid, norm_out, conv_out (mean and logvar)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_mult]
        groups = config.norm_groups
        self.conv_in = nn.Conv2d(config.in_channels, config.base_channels, 3, padding=1)
        inputs = [config.base_channels, *widths[:-1]]
        last = len(widths) - 1
        self.down = nn.ModuleList(
            VAELevel(
                inputs[i],
                widths[i],
                config.num_res_blocks,
                groups,
                ("downsample", Downsample(widths[i])) if i < last else None,
            )
            for i in range(len(widths))
        )
        self.mid = MidBlock(widths[-1], groups)
        self.norm_out = vae_norm(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down:
            for layer in level.layers():  # not level(x): see VAELevel.layers
                x = layer(x)
        return self.conv_out(norm_silu(self.norm_out, self.mid(x)))


class Encoder(nn.Module):
    """`encoder(image, noise)` -> latents already multiplied by the scaling factor (0.18215)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = VAEEncoderNet(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)

    def encode(self, image: torch.Tensor) -> LatentDistribution:
        image = image.contiguous(memory_format=torch.channels_last)  # see models.CHANNELS_LAST
        mean, logvar = self.quant_conv(self.encoder(image)).chunk(2, dim=1)
        # Same clamp as the original DiagonalGaussianDistribution: keeps exp() finite.
        return LatentDistribution(mean, logvar.clamp(-30.0, 20.0))

    def forward(self, image: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        dist = self.encode(image)
        return (dist.mean + dist.std * noise) * self.config.scaling_factor
