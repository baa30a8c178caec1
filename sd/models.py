"""Build the four SD components from a config: the `models` dict the pipeline takes."""

from __future__ import annotations

import torch
from torch import nn

from .clip import CLIP
from .config import SD15, ModelConfig, ScheduleConfig
from .decoder import Decoder
from .diffusion import Diffusion
from .encoder import Encoder

COMPONENTS = ("clip", "encoder", "decoder", "diffusion")
# Convolutional components keep weights and activations channels-last (NHWC): oneDNN's convolutions are
# ~10-15% faster that way on CPU, and the U-Net's token reshapes around attention become free views.
CHANNELS_LAST = ("encoder", "decoder", "diffusion")


def prefer_channels_last(name: str, model: nn.Module) -> nn.Module:
    """Convert a component's 4-D weights to channels-last if it is a convolutional one."""
    return model.to(memory_format=torch.channels_last) if name in CHANNELS_LAST else model


def build_models(
    config: ModelConfig = SD15, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> dict[str, nn.Module]:
    """Freshly initialised {"clip", "encoder", "decoder", "diffusion"} in eval mode.

    `device="meta"` allocates nothing (the loader then assigns the checkpoint's tensors).
    """
    with torch.device(device or "cpu"):
        models: dict[str, nn.Module] = {
            "clip": CLIP(config.clip),
            "encoder": Encoder(config.vae),
            "decoder": Decoder(config.vae),
            "diffusion": Diffusion(config.unet, config.schedule),
        }
    for name, model in models.items():
        model.eval().requires_grad_(False)
        if dtype is not None:
            model.to(dtype)
        prefer_channels_last(name, model)
    return models


def config_of(models: dict[str, nn.Module]) -> ModelConfig:
    """The config the four components were built from (and the noise schedule the U-Net was trained on)."""
    return ModelConfig(
        clip=models["clip"].config,
        vae=models["decoder"].config,
        unet=models["diffusion"].config,
        schedule=getattr(models["diffusion"], "schedule", None) or ScheduleConfig(),
    )


def dtype_of(model: nn.Module) -> torch.dtype:
    """The dtype a component computes in (its weights')."""
    return next(model.parameters()).dtype
