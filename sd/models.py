"""Build the four SD components from a config: the `models` dict the pipeline takes."""

from __future__ import annotations

import torch
from torch import nn

from .clip import CLIP
from .config import SD15, ModelConfig
from .decoder import Decoder
from .diffusion import Diffusion
from .encoder import Encoder

COMPONENTS = ("clip", "encoder", "decoder", "diffusion")


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
            "diffusion": Diffusion(config.unet),
        }
    for model in models.values():
        model.eval().requires_grad_(False)
        if dtype is not None:
            model.to(dtype)
    return models
