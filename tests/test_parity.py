"""Parity with the reference implementation on the same random weights.

One random checkpoint in the original (LDM) layout is written to disk. Ours loads it with our loader;
the reference models (diffusers UNet2DConditionModel / AutoencoderKL, transformers CLIPTextModel) get
it through diffusers' own single-file converters (`diffusers.loaders.single_file_utils`). Both run on
the same inputs. The full-size SD1.5 case runs at small spatial sizes to stay affordable on a CPU.

Tolerance (fp32): max |ours - reference| <= 1e-4 * max(1, max |reference|). In practice the text
encoder and U-Net agree bit for bit (same op order) and the VAE within a few 1e-6.
"""

from __future__ import annotations

import json

import pytest
import torch

from sd.tokenizer import CLIPTokenizer
from sd.weights import load_models

from conftest import World

RTOL = 1e-4
PROMPTS = ["a photograph of an astronaut riding a horse", ""]


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    diff = (ours - ref).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    print(f"{what}: max abs diff {diff:.3g} (reference scale {scale:.3g})")
    assert diff <= RTOL * scale, f"{what}: max abs diff {diff:.3g} > {RTOL} * {scale:.3g}"


def test_text_encoder_hidden_states(world: World) -> None:
    tokens = CLIPTokenizer()(PROMPTS)
    ref = world.text_encoder(tokens, output_hidden_states=True)
    clip = world.ours["clip"]
    assert_close(clip(tokens), ref.last_hidden_state, f"{world.name} clip last layer")
    final_norm = getattr(world.text_encoder, "text_model", world.text_encoder).final_layer_norm
    penultimate = final_norm(ref.hidden_states[-2])
    assert_close(clip(tokens, clip_skip=2), penultimate, f"{world.name} clip penultimate (clip skip 2)")
    ours_states = clip.hidden_states(tokens)
    assert len(ours_states) == len(ref.hidden_states)
    for i, (a, b) in enumerate(zip(ours_states, ref.hidden_states, strict=True)):
        assert_close(a, b, f"{world.name} clip hidden state {i}")


def test_vae_encode(world: World) -> None:
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 64, 48, generator=gen) * 2 - 1
    ref = world.vae.encode(image).latent_dist
    dist = world.ours["encoder"].encode(image)
    assert_close(dist.mean, ref.mean, f"{world.name} vae encode mean")
    assert_close(dist.logvar, ref.logvar, f"{world.name} vae encode logvar")
    # Sampling with the same generator seed gives the same latents as diffusers.
    sample = dist.sample(torch.Generator().manual_seed(7))
    assert_close(sample, ref.sample(torch.Generator().manual_seed(7)), f"{world.name} vae sample")
    # The seed's call convention: encoder(image, noise) = (mean + std * noise) * 0.18215.
    noise = torch.randn(ref.mean.shape, generator=gen)
    expected = (ref.mean + ref.std * noise) * world.vae.config.scaling_factor
    assert_close(world.ours["encoder"](image, noise), expected, f"{world.name} encoder(image, noise)")
    assert image.min() >= -1  # inputs are not modified in place
    assert world.ours["encoder"].config.scaling_factor == 0.18215


def test_vae_decode(world: World) -> None:
    latents = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(1))
    before = latents.clone()
    ref = world.vae.decode(latents / world.vae.config.scaling_factor).sample
    assert_close(world.ours["decoder"](latents), ref, f"{world.name} vae decode")
    assert torch.equal(latents, before)


@pytest.mark.parametrize(
    "timestep", [torch.tensor([999, 10]), torch.tensor([500.0, 1.0]), 981, torch.tensor(1)], ids=str
)
def test_unet_noise_prediction(world: World, timestep) -> None:
    gen = torch.Generator().manual_seed(2)
    size = (16, 16) if world.name == "sd15" else (8, 8)
    latents = torch.randn(2, 4, *size, generator=gen)
    context = world.text_encoder(CLIPTokenizer()(PROMPTS)).last_hidden_state
    ref = world.unet(latents, timestep, encoder_hidden_states=context).sample
    ours = world.ours["diffusion"](latents, context, timestep)
    assert_close(ours, ref, f"{world.name} unet t={timestep}")


def test_unet_odd_latent_size(world: World) -> None:
    """Sides that are not multiples of 8 in latent space (e.g. 520 px -> 65) upsample onto the skip."""
    gen = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 4, 9, 13, generator=gen)
    context = torch.randn(1, 77, world.config.unet.context_dim, generator=gen)
    ref = world.unet(latents, 300, encoder_hidden_states=context).sample
    assert_close(world.ours["diffusion"](latents, context, 300), ref, f"{world.name} unet 9x13 latents")


def test_diffusers_folder_loads_the_same_weights(world: World, tmp_path) -> None:
    """A folder written by the reference models' own save_pretrained loads to identical tensors."""
    folder = tmp_path / "pipeline"
    world.unet.save_pretrained(folder / "unet")
    world.vae.save_pretrained(folder / "vae")
    world.text_encoder.save_pretrained(folder / "text_encoder")
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
    }
    (folder / "model_index.json").write_text(json.dumps(model_index))
    from_folder = load_models(folder)
    for name, model in world.ours.items():
        ours_state, folder_state = model.state_dict(), from_folder[name].state_dict()
        assert ours_state.keys() == folder_state.keys(), name
        for key, value in ours_state.items():
            assert torch.equal(value, folder_state[key]), f"{name}.{key} differs via the diffusers folder"
