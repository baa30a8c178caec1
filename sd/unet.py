"""The noise-prediction U-Net body: residual blocks, spatial transformers, skips.

Layout and names follow the original `openaimodel.UNetModel` (`input_blocks.N.M`, `middle_block`,
`output_blocks`, `out`), so `model.diffusion_model.*` tensors load as they are. The time embedding
that feeds it lives in diffusion.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import CrossAttention
from .config import UNetConfig
from .kernels import Linear, PointwiseConv, conv1x1_on_tokens, upsample_conv


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added in between."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups, in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), Linear(time_dim, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = (
            PointwiseConv(in_channels, out_channels) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class GEGLU(nn.Module):
    """Linear to twice the width; one half gates the other through an exact GELU."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text, GEGLU feed-forward; each pre-norm and residual."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Feature map -> tokens -> transformer blocks -> feature map, residual (SD1: 1x1 conv projections)."""

    def __init__(self, channels: int, config: UNetConfig):
        super().__init__()
        self.norm = nn.GroupNorm(config.norm_groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, config.num_heads, config.context_dim)
            for _ in range(config.transformer_depth)
        )
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # proj_in/proj_out are 1x1 convs in the file: the same linear map, applied to the tokens.
        tokens = conv1x1_on_tokens(self.norm(x).flatten(2).transpose(1, 2), self.proj_in)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return x + conv1x1_on_tokens(tokens, self.proj_out).transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        # `size` (the matching skip's size) lets latents whose sides are not multiples of 8 work,
        # as diffusers allows; the original code only handled 2x exactly.
        return upsample_conv(x, self.conv, size)  # = conv(nearest upsample of x to size, default 2x)


class UNetBlock(nn.Sequential):
    """A step of the U-Net (the original TimestepEmbedSequential): routes each layer its inputs."""

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor,
        out_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, out_size)
            else:
                x = layer(x)
        return x


def _transformer_at(config: UNetConfig, level: int, ch: int) -> list[nn.Module]:
    return [SpatialTransformer(ch, config)] if level in config.attention_levels else []


def encoder_blocks(config: UNetConfig, in_channels: int) -> tuple[nn.ModuleList, UNetBlock, list[int]]:
    """The U-Net's encoder path, which ControlNet copies (sd.controlnet): (input blocks, middle block, the
    width of each input block's output, i.e. of each skip)."""
    base, time_dim, groups = config.model_channels, config.time_embed_dim, config.norm_groups
    last_level = len(config.channel_mult) - 1
    input_blocks = nn.ModuleList([UNetBlock(nn.Conv2d(in_channels, base, 3, padding=1))])
    skip_channels, ch = [base], base
    for level, mult in enumerate(config.channel_mult):
        for _ in range(config.num_res_blocks):
            layers = [ResBlock(ch, base * mult, time_dim, groups)]
            ch = base * mult
            input_blocks.append(UNetBlock(*layers, *_transformer_at(config, level, ch)))
            skip_channels.append(ch)
        if level != last_level:
            input_blocks.append(UNetBlock(Downsample(ch)))
            skip_channels.append(ch)
    middle_block = UNetBlock(
        ResBlock(ch, ch, time_dim, groups),
        SpatialTransformer(ch, config),
        ResBlock(ch, ch, time_dim, groups),
    )
    return input_blocks, middle_block, skip_channels


class UNet(nn.Module):
    """U-Net body: forward(x, emb, context) with emb the time embedding (B, 4*model_channels)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        base, time_dim, groups = config.model_channels, config.time_embed_dim, config.norm_groups
        self.input_blocks, self.middle_block, skip_channels = encoder_blocks(config, config.in_channels)
        ch = skip_channels[-1]

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), base * mult, time_dim, groups)]
                ch = base * mult
                layers += _transformer_at(config, level, ch)
                if level > 0 and i == config.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(UNetBlock(*layers))

        self.out = nn.Sequential(
            nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(base, config.out_channels, 3, padding=1)
        )

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor,
        control: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`control`: ControlNet's residuals (sd.controlnet), one per skip and the last for the middle
        block's output, added to them (the original ControlledUnetModel)."""
        skips = []
        for block in self.input_blocks:
            x = block(x, emb, context)
            skips.append(x)
        x = self.middle_block(x, emb, context)
        if control is not None:
            x = x + control[-1]
            skips = [skip + residual for skip, residual in zip(skips, control[:-1], strict=True)]
        for block in self.output_blocks:
            x = torch.cat([x, skips.pop()], dim=1)
            # An upsampling block must land on the size of the skip it is concatenated with next.
            out_size = skips[-1].shape[-2:] if skips else None
            x = block(x, emb, context, out_size)
        return self.out(x)
