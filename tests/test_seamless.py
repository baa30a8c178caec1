"""sd.seamless: with circular padding the U-Net and the VAE decoder see a torus, so shifting their input
shifts their output by as much (a tiling image); and the pipeline's checks around it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sd.config import TINY
from sd.params import GenerationParams
from sd.pipeline import Pipeline
from sd.seamless import circular_padding
from sd.testing import random_models


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return random_models(TINY, seed=3)


def test_circular_models_commute_with_shifts(models) -> None:
    """A shift by a multiple of the U-Net's total downsampling (4 for TINY) is exact on a torus; with
    zeros at the border it is not. Tolerance: fp32 rounding (1e-5 of the scale)."""
    unet, decoder = models["diffusion"], models["decoder"]
    x, context, t = torch.randn(1, 4, 16, 24), torch.randn(1, 77, 32), torch.tensor([500.0])
    roll = lambda a, k: torch.roll(a, shifts=(k, 2 * k), dims=(-2, -1))  # noqa: E731
    with torch.no_grad():
        with circular_padding(models.values()):
            out, shifted = unet(x, context, t), unet(roll(x, 4), context, t)
            image, shifted_image = decoder(x), decoder(roll(x, 4))
        plain, plain_shifted = unet(x, context, t), unet(roll(x, 4), context, t)
    assert (shifted - roll(out, 4)).abs().max() <= 1e-5 * out.abs().max()
    assert (shifted_image - roll(image, 32)).abs().max() <= 1e-5 * image.abs().max()  # 8 px a latent
    assert (plain_shifted - roll(plain, 4)).abs().max() > 1e-3
    modes = {
        layer.padding_mode for m in models.values() for layer in m.modules() if isinstance(layer, nn.Conv2d)
    }
    assert modes == {"zeros"}  # restored on the way out


def test_tiling_checks(models) -> None:
    pipe = Pipeline(models)
    params = GenerationParams(
        "a tile", steps=1, width=64, height=64, tiling=True, a1111=True, sampler="Euler"
    )
    pipe.vae_tiling = True
    with pytest.raises(ValueError, match="tiling decodes the image whole, and 64x64 would decode in tiles"):
        pipe.run(params)
    pipe.vae_tiling = None
    (image,) = pipe.run(params)
    assert "Tiling: True" in image.info["parameters"]
