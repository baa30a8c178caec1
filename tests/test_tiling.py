"""Tiled VAE decoding: tiles land where they belong, cross-fades sum to one, and the pipeline switches."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F

from sd.config import TINY
from sd.decoder import _tile_starts, decode_in_tiles
from sd.pipeline import TILE_ABOVE_LATENTS, Pipeline
from sd.testing import random_models


def pixelwise_decoder(latents: torch.Tensor) -> torch.Tensor:
    """A 'decoder' with no spatial context: tiling it must change nothing."""
    return F.interpolate(latents[:, :3] * 2 - latents[:, 3:], scale_factor=8, mode="nearest")


@pytest.mark.parametrize(
    ("height", "width", "tile", "overlap"), [(40, 72, 16, 4), (33, 17, 10, 3), (8, 8, 8, 2)]
)
def test_tiles_reassemble_a_context_free_decode_exactly(height, width, tile, overlap):
    latents = torch.randn(2, 4, height, width)
    tiled = decode_in_tiles(pixelwise_decoder, latents, 8, tile, overlap)
    whole = pixelwise_decoder(latents)
    assert tiled.shape == whole.shape
    assert torch.allclose(tiled, whole, atol=1e-5)


def test_tile_starts_cover_the_side_with_the_overlap():
    for size, tile, overlap in [(128, 96, 16), (200, 64, 16), (64, 64, 16), (65, 64, 16), (30, 64, 16)]:
        starts = _tile_starts(size, tile, overlap)
        assert starts[0] == 0 and min(size, starts[-1] + tile) == size
        assert all(b - a <= tile - overlap for a, b in pairwise(starts))


def test_one_tile_is_the_whole_decode():
    decoder = random_models(TINY, seed=5)["decoder"].eval()
    latents = torch.randn(1, 4, 12, 10)
    with torch.no_grad():
        assert torch.equal(decoder.tiled(latents, tile=16, overlap=4), decoder(latents))
        tiled = decoder.tiled(latents, tile=8, overlap=2)
    assert tiled.shape == (1, 3, 12 * TINY.vae.downscale, 10 * TINY.vae.downscale)
    assert torch.isfinite(tiled).all()
    with pytest.raises(ValueError, match="overlap"):
        decoder.tiled(latents, tile=8, overlap=8)


def test_pipeline_tiles_large_images_in_auto_mode_and_obeys_the_switch(monkeypatch):
    pipe = Pipeline(random_models(TINY, seed=1))
    side = int(TILE_ABOVE_LATENTS**0.5)
    assert not pipe.tiles_vae(torch.zeros(1, 4, side, side))
    assert pipe.tiles_vae(torch.zeros(1, 4, side, side + 1))
    pipe.vae_tiling = True
    assert pipe.tiles_vae(torch.zeros(1, 4, 8, 8))
    calls = []
    monkeypatch.setattr("sd.pipeline.decode_in_tiles", lambda d, z, s: calls.append(z.shape) or d(z))
    images = pipe.txt2img("a red circle", width=72, height=64, steps=2, seed=0, num_images=2)
    assert [im.size for im in images] == [(72, 64)] * 2
    assert len(calls) == 2  # one image at a time
    pipe.vae_tiling = False
    assert not pipe.tiles_vae(torch.zeros(1, 4, 4 * side, 4 * side))
