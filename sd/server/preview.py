"""Live previews: latents -> a small RGB picture without the VAE (A1111's "Approx cheap").

SD1.x's four latent channels map almost linearly to RGB; these are the factors A1111 (and many
others) use. A model with other latents gets its first three channels, normalised.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
from PIL import Image

SD1_LATENT_RGB = torch.tensor([
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
])  # fmt: skip


def latent_preview(latents: torch.Tensor, scale: int = 1) -> Image.Image:
    """The first image of a (B, C, h, w) latent batch as RGB, each latent pixel `scale` pixels wide."""
    x = latents[0].detach().float().cpu()
    if x.shape[0] == SD1_LATENT_RGB.shape[0]:
        rgb = torch.einsum("chw,cr->rhw", x, SD1_LATENT_RGB)
    else:
        rgb = x[:3] if x.shape[0] >= 3 else x[:1].expand(3, -1, -1)
        rgb = rgb / rgb.abs().amax().clamp(min=1e-6)
    array = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(np.ascontiguousarray(array))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    return image


def preview_base64(latents: torch.Tensor, scale: int = 1) -> str:
    """latent_preview as a base64 PNG, as A1111's /progress `current_image`."""
    buffer = io.BytesIO()
    latent_preview(latents, scale).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
