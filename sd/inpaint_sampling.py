"""Inpainting on the latent side: the latent mask, the 9-channel U-Net's extra input, and the blend of the
known latents, each the way its reference does it.

* diffusers' way (StableDiffusionInpaintPipeline): the mask binarised at 0.5 and nearest-downsampled; the
  masked image VAE-*sampled* from the run's generator (even for a 4-channel U-Net, which does not use it:
  it moves the generator); a 4-channel U-Net's latents blended after every step with the init latents
  noised to the next step's level (the *noisy* x_{t-1}).
* A1111's way (processing.py, CFGDenoiser): the mask PIL-resized to latent size and rounded; the masked
  image blended with the original by `inpainting_mask_weight` and VAE-encoded (the posterior's mean: A1111
  samples it from an RNG the seed does not control); the *clean-image prediction* blended with the init
  latents at every model call (DDIM, PLMS and UniPC: the U-Net's noisy *input*), and the final latents once
  more.

The 9-channel input is cat([x_t scaled for the U-Net, mask, masked-image latents]) for the negative and the
positive halves alike (runwayml's hybrid conditioning, diffusers' order).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .images import pil_to_tensor
from .inpaint import LATENT_NOISE, LATENT_NOTHING, InpaintSettings, PreparedImages, apply_overlay

NINE_CHANNELS = 9


def is_inpainting_model(in_channels: int) -> bool:
    """Whether a U-Net with `in_channels` inputs is an inpainting one (latents + mask + masked latents)."""
    return in_channels == NINE_CHANNELS


@dataclass
class InpaintJob:
    """One run's inpainting state. `prepared` is None for a 9-channel model used without a mask (txt2img
    and img2img, as A1111 uses it: a mask of ones)."""

    settings: InpaintSettings
    prepared: PreparedImages | None
    nine: bool
    cond: torch.Tensor | None = None  # (1, 5, h, w): mask and masked-image latents, 9-channel U-Nets
    nmask: torch.Tensor | None = None  # (1, 1, h, w) latent mask, 1 = repaint
    clean: torch.Tensor | None = None  # the init latents the blend keeps
    noise: torch.Tensor | None = None  # diffusers: the noise the init latents were noised with
    composite: bool = True
    _latent_size: tuple[int, int] = field(default=(0, 0))

    @property
    def masked(self) -> bool:
        return self.prepared is not None and self.prepared.mask is not None

    def unet_input(self, x: torch.Tensor) -> torch.Tensor:
        """The U-Net's input for `x` (already scaled for the U-Net): x itself, or with the conditioning."""
        if self.cond is None:
            return x
        cond = self.cond.to(device=x.device, dtype=x.dtype).expand(x.shape[0], -1, -1, -1)
        return torch.cat([x, cond], dim=1)

    # --- masks ---

    def pixel_mask(self, a1111: bool) -> torch.Tensor:
        """(1, 1, H, W) repaint mask at the processing size: rounded (A1111), binarised (diffusers)."""
        values = torch.from_numpy(np.asarray(self.prepared.mask, dtype=np.float32) / 255.0)[None, None]
        return torch.round(values) if a1111 else (values >= 0.5).float()

    def latent_mask(self, height: int, width: int, a1111: bool) -> torch.Tensor:
        if a1111:  # A1111: the mask as RGB, PIL's default resample, /255, rounded
            small = self.prepared.mask.convert("RGB").resize((width, height))
            values = np.around(np.asarray(small, dtype=np.float32)[..., 0] / 255)
            return torch.from_numpy(values)[None, None]
        return F.interpolate(self.pixel_mask(False), size=(height, width))

    # --- the 9-channel conditioning and the fills ---

    def condition(self, pipe, image: Image.Image | None, shape: tuple, generator, a1111: bool) -> None:
        """Set `nmask` and (9-channel) `cond` for `image` at the processing size; None: txt2img. diffusers'
        way VAE-samples the masked image from `generator` whenever there is a mask (its draw order)."""
        height, width = shape[-2:]
        down = pipe.config.vae.downscale
        if not self.masked:
            if not self.nine:
                return
            ones = torch.ones(1, 1, height, width)
            if image is None:  # A1111's txt2img conditioning: a fully masked (grey) image
                pixels = None
                latents = pipe.encode_pixels(torch.zeros(1, 3, height * down, width * down), None)
            else:
                w = self.settings.mask_weight
                pixels = pil_to_tensor(image)
                latents = pipe.encode_pixels(torch.lerp(pixels, pixels * 0, w), None)
            del pixels
            self.cond = torch.cat([ones.to(latents), latents.float()], dim=1)
            return
        self.nmask = self.latent_mask(height, width, a1111).to(pipe.device)
        pixels = pil_to_tensor(image)
        mask = self.pixel_mask(a1111)
        if a1111:
            masked = torch.lerp(pixels, pixels * (1.0 - mask), self.settings.mask_weight)
            latents = pipe.encode_pixels(masked, None) if self.nine else None
        else:
            latents = pipe.encode_pixels(pixels * (mask < 0.5), generator)
        if self.nine:
            small = F.interpolate(mask, size=(height, width))
            self.cond = torch.cat([small.to(latents), latents.float()], dim=1)

    def fill_latents(self, clean: torch.Tensor, noise_for_fill) -> torch.Tensor:
        """A1111's latent fills: "latent noise" puts fresh noise (`noise_for_fill()`) in the masked area,
        "latent nothing" zeros."""
        if not self.masked or clean is None:
            return clean
        keep = 1 - self.nmask.to(clean)
        if self.settings.inpainting_fill == LATENT_NOISE:
            return clean * keep + noise_for_fill().to(clean) * self.nmask.to(clean)
        if self.settings.inpainting_fill == LATENT_NOTHING:
            return clean * keep
        return clean

    # --- the blends ---

    def blend_diffusers(self, latents: torch.Tensor, sampler, index: int) -> None:
        """diffusers' 4-channel blend after model call `index`, in place (the sampler goes on from it): the
        known area is the init latents noised to the next call's level (clean after the last call).
        Second-order samplers are blended at their step boundaries only."""
        last = index == len(sampler.timesteps) - 1
        if not last and (index + 1) % sampler.order:
            return
        known = self.clean if last else sampler.add_noise(self.clean, self.noise, index + 1)
        m = self.nmask.to(latents)
        latents.copy_((1 - m) * known + m * latents)

    def blend(self, latents: torch.Tensor) -> torch.Tensor:
        """A1111's blend, `latents·nmask + init_latent·(1 - nmask)` with the *clean* init latents, at every
        model call (CFGDenoiser) and once on the final latents. The k-diffusion samplers blend the call's
        clean-image prediction (mask_before_denoising off); DDIM, PLMS and UniPC blend the U-Net's *noisy*
        input and step on from their own latents (on; later versions noise the init latents first, from
        the global RNG: v1.10.1 does not)."""
        m = self.nmask.to(latents)
        return latents * m + self.clean.to(latents) * (1 - m)

    # --- the result ---

    def finish(self, image: Image.Image) -> Image.Image:
        """The decoded image pasted back and composited under the original (A1111's apply_overlay)."""
        if not self.masked or not self.composite:
            return image
        out = apply_overlay(image, self.prepared.paste_to, self.prepared.overlay)
        out.info.update(image.info)
        return out


__all__ = ["InpaintJob", "is_inpainting_model"]
