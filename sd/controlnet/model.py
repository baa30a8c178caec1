"""ControlNet for SD1.5 (Zhang et al. 2023; the original cldm/cldm.py `ControlNet`): a trainable copy of
the U-Net's encoder that reads a hint image (edges, depth, pose, ...) and returns one residual per U-Net
skip plus one for the middle block, which the U-Net adds to them (sd.unet.UNet.forward).

    hint (B, 3, H, W) in [0, 1] -> input_hint_block: 3x3 convs with SiLU, three of stride 2 -> (B, 320, h, w)
    x_t -> input_blocks[0] (conv_in) + that -> the other input blocks -> middle block
    each input block's output -> zero_convs[i] (1x1) ; the middle block's -> middle_block_out (1x1)

Names are the original's (`control_model.` stripped): `time_embed`, `input_blocks`, `middle_block`,
`input_hint_block.{0,2,...,14}`, `zero_convs.{i}.0`, `middle_block_out.0`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise

import torch
from torch import nn

from ..config import UNetConfig
from ..diffusion import embed_time, time_embed_mlp
from ..unet import encoder_blocks


@dataclass(frozen=True)
class ControlNetConfig:
    """The U-Net it copies, and its hint encoder: `hint_channels` in, `hint_widths` in pairs of 3x3 convs
    (the first of each pair after the first width has stride 2), then a 3x3 conv to the U-Net's width."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    hint_channels: int = 3
    hint_widths: tuple[int, ...] = (16, 32, 96, 256)
    # v1.1 shuffle: each residual averaged over the image (cldm's global_average_pooling)
    global_average_pooling: bool = False


def hint_encoder(config: ControlNetConfig) -> nn.Sequential:
    """input_hint_block: conv, SiLU, (conv, SiLU, conv stride 2, SiLU) per width step, conv out."""
    widths = config.hint_widths
    layers: list[nn.Module] = [nn.Conv2d(config.hint_channels, widths[0], 3, padding=1), nn.SiLU()]
    for narrow, wide in pairwise(widths):
        layers += [nn.Conv2d(narrow, narrow, 3, padding=1), nn.SiLU()]
        layers += [nn.Conv2d(narrow, wide, 3, padding=1, stride=2), nn.SiLU()]
    layers.append(nn.Conv2d(widths[-1], config.unet.model_channels, 3, padding=1))
    return nn.Sequential(*layers)


class ControlNet(nn.Module):
    """forward(latents, hint, context, timestep) -> the 13 residuals (SD1.5) for UNet.forward's `control`."""

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        self.name = "None"  # how A1111 names it ("stem [hash]"), set by load_controlnet
        unet = config.unet
        self.time_embed = time_embed_mlp(unet)
        self.input_hint_block = hint_encoder(config)
        self.input_blocks, self.middle_block, skip_channels = encoder_blocks(unet, unet.in_channels)
        self.zero_convs = nn.ModuleList(nn.Sequential(nn.Conv2d(ch, ch, 1)) for ch in skip_channels)
        width = skip_channels[-1]
        self.middle_block_out = nn.Sequential(nn.Conv2d(width, width, 1))

    def forward(
        self,
        latents: torch.Tensor,
        hint: torch.Tensor,
        context: torch.Tensor,
        timestep: torch.Tensor | float | int,
    ) -> list[torch.Tensor]:
        emb = embed_time(self.time_embed, timestep, latents)
        guided = self.input_hint_block(hint.to(latents.dtype))
        x, residuals = latents, []
        for index, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs, strict=True)):
            x = block(x, emb, context)
            if index == 0:  # the hint joins after conv_in
                x = x + guided
            residuals.append(zero_conv(x))
        residuals.append(self.middle_block_out(self.middle_block(x, emb, context)))
        if self.config.global_average_pooling:
            residuals = [r.mean(dim=(2, 3), keepdim=True) for r in residuals]
        return residuals
