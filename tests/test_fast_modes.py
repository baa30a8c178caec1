"""The fast modes against fp32 eager, on the same weights and inputs.

bf16 keeps 8 bits of mantissa, so its outputs differ from fp32 by rounding through the whole network.
Tolerances (stated here, measured on the random SD1.5 weights at small sizes):
- one U-Net step: relative L2 error ||bf16 - fp32|| / ||fp32|| < 3e-2;
- a VAE decode of the same latents: PSNR against the fp32 image > 30 dB (image range [-1, 1], peak 2);
- fp16 keeps the VAE in fp32 (no NaN / black images), so its decode equals fp32's.
"""

from __future__ import annotations

import copy

import torch

from conftest import World


def relative_l2(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).norm() / ref.float().norm()).item()


def psnr(image: torch.Tensor, ref: torch.Tensor, peak: float = 2.0) -> float:
    mse = ((image.float().clamp(-1, 1) - ref.float().clamp(-1, 1)) ** 2).mean().item()
    return 10 * torch.log10(torch.tensor(peak**2 / max(mse, 1e-12))).item()


def test_bf16_unet_step(world: World) -> None:
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 77, world.config.unet.context_dim, generator=gen)
    unet = world.ours["diffusion"]
    ref = unet(latents, context, torch.tensor([700, 50]))
    fast = copy.deepcopy(unet).to(torch.bfloat16)
    out = fast(latents.bfloat16(), context.bfloat16(), torch.tensor([700, 50]))
    del fast
    error = relative_l2(out, ref)
    print(f"{world.name} bf16 U-Net step: relative L2 error {error:.3g}")
    assert out.dtype == torch.bfloat16 and error < 3e-2


def test_bf16_vae_decode(world: World) -> None:
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    decoder = world.ours["decoder"]
    ref = decoder(latents)
    fast = copy.deepcopy(decoder).to(torch.bfloat16)
    image = fast(latents.bfloat16())
    quality = psnr(image, ref)
    print(f"{world.name} bf16 VAE decode: PSNR {quality:.1f} dB")
    assert torch.isfinite(image).all() and quality > 30


def test_fp16_pipeline_keeps_the_vae_in_fp32(world: World) -> None:
    from sd.pipeline import Pipeline

    if world.name != "tiny":
        return  # loading policy only: the tiny file shows it
    pipe = Pipeline.from_checkpoint(world.path, dtype=torch.float16)
    dtypes = {name: next(model.parameters()).dtype for name, model in pipe.models.items()}
    assert dtypes == {
        "clip": torch.float16,
        "diffusion": torch.float16,
        "encoder": torch.float32,
        "decoder": torch.float32,
    }
    (image,) = pipe.txt2img("a red circle", width=64, height=64, steps=2, seed=0)
    assert image.size == (64, 64)
