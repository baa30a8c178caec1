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
    # these two take the model's sigma range (and DPM fast n = steps) instead of the sigmas
    "DPM fast": ("sample_dpm_fast", None, False, False, {"eta": 1.0, "s_noise": 1.0}),
    "DPM adaptive": ("sample_dpm_adaptive", None, False, False, {"eta": 1.0}),
    "LCM": (None, None, False, False, {}),  # A1111's own sampler and denoiser: written out below
}


def lcm_reference(k, external, ldm, steps: int):
    """A1111's LCMCompVisDenoiser and sample_lcm (sd_samplers_lcm.py), transcribed: a denoiser over the 50
    timesteps LCM was distilled on, its own schedule, and the boundary condition on x0."""
    timesteps = torch.arange(19, 1000, 20)

    class LCMDenoiser(external.DiscreteEpsDDPMDenoiser):
        def __init__(self):
            super().__init__(ldm, ldm.alphas_cumprod[timesteps].float(), quantize=True)

        def sigma_to_t(self, sigma, quantize=None):
            return timesteps[super().sigma_to_t(sigma, quantize=True)]

        def t_to_sigma(self, t):
            return super().t_to_sigma(((t - 19) / 20).float())

        def get_eps(self, x, t, cond):
            return ldm.apply_model(x, t, cond)

        def forward(self, x, sigma, cond):
            c_in = 1 / (sigma**2 + 1) ** 0.5
            t = self.sigma_to_t(sigma)
            x0 = x - self.get_eps(x * c_in[:, None, None, None], t, cond) * sigma[:, None, None, None]
            scaled = (t * 10.0)[:, None, None, None]
            c_skip, c_out = 0.25 / (scaled**2 + 0.25), scaled / (scaled**2 + 0.25) ** 0.5
            return c_out * x0 + c_skip * x

    denoiser = LCMDenoiser()
    first, last = denoiser.sigma_to_t(denoiser.sigmas[-1:])[0], denoiser.sigma_to_t(denoiser.sigmas[:1])[0]
    t = torch.linspace(first, last, steps)
    sigmas = torch.cat([denoiser.t_to_sigma(t), torch.zeros(1)])

    def sample_lcm(model, x, sigmas, disable=None):
        for i in range(len(sigmas) - 1):
            x = model(x, sigmas[i] * x.new_ones([x.shape[0]]))
            if sigmas[i + 1] > 0:
                x = x + sigmas[i + 1] * k.torch.randn_like(x)
        return x

    return denoiser, sigmas, sample_lcm


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
            if settings.get("our_unet"):
                return world.ours["diffusion"](x, cond, t)
            extra = control_residuals(x, t, cond) if "control" in settings else {}
            return world.unet(x, t, encoder_hidden_states=cond, **extra).sample

    progress = {"step": 0}  # A1111's state.sampling_step: the step callback's last index

    def control_residuals(x, t, cond):
        """A1111's ControlNet extension (sd.controlnet.a1111's docstring) over diffusers' ControlNetModel:
        `settings["control"]` = (model, hint, weight, control mode, start, end); rows [cond..., uncond]."""
        model, hint, weight, mode, start, end = settings["control"]
        if not start <= progress["step"] / steps <= end:
            return {}
        down, mid = model(x, t, cond, hint.expand(x.shape[0], -1, -1, -1), conditioning_scale=1.0,
                          return_dict=False)  # fmt: skip
        out = [*down, mid]
        n = len(out)  # 13 for SD1.5: the last weight is the middle block's, 1 x weight
        scales = [weight] * n if mode == "Balanced" else [weight * 0.825 ** (n - 1 - i) for i in range(n)]
        mark = (torch.arange(x.shape[0]) < len(seeds)).float().reshape(-1, 1, 1, 1)
        rows = mark if mode == "ControlNet is more important" else 1
        out = [r * s * rows for r, s in zip(out, scales, strict=True)]
        return {"down_block_additional_residuals": out[:-1], "mid_block_additional_residual": out[-1]}

    denoiser = external.CompVisDenoiser(LDM())
    if label == "LCM":
        denoiser, lcm_sigmas, lcm_sample = lcm_reference(k, external, LDM(), steps)
    encoder = Pipeline(world.ours).prompt_encoder()
    (uncond,), _ = encoder.encode_groups([[NEGATIVE]])
    (cond,), _ = encoder.encode_groups([[PROMPT]])
    batch = len(seeds)

    second_order = label in ("Heun", "DPM2", "DPM2 a", "DPM++ SDE", "DPM++ 2S a")
    runs = steps if clean is None else int(min(strength, 0.999) * steps) + 1  # launch_sampling's steps
    total_steps, calls = runs * (2 if second_order else 1), [0]
    early, ngms = settings.get("skip_early_cond", 0.0), settings.get("s_min_uncond", 0.0)

    def cfg_denoiser(x, sigma):  # A1111's CFGDenoiser: [cond..., uncond], combined on the denoised outputs
        step, calls[0] = calls[0], calls[0] + 1
        if (early != 0 and step / total_steps <= early) or (
            (step % 2 or settings.get("s_min_uncond_all")) and ngms > 0 and sigma[0] < ngms
        ):  # its skips of the uncond rows: the cond output stands in for them, combined at scale 1
            out = denoiser(x, sigma, cond=cond.expand(batch, -1, -1))
            return out + (out - out) * 1.0
        x_in = torch.cat([x, x])
        context = torch.cat([cond.expand(batch, -1, -1), uncond.expand(batch, -1, -1)])
        out = denoiser(x_in, torch.cat([sigma, sigma]), cond=context)
        denoised_uncond = out[batch:]
        return denoised_uncond + (out[:batch] - denoised_uncond) * cfg

    range_ = {key: settings[key] for key in ("sigma_min", "sigma_max", "rho") if key in settings}
    sigmas = (
        lcm_sigmas if label == "LCM" else reference_sigmas(k, denoiser, schedule, steps, discard, **range_)
    )
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
        if name in ("sample_dpm_fast", "sample_dpm_adaptive"):
            # A1111: the model's range in txt2img, the sliced schedule's ends in img2img
            low, high = (denoiser.sigmas[0].item(), denoiser.sigmas[-1].item()) if clean is None else (
                run_sigmas[-2], run_sigmas[0])  # fmt: skip
            if name == "sample_dpm_fast":
                extra["n"] = len(run_sigmas) - 1
            latents = getattr(k, name)(cfg_denoiser, x, low, high, disable=True, **extra, **kwargs)
        elif label == "LCM":
            latents = lcm_sample(cfg_denoiser, x, run_sigmas)
        else:
            latents = getattr(k, name)(cfg_denoiser, x, run_sigmas, disable=True, **extra, **kwargs,
                                       callback=lambda d: progress.update(step=d["i"]))  # fmt: skip
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
    if label == "DPM adaptive":
        # Its step sizes come from the difference of two solutions, which multiplies the U-Nets' float
        # difference (~1e-6) by about 1000: equal to 1e-3 against diffusers' U-Net, and within the usual
        # tolerance when the reference composition runs over our U-Net.
        scale = reference[0].abs().max()
        assert (latents - reference[0]).abs().max() <= 5e-3 * scale
        reference = reference_run(world, label, steps, [seed, seed + 1], 7.0, monkeypatch, our_unet=True)
    assert_same((latents, pixels), reference, f"{world.name} {label}")
    second_order = label in ("Heun", "DPM2 a", "DPM++ SDE", "DPM++ 2S a")
    if label == "DPM fast":
        assert calls == steps
    elif label != "DPM adaptive":  # (as many calls as its error control needs)
        assert calls == (2 * steps - 1 if second_order else steps)


def test_a1111_ddim_equals_diffusers_ddim_without_its_last_step(world: World) -> None:
    """A1111's own DDIM (§d5) is diffusers' DDIM ("leading" timesteps + 1, no final alpha 1) stopped before
    its last step, t = 1; here over diffusers' U-Net with A1111's CFG on eps and the unscaled first noise.
    Tolerance: 1e-4 of the latents' scale (two U-Nets, fp32)."""
    if world.name != "tiny":
        pytest.skip("the wiring is the same at any size")
    from diffusers import DDIMScheduler

    steps, seeds, cfg = 10, [21, 22], 6.0
    latents, _, images, calls = run_ours(world, "DDIM", steps, seeds[0], 2, cfg)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, timestep_spacing="leading", set_alpha_to_one=False, clip_sample=False,
    )  # fmt: skip
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    scheduler.alphas_cumprod = torch.cumprod(1 - betas, dim=0).float()  # the checkpoint's table, as A1111's
    scheduler.set_timesteps(steps)
    encoder = Pipeline(world.ours).prompt_encoder()
    (uncond,), _ = encoder.encode_groups([[NEGATIVE]])
    (cond,), _ = encoder.encode_groups([[PROMPT]])
    context = torch.cat([cond.expand(2, -1, -1), uncond.expand(2, -1, -1)])
    noise = ImageNoise((4, SIZE // 8, SIZE // 8), seeds)
    x = noise.next()
    with torch.no_grad():
        for t in scheduler.timesteps[:-1]:
            out = world.unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample
            eps = out[2:] + (out[:2] - out[2:]) * cfg
            x = scheduler.step(eps, t, x).prev_sample
            noise.next()  # A1111's DDIM draws its (eta 0: unused) noise every step
    scale = x.abs().max()
    print(
        f"DDIM: max |latents - diffusers| {float((latents - x).abs().max()):.3g} (scale {float(scale):.3g})"
    )
    assert (latents - x).abs().max() <= 1e-4 * scale
    assert calls == steps - 1 and "Sampler: DDIM," in images[0].info["parameters"]


def test_a1111_img2img_slices_the_schedule_as_a1111(world: World, monkeypatch) -> None:
    if world.name != "tiny":
        pytest.skip("the slicing is the same at any size")
    from PIL import Image

    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    pipe = Pipeline(world.ours)
    clean = pipe.encode_image(picture, None)  # A1111's posterior sample is not seed-controlled: the mean
    for label in ("DPM++ 2M", "DPM++ 2M SDE", "DPM fast"):
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
    # "Skip Early CFG" is a fraction of the calls img2img makes (t_enc + 1 = 7), not of the 10 steps
    latents, pixels, images, _ = run_ours(world, "Euler", 10, 5, 1, 7.0, picture, strength=0.6,
                                          skip_early_cond=0.4)  # fmt: skip
    reference = reference_run(world, "Euler", 10, [5], 7.0, monkeypatch, clean=clean, strength=0.6,
                              skip_early_cond=0.4)  # fmt: skip
    assert_same((latents, pixels), reference, "img2img Skip Early CFG")
    assert images[0].info["parameters"].endswith("Denoising strength: 0.6, Skip Early CFG: 0.4")


SETTINGS = {
    "schedule range": ("DPM++ 2M", {"sigma_min": 0.1, "sigma_max": 10.0, "rho": 5.0}),
    "forced discard": ("Euler", {"discard_penultimate": True}),
    "fp16 alphas": ("DPM++ 2M", {"downcast_alphas": True}),
    "fp16 alphas, model's schedule": ("Euler a", {"downcast_alphas": True}),
    "SGM noise": ("Euler a", {"sgm_noise": True}),
    "Skip Early CFG": ("Euler", {"skip_early_cond": 0.3}),
    "Skip Early CFG, second order": ("Heun", {"skip_early_cond": 0.5}),
    "NGMS": ("Euler a", {"s_min_uncond": 2.0}),
    "NGMS all steps": ("DPM++ 2M", {"s_min_uncond": 3.0, "s_min_uncond_all": True}),
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


@pytest.mark.parametrize("label", ["DDIM", "PLMS", "UniPC"])
def test_timestep_samplers_skip_by_their_timestep(world: World, label: str) -> None:
    """A1111's timestep samplers hand CFGDenoiser the timestep where k-diffusion's hand it sigma, so NGMS
    compares the timestep (odd calls below 400 here); "Skip Early CFG" counts their steps."""
    if world.name != "tiny":
        pytest.skip("the wiring is the same at any size")
    seen: list[tuple[int, float]] = []
    unet = world.ours["diffusion"]
    hook = unet.register_forward_pre_hook(lambda _, args: seen.append((args[0].shape[0], float(args[2][0]))))
    try:
        _, _, images, _ = run_ours(world, label, 6, 3, 1, 7.0, s_min_uncond=400.0, skip_early_cond=0.2)
    finally:
        hook.remove()
    expected = [1 if call / 6 <= 0.2 or (call % 2 and t < 400) else 2 for call, (_, t) in enumerate(seen)]
    assert [batch for batch, _ in seen] == expected and 1 in expected[2:]
    assert images[0].info["parameters"].endswith("Size: 64x64, Skip Early CFG: 0.2, NGMS: 400")


def test_tiling_equals_the_reference_with_circular_convolutions(world: World, monkeypatch) -> None:
    """A1111's Tiling sets padding_mode = 'circular' on every Conv2d of the model (apply_circular): so on
    the reference's diffusers U-Net and VAE, the same composition; and the image wraps around."""
    if world.name != "tiny":
        pytest.skip("the padding is the same at any size")
    layers = [
        m for model in (world.unet, world.vae) for m in model.modules() if isinstance(m, torch.nn.Conv2d)
    ]
    for layer in layers:
        layer.padding_mode = "circular"
    try:
        reference = reference_run(world, "DPM++ 2M", 4, [31], 7.0, monkeypatch)
    finally:
        for layer in layers:
            layer.padding_mode = "zeros"
    latents, pixels, images, _ = run_ours(world, "DPM++ 2M", 4, 31, 1, 7.0, tiling=True)
    assert_same((latents, pixels), reference, "tiling")
    plain = run_ours(world, "DPM++ 2M", 4, 31, 1, 7.0)[0]
    assert (latents - plain).abs().max() > 1e-3, "tiling changed nothing"
    assert all(layer.padding_mode == "zeros" for model in world.ours.values() for layer in model.modules()
               if isinstance(layer, torch.nn.Conv2d))  # fmt: skip
    text = images[0].info["parameters"]
    assert "Size: 64x64, Tiling: True" in text and GenerationParams.from_text(text).tiling


def test_each_image_of_a_batch_is_its_own_seed(world: World) -> None:
    if world.name != "tiny":
        pytest.skip("batch invariance is independent of the model size")
    _, batch, images, _ = run_ours(world, "Euler a", 3, 100, batch=3, cfg=5.0)
    for i in range(3):
        _, alone, _, _ = run_ours(world, "Euler a", 3, 100 + i, batch=1, cfg=5.0)
        assert np.abs(alone[0].astype(int) - batch[i].astype(int)).max() <= 1
    assert "Sampler: Euler a" in images[0].info["parameters"]
