"""VAE decoder: latents (B, 4, H/8, W/8) -> image (B, 3, H, W) in [-1, 1].

Also holds the VAE building blocks the encoder shares. Names mirror the original
`first_stage_model.decoder.*` keys (`up.N.block.M`, `mid.attn_1`, `nin_shortcut`, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from .attention import multihead_attention
from .config import VAEConfig
from .kernels import PointwiseConv, conv1x1_on_tokens, upsample_conv


def vae_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


def norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """silu(norm(x)), the SiLU in place on the norm's fresh output where no gradient needs it: at 1024²
    each of those tensors is 0.5-1 GB, and a second copy was the decode's peak."""
    h = norm(x)
    return F.silu(h, inplace=not (torch.is_grad_enabled() and h.requires_grad))


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = vae_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = vae_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = (
            PointwiseConv(in_channels, out_channels) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(norm_silu(self.norm1, x))
        h = self.conv2(norm_silu(self.norm2, h))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels. q/k/v/proj_out are 1x1 convs, as in the original
    file (diffusers stores the same numbers as linear layers)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = vae_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)

        # A 1x1 conv on (B, C, H, W) is a linear map on (B, HW, C).
        q, k, v = (conv1x1_on_tokens(tokens, conv) for conv in (self.q, self.k, self.v))
        out = multihead_attention(q, k, v, heads=1)
        out = conv1x1_on_tokens(out, self.proj_out)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample_conv(x, self.conv)  # = conv(nearest 2x upsample of x)


class VAELevel(nn.Module):
    """One resolution level: residual blocks, then an optional resampler kept under its original key
    name (`downsample` in the encoder, `upsample` in the decoder)."""

    def __init__(
        self, in_channels: int, out_channels: int, num_blocks: int, groups: int,
        resample: tuple[str, nn.Module] | None = None,
    ):  # fmt: skip
        super().__init__()
        channels = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(a, b, groups) for a, b in pairwise(channels))
        self.resample_name = resample[0] if resample else None
        if resample:
            self.add_module(*resample)

    def layers(self) -> list[nn.Module]:
        """Its modules in running order. The encoder and decoder run them in their own loop, so that no
        frame keeps a level's input alive after its first block (at 1024² the decoder's last level is
        given 1 GB: held through the level, it was the decode's peak)."""
        resample = [getattr(self, self.resample_name)] if self.resample_name else []
        return [*self.block, *resample]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers():
            x = layer(x)
        return x


class VAEDecoderNet(nn.Module):
    """The original `Decoder`: conv_in, mid, up levels (coarsest first at run time), norm_out, conv_out."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_mult]
        groups = config.norm_groups
        self.conv_in = nn.Conv2d(config.latent_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], groups)
        # up[i] works at level i's resolution, as in the original file; it runs from the last level down.
        self.up = nn.ModuleList(
            VAELevel(
                widths[min(i + 1, len(widths) - 1)],
                widths[i],
                config.num_res_blocks + 1,
                groups,
                ("upsample", Upsample(widths[i])) if i > 0 else None,
            )
            for i in range(len(widths))
        )
        self.norm_out = vae_norm(widths[0], groups)
        self.conv_out = nn.Conv2d(widths[0], config.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for layer in level.layers():
                x = layer(x)
        return self.conv_out(norm_silu(self.norm_out, x))


class Decoder(nn.Module):
    """`decoder(latents)`: scaled latents -> image in about [-1, 1] (undoes the scaling factor itself)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)
        self.decoder = VAEDecoderNet(config)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.contiguous(memory_format=torch.channels_last)  # see models.CHANNELS_LAST
        return self.decoder(self.post_quant_conv(latents / self.config.scaling_factor))

    def tiled(self, latents: torch.Tensor, tile: int = 96, overlap: int = 16) -> torch.Tensor:
        """forward() in overlapping tiles: see decode_in_tiles."""
        return decode_in_tiles(self, latents, self.config.downscale, tile, overlap)


def decode_in_tiles(
    decode: Callable[[torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    scale: int,
    tile: int = 96,
    overlap: int = 16,
) -> torch.Tensor:
    """`decode(latents)` in overlapping tiles of `tile` latent pixels, cross-faded over `overlap`: the
    memory of one tile's decode whatever the image size (`scale`: pixels per latent pixel).

    Not a whole decode's numbers: inside a tile, GroupNorm statistics and the mid-block attention see only
    that tile (diffusers' enable_vae_tiling has the same limit). A latent that fits one tile is decoded
    whole. `decode` may be any decoder callable (ours, or a compiled backend's).
    """
    if overlap < 0 or tile <= overlap:
        raise ValueError(f"need 0 <= overlap < tile, got tile {tile}, overlap {overlap}")
    height, width = latents.shape[-2:]
    out = weights = None
    for top in _tile_starts(height, tile, overlap):
        for left in _tile_starts(width, tile, overlap):
            image = decode(latents[:, :, top : top + tile, left : left + tile]).float()
            if out is None:
                out = image.new_zeros(*image.shape[:2], height * scale, width * scale)
                weights = image.new_zeros(height * scale, width * scale)
            h, w = image.shape[-2:]
            # Ramps only where a neighbour overlaps, so the image's own borders keep full weight.
            ramp_y = _ramp(h, overlap * scale, top > 0, top + tile < height).to(out)
            ramp_x = _ramp(w, overlap * scale, left > 0, left + tile < width).to(out)
            weight = ramp_y[:, None] * ramp_x[None, :]
            y, x = top * scale, left * scale
            out[:, :, y : y + h, x : x + w] += image * weight
            weights[y : y + h, x : x + w] += weight
    return out / weights


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles covering 0..size, `overlap` apart at least; the last one ends at `size`."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return [*starts, size - tile]


def _ramp(length: int, fade: int, fade_in: bool, fade_out: bool) -> torch.Tensor:
    """Weights along one side of a tile: rising over the first `fade` pixels, falling over the last."""
    ramp = torch.ones(length)
    steps = (torch.arange(fade) + 0.5) / fade if fade else torch.ones(0)
    if fade_in:
        ramp[:fade] = steps
    if fade_out:
        ramp[length - fade :] = steps.flip(0)
    return ramp
