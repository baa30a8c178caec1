"""A1111's way end to end: `Pipeline.run` with `a1111=True` against a direct composition of the references.

The reference run is what A1111 v1.10.1 does, built from independent parts: diffusers' U-Net (same random
weights, the `world` fixture) behind k-diffusion's CompVisDenoiser, A1111's CFG (conditional rows first, then
unconditional; combined on the denoised outputs), k-diffusion's sampler on sigmas from k-diffusion's own
functions, the per-image noise streams in place of randn_like, Brownian trees seeded per image, and diffusers'
VAE with A1111's truncation to uint8. The conditioning is ours on both sides (tested on its own in
test_conditioning.py). Tolerances: final latents within 1e-4 of their scale (fp32), pixels within 1 level.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sd.noise import ImageNoise, _torchsde_draws_from
from sd.params import GenerationParams
from sd.pipeline import Pipeline

import kdiffusion_reference
from conftest import World

PROMPT, NEGATIVE = "a watercolor painting of a lighthouse at dusk", "blurry, low quality"
SIZE = 64
SAMPLERS = {
    # A1111 label: (k-diffusion function, Automatic schedule, discard penultimate, brownian, kwargs)
    "Euler a": ("sample_euler_ancestral", None, False, False, {"eta": 1.0, "s_noise": 1.0}),
    "Euler": ("sample_euler", None, False, False, {}),
    "DPM++ 2M": ("sample_dpmpp_2m", "karras", False, False, {}),
    "DPM++ SDE": ("sample_dpmpp_sde", "karras", False, True, {"eta": 1.0}),
    "DPM++ 2M SDE": ("sample_dpmpp_2m_sde", "exponential", False, True, {"eta": 1.0}),
    "DPM++ 2S a": ("sample_dpmpp_2s_ancestral", "karras", False, False, {"eta": 1.0}),
    "Heun": ("sample_heun", None, False, False, {}),
    "DPM2 a": ("sample_dpm_2_ancestral", "karras", True, False, {"eta": 1.0}),
    "LMS": ("sample_lms", None, False, False, {}),
    "DPM++ 3M SDE": ("sample_dpmpp_3m_sde", "exponential", True, True, {"eta": 1.0}),
}
SD15_SAMPLERS = ("DPM++ 2M", "Euler a")


def reference_sigmas(k, denoiser, schedule: str | None, steps: int, discard: bool, **range_) -> torch.Tensor:
    n = steps + 1 if discard else steps
    low = range_.get("sigma_min", denoiser.sigmas[0].item())
    high = range_.get("sigma_max", denoiser.sigmas[-1].item())
    sigmas = {
        None: lambda: denoiser.get_sigmas(n),
        "karras": lambda: k.get_sigmas_karras(n, low, high, rho=range_.get("rho", 7.0)),
        "exponential": lambda: k.get_sigmas_exponential(n, low, high),
    }[schedule]()
    return torch.cat([sigmas[:-2], sigmas[-1:]]) if discard else sigmas


@torch.no_grad()
def reference_run(world: World, label: str, steps: int, seeds: list[int], cfg: float, monkeypatch, clean=None,
                  strength: float = 1.0, **settings):  # fmt: skip
    """A1111's run; `settings`: GenerationParams' A1111 settings (schedule range, forced discard, fp16
    alphas, SGM noise, img2img noise multiplier), applied as A1111 applies them."""
    k, external = kdiffusion_reference.load()
    name, schedule, discard, brownian, kwargs = SAMPLERS[label]
    discard = discard or settings.get("discard_penultimate", False)

    class LDM(torch.nn.Module):  # what CompVisDenoiser wraps: alphas_cumprod and apply_model
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1 - betas, dim=0).float()
        if settings.get("downcast_alphas"):  # A1111's use_downcasted_alpha_bar: the tensor in fp16
            alphas_cumprod = alphas_cumprod.half()

        def apply_model(self, x, t, cond):
            return world.unet(x, t, encoder_hidden_states=cond).sample

    denoiser = external.CompVisDenoiser(LDM())
    encoder = Pipeline(world.ours).prompt_encoder()
    (uncond,), _ = encoder.encode_groups([[NEGATIVE]])
    (cond,), _ = encoder.encode_groups([[PROMPT]])
    batch = len(seeds)

    def cfg_denoiser(x, sigma):  # A1111's CFGDenoiser: [cond..., uncond], combined on the denoised outputs
        x_in = torch.cat([x, x])
        context = torch.cat([cond.expand(batch, -1, -1), uncond.expand(batch, -1, -1)])
        out = denoiser(x_in, torch.cat([sigma, sigma]), cond=context)
        denoised_uncond = out[batch:]
        return denoised_uncond + (out[:batch] - denoised_uncond) * cfg

    range_ = {key: settings[key] for key in ("sigma_min", "sigma_max", "rho") if key in settings}
    sigmas = reference_sigmas(k, denoiser, schedule, steps, discard, **range_)
    noise = ImageNoise((4, SIZE // 8, SIZE // 8), seeds)
    monkeypatch.setattr(k, "torch", kdiffusion_reference.RandnFromStreams(noise))
    first = noise.next()
    if clean is None:
        scale = torch.sqrt(1.0 + sigmas[0] ** 2.0) if settings.get("sgm_noise") else sigmas[0]
        x, run_sigmas = first * scale, sigmas
    else:
        t_enc = int(min(strength, 0.999) * steps)
        run_sigmas = sigmas[steps - t_enc - 1 :]
        x = clean + first * settings.get("noise_multiplier", 1.0) * run_sigmas[0]
    extra = {}
    with _torchsde_draws_from("GPU"):
        if brownian:
            extra["noise_sampler"] = k.BrownianTreeNoiseSampler(
                x, sigmas[sigmas > 0].min(), sigmas.max(), seed=seeds
            )
        latents = getattr(k, name)(cfg_denoiser, x, run_sigmas, disable=True, **extra, **kwargs)
    image = world.vae.decode(latents / world.vae.config.scaling_factor).sample
    pixels = (255.0 * torch.clamp((image + 1.0) / 2.0, 0, 1).permute(0, 2, 3, 1).numpy()).astype(np.uint8)
    return latents, pixels


def run_ours(
    world: World, label: str, steps: int, seed: int, batch: int, cfg: float, image=None, strength=None,
    **settings,
):  # fmt: skip
    params = GenerationParams(PROMPT, NEGATIVE, steps=steps, sampler=label, cfg_scale=cfg, seed=seed,
                              width=SIZE, height=SIZE, a1111=True, strength=strength, **settings)  # fmt: skip
    seen = []
    images = Pipeline(world.ours).run(params, image, num_images=batch, callback=seen.append)
    return seen[-1].latents, np.stack([np.asarray(i) for i in images]), images, len(seen)


def assert_same(ours, theirs, what: str) -> None:
    (latents, pixels), (ref_latents, ref_pixels) = ours, theirs
    scale, difference = ref_latents.abs().max(), (latents - ref_latents).abs().max()
    print(f"{what}: max |latents - reference| {float(difference):.3g} (scale {float(scale):.3g})")
    assert difference <= 1e-4 * scale, what
    assert np.abs(pixels.astype(int) - ref_pixels.astype(int)).max() <= 1, what


@pytest.mark.parametrize("label", list(SAMPLERS))
def test_a1111_txt2img_equals_the_reference_composition(world: World, label: str, monkeypatch) -> None:
    if world.name == "sd15" and label not in SD15_SAMPLERS:
        pytest.skip("the tiny model covers every sampler; full size checks two")
    steps, seed = 4, 1234
    latents, pixels, _, calls = run_ours(world, label, steps, seed, batch=2, cfg=7.0)
    reference = reference_run(world, label, steps, [seed, seed + 1], 7.0, monkeypatch)
    assert_same((latents, pixels), reference, f"{world.name} {label}")
    second_order = label in ("Heun", "DPM2 a", "DPM++ SDE", "DPM++ 2S a")
    assert calls == (2 * steps - 1 if second_order else steps)


def test_a1111_img2img_slices_the_schedule_as_a1111(world: World, monkeypatch) -> None:
    if world.name != "tiny":
        pytest.skip("the slicing is the same at any size")
    from PIL import Image

    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    pipe = Pipeline(world.ours)
    clean = pipe.encode_image(picture, None)  # A1111's posterior sample is not seed-controlled: the mean
    for label in ("DPM++ 2M", "DPM++ 2M SDE"):
        latents, pixels, _, calls = run_ours(world, label, 10, 5, 1, 7.0, picture, strength=0.6)
        reference = reference_run(world, label, 10, [5], 7.0, monkeypatch, clean=clean, strength=0.6)
        assert_same((latents, pixels), reference, f"img2img {label}")
        assert calls == 7  # t_enc = int(0.6 * 10) = 6: sigmas[3:], 7 steps
    latents, pixels, _, _ = run_ours(
        world, "Euler", 10, 5, 1, 7.0, picture, strength=0.6, noise_multiplier=0.8
    )
    reference = reference_run(world, "Euler", 10, [5], 7.0, monkeypatch, clean=clean, strength=0.6,
                              noise_multiplier=0.8)  # fmt: skip
    assert_same((latents, pixels), reference, "img2img noise multiplier")


SETTINGS = {
    "schedule range": ("DPM++ 2M", {"sigma_min": 0.1, "sigma_max": 10.0, "rho": 5.0}),
    "forced discard": ("Euler", {"discard_penultimate": True}),
    "fp16 alphas": ("DPM++ 2M", {"downcast_alphas": True}),
    "fp16 alphas, model's schedule": ("Euler a", {"downcast_alphas": True}),
    "SGM noise": ("Euler a", {"sgm_noise": True}),
}


@pytest.mark.parametrize("case", list(SETTINGS))
def test_a1111_settings_apply_as_in_a1111(world: World, case: str, monkeypatch) -> None:
    if world.name != "tiny":
        pytest.skip("the settings act the same at any size")
    label, settings = SETTINGS[case]
    latents, pixels, images, _ = run_ours(world, label, 4, 77, 1, 7.0, **settings)
    reference = reference_run(world, label, 4, [77], 7.0, monkeypatch, **settings)
    assert_same((latents, pixels), reference, case)
    plain = reference_run(world, label, 4, [77], 7.0, monkeypatch)
    assert (latents - plain[0]).abs().max() > 1e-3, "the setting changed nothing"
    again = GenerationParams.from_text(images[0].info["parameters"])  # the PNG says so, and replays it
    assert {key: getattr(again, key) for key in settings} == settings


def test_each_image_of_a_batch_is_its_own_seed(world: World) -> None:
    if world.name != "tiny":
        pytest.skip("batch invariance is independent of the model size")
    _, batch, images, _ = run_ours(world, "Euler a", 3, 100, batch=3, cfg=5.0)
    for i in range(3):
        _, alone, _, _ = run_ours(world, "Euler a", 3, 100 + i, batch=1, cfg=5.0)
        assert np.abs(alone[0].astype(int) - batch[i].astype(int)).max() <= 1
    assert "Sampler: Euler a" in images[0].info["parameters"]
