"""The hires fix (sd/hires.py): A1111's two-pass txt2img against a composition of the references, its
sizes and crops, each upscaler, the infotext both ways, the CLI end to end, and bad input.

The A1111 reference below is written from A1111 v1.10.1's processing.py (StableDiffusionProcessingTxt2Img:
calculate_target_resolution, sample, sample_hr_pass) and images.py / upscaler.py, independently of
sd/hires.py: diffusers' U-Net and VAE (the `world` fixture's random weights) behind k-diffusion's
CompVisDenoiser and sampler functions, A1111's CFG, the images' noise streams (sd.noise, tested on its own in
test_noise.py). Tolerances as test_a1111: latents within 1e-4 of their scale (fp32, two U-Nets), pixels within
1 level.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sd.hires import crop, hires_size, upscale_image, upscale_latents, upscaler_label
from sd.noise import ImageNoise, _torchsde_draws_from
from sd.params import GenerationParams
from sd.pipeline import Pipeline

import kdiffusion_reference
from conftest import World

PROMPT, NEGATIVE = "a watercolor painting of a lighthouse at dusk", "blurry, low quality"
SIZE = 64
# every test here runs on the tiny model only: the wiring is the same at any size
tiny = pytest.mark.parametrize("world", ["tiny"], indirect=True)

# --- sizes -------------------------------------------------------------------------------------------------

# (first pass W, H, hr_scale, hr_resize_x, hr_resize_y) -> (hr_upscale_to_x, _y, truncate_x, _y, final W, H),
# worked by hand from calculate_target_resolution: int() of W * scale; one side 0: the other from the
# aspect with //; both: cover the target, then crop (W - target) // 8 latent pixels; the image is
# (target // 8 - crop) * 8.
SIZES = [
    ((512, 512, 2.0, 0, 0), (1024, 1024, 0, 0, 1024, 1024)),
    ((512, 512, 1.3, 0, 0), (665, 665, 0, 0, 664, 664)),  # 665.6 -> 665 -> 83 latents -> 664
    ((512, 768, 1.5, 0, 0), (768, 1152, 0, 0, 768, 1152)),
    ((504, 512, 1.25, 0, 0), (630, 640, 0, 0, 624, 640)),
    ((512, 512, 1.0, 0, 0), (512, 512, 0, 0, 512, 512)),
    ((512, 768, 2.0, 1024, 0), (1024, 1536, 0, 0, 1024, 1536)),  # the scale is unused with a size
    ((512, 768, 2.0, 0, 1000), (666, 1000, 0, 0, 664, 1000)),  # 1000 * 512 // 768 = 666
    ((512, 768, 2.0, 1024, 1024), (1024, 1536, 0, 64, 1024, 1024)),
    ((512, 512, 2.0, 1000, 600), (1000, 1000, 0, 50, 1000, 600)),
    ((768, 512, 2.0, 600, 1000), (1500, 1000, 112, 0, 600, 1000)),
    ((512, 512, 2.0, 700, 500), (700, 700, 0, 25, 696, 496)),  # odd crop: 12 rows off the top, 13 the bottom
    ((512, 512, 2.0, 256, 256), (256, 256, 0, 0, 256, 256)),  # a "resize" may shrink, as in A1111
]


@pytest.mark.parametrize(("given", "expected"), SIZES, ids=[str(g) for g, _ in SIZES])
def test_target_size_and_crop_are_a1111s(given, expected) -> None:
    size = hires_size(*given)
    got = (size.upscale_width, size.upscale_height, size.truncate_x, size.truncate_y, size.width, size.height)
    assert got == expected


def test_crop_is_centred_with_the_odd_row_off_the_end() -> None:
    latents = torch.arange(87 * 87, dtype=torch.float32).reshape(1, 1, 87, 87)
    size = hires_size(512, 512, resize_x=700, resize_y=500)  # truncate_y 25
    out = crop(latents, size)
    assert out.shape[-2:] == (62, 87)
    assert torch.equal(out, latents[..., 12 : 87 - 13, :])


# --- upscalers ---------------------------------------------------------------------------------------------

# shared.latent_upscale_modes, copied from A1111 v1.10.1
LATENT_MODES = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}


@pytest.mark.parametrize("label", list(LATENT_MODES))
def test_each_latent_mode_interpolates_as_a1111(label: str) -> None:
    mode, antialias = LATENT_MODES[label]
    latents = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    size = hires_size(96, 64, 1.3)  # 124 x 83 -> 15 x 10 latents: a non-integer factor
    expected = F.interpolate(latents, size=(10, 15), mode=mode, antialias=antialias)
    assert torch.equal(upscale_latents(latents, label, size), expected)
    assert upscaler_label(label.lower()) == label


def test_the_latent_modes_differ_where_they_should() -> None:
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    size = hires_size(64, 64, 1.5)
    outs = {label: upscale_latents(latents, label, size) for label in LATENT_MODES}
    assert not torch.equal(outs["Latent"], outs["Latent (bicubic)"])
    assert not torch.equal(outs["Latent (nearest)"], outs["Latent (nearest-exact)"])
    assert outs["Latent"].shape == (1, 4, 12, 12)


def reference_resize(image: Image.Image, upscaler: str, width: int, height: int) -> Image.Image:
    """A1111's images.resize_image(0, ...) with Upscaler.upscale and UpscalerLanczos/UpscalerNearest."""
    if upscaler == "None":
        return image.resize((width, height), resample=Image.LANCZOS)
    scale = max(width / image.width, height / image.height)
    if scale > 1.0:
        dest_w, dest_h = int((image.width * scale) // 8 * 8), int((image.height * scale) // 8 * 8)
        filt = {"Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}[upscaler]
        for i in range(3):
            if image.width >= dest_w and image.height >= dest_h and (i > 0 or scale != 1):
                break
            shape = image.size
            image = image.resize((int(image.width * scale), int(image.height * scale)), resample=filt)
            if shape == image.size:
                break
        if image.size != (dest_w, dest_h):
            image = image.resize((dest_w, dest_h), resample=Image.LANCZOS)
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    return image


@pytest.mark.parametrize("upscaler", ["Lanczos", "Nearest", "None"])
@pytest.mark.parametrize("target", [(128, 128), (83, 83), (100, 64), (48, 48)])
def test_image_upscalers_resize_as_a1111(upscaler: str, target: tuple[int, int]) -> None:
    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    got = upscale_image(image, upscaler.lower(), *target)
    assert got.size == target
    assert np.array_equal(np.asarray(got), np.asarray(reference_resize(image, upscaler, *target)))


# --- the two passes against the reference composition -------------------------------------------------------

# A1111 label: (k-diffusion function, Automatic schedule, brownian, kwargs)
SAMPLERS = {
    "DPM++ 2M": ("sample_dpmpp_2m", "karras", False, {}),
    "Euler a": ("sample_euler_ancestral", None, False, {"eta": 1.0}),
    "DPM++ 2M SDE": ("sample_dpmpp_2m_sde", "exponential", True, {"eta": 1.0}),
}


class Reference:
    """A1111's pieces over diffusers' models: the CFG denoiser, sigmas, one k-diffusion pass."""

    def __init__(self, world: World, monkeypatch):
        self.k, external = kdiffusion_reference.load()
        self.world, self.monkeypatch = world, monkeypatch

        class LDM(torch.nn.Module):
            betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
            alphas_cumprod = torch.cumprod(1 - betas, dim=0).float()

            def apply_model(self, x, t, cond):
                return world.unet(x, t, encoder_hidden_states=cond).sample

        self.denoiser = external.CompVisDenoiser(LDM())
        encoder = Pipeline(world.ours).prompt_encoder()
        (self.uncond,), _ = encoder.encode_groups([[NEGATIVE]])
        (self.cond,), _ = encoder.encode_groups([[PROMPT]])

    def sigmas(self, label: str, steps: int) -> torch.Tensor:
        schedule = SAMPLERS[label][1]
        low, high = self.denoiser.sigmas[0].item(), self.denoiser.sigmas[-1].item()
        if schedule == "karras":
            return self.k.get_sigmas_karras(steps, low, high)
        if schedule == "exponential":
            return self.k.get_sigmas_exponential(steps, low, high)
        return self.denoiser.get_sigmas(steps)

    @torch.no_grad()
    def run(
        self,
        label: str,
        steps: int,
        seeds: list[int],
        cfg: float,
        shape,
        clean=None,
        hires_steps=0,
        strength=1.0,
    ):
        """txt2img (clean None), or the hires pass from `clean`: sample_img2img with explicit steps."""
        name, _, brownian, kwargs = SAMPLERS[label]
        batch = len(seeds)

        def cfg_denoiser(x, sigma):  # [cond..., uncond], combined on the denoised outputs
            context = torch.cat([self.cond.expand(batch, -1, -1), self.uncond.expand(batch, -1, -1)])
            out = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=context)
            return out[batch:] + (out[:batch] - out[batch:]) * cfg

        noise = ImageNoise(shape, seeds)  # a fresh ImageRNG at this pass's shape, the same seeds
        self.monkeypatch.setattr(self.k, "torch", kdiffusion_reference.RandnFromStreams(noise))
        first = noise.next()
        if clean is None:
            sigmas = self.sigmas(label, steps)
            x, run_sigmas = first * sigmas[0], sigmas
        else:
            # setup_img2img_steps with steps passed: int(hs / min(ds, 0.999)) steps, t_enc = hs - 1
            total = int(hires_steps / min(strength, 0.999))
            sigmas = self.sigmas(label, total)
            run_sigmas = sigmas[total - (hires_steps - 1) - 1 :]
            x = clean + first * run_sigmas[0]
        extra = {}
        with _torchsde_draws_from("GPU"):
            if brownian:  # over the whole schedule, img2img too
                extra["noise_sampler"] = self.k.BrownianTreeNoiseSampler(
                    x, sigmas[sigmas > 0].min(), sigmas.max(), seed=seeds
                )
            out = getattr(self.k, name)(cfg_denoiser, x, run_sigmas, disable=True, **extra, **kwargs)
        return out, len(run_sigmas) - 1

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """decode_first_stage, then A1111's clamp and truncation to uint8."""
        with torch.no_grad():
            image = self.world.vae.decode(latents / self.world.vae.config.scaling_factor).sample
        return (255.0 * torch.clamp((image + 1.0) / 2.0, 0, 1).permute(0, 2, 3, 1).numpy()).astype(np.uint8)

    def encode(self, pixels: np.ndarray) -> torch.Tensor:
        """images_tensor_to_samples: x / 255 * 2 - 1, the VAE, 0.18215 x (the posterior's mean: A1111's sample
        comes from an RNG its seed does not control, §g3)."""
        x = torch.from_numpy(pixels.astype(np.float32) / 255.0).permute(0, 3, 1, 2) * 2 - 1
        with torch.no_grad():
            return self.world.vae.encode(x).latent_dist.mean * self.world.vae.config.scaling_factor


def reference_hires(
    ref: Reference,
    label: str,
    upscaler: str,
    steps: int,
    hires_steps: int,
    strength: float,
    seeds: list[int],
    cfg: float,
    target: tuple[int, int],
    truncate=(0, 0),
):
    """A1111's whole hires txt2img: first pass, upscale (latent or image), crop, second pass, decode."""
    latents, _ = ref.run(label, steps, seeds, cfg, (4, SIZE // 8, SIZE // 8))
    tw, th = target
    if upscaler.startswith("Latent"):
        mode, antialias = LATENT_MODES[upscaler]
        upscaled = F.interpolate(latents, size=(th // 8, tw // 8), mode=mode, antialias=antialias)
    else:
        pixels = ref.decode(latents)  # truncated to uint8, as the final image
        resized = [np.asarray(reference_resize(Image.fromarray(p), upscaler, tw, th)) for p in pixels]
        upscaled = ref.encode(np.stack(resized))
    tx, ty = truncate
    h, w = upscaled.shape[-2:]
    upscaled = upscaled[..., ty // 2 : h - (ty + 1) // 2, tx // 2 : w - (tx + 1) // 2]
    final, ran = ref.run(
        label, hires_steps, seeds, cfg, tuple(upscaled.shape[1:]), upscaled, hires_steps, strength
    )
    return final, ref.decode(final), ran


def run_ours(
    world: World,
    label: str,
    upscaler: str,
    steps: int,
    hires_steps: int,
    strength: float,
    seed: int,
    batch: int,
    cfg: float,
    **hires,
):
    params = GenerationParams(
        PROMPT,
        NEGATIVE,
        steps=steps,
        sampler=label,
        cfg_scale=cfg,
        seed=seed,
        width=SIZE,
        height=SIZE,
        a1111=True,
        strength=strength,
        enable_hr=True,
        hr_upscaler=upscaler,
        hr_second_pass_steps=hires_steps,
        **hires,
    )
    seen = []
    images = Pipeline(world.ours).run(params, num_images=batch, callback=seen.append)
    return seen[-1].latents, np.stack([np.asarray(i) for i in images]), images, len(seen)


def assert_same(latents, pixels, ref_latents, ref_pixels, what: str, tolerance: float = 1e-4) -> None:
    scale, difference = ref_latents.abs().max(), (latents - ref_latents).abs().max()
    levels = np.abs(pixels.astype(int) - ref_pixels.astype(int)).max()
    print(
        f"{what}: max |latents - reference| {float(difference):.3g} (scale {float(scale):.3g}), "
        f"pixels {levels} levels"
    )
    assert latents.shape == ref_latents.shape and pixels.shape == ref_pixels.shape, what
    assert difference <= tolerance * scale, what
    assert levels <= 1, what


CASES = [
    # (sampler, upscaler, steps, hires steps, strength, hires keywords, target, truncate)
    ("DPM++ 2M", "Latent", 4, 3, 0.5, {"hr_scale": 2.0}, (128, 128), (0, 0)),
    ("Euler a", "Latent (bicubic antialiased)", 3, 2, 0.7, {"hr_scale": 1.5}, (96, 96), (0, 0)),
    (
        "DPM++ 2M SDE",
        "Latent (nearest-exact)",
        3,
        3,
        0.6,
        {"hr_resize_x": 96, "hr_resize_y": 64},
        (96, 96),
        (0, 4),
    ),
    ("DPM++ 2M", "Lanczos", 3, 2, 0.45, {"hr_scale": 1.3}, (83, 83), (0, 0)),
    ("Euler a", "None", 3, 2, 0.6, {"hr_resize_x": 0, "hr_resize_y": 100}, (100, 100), (0, 0)),
]


@tiny
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_a1111_hires_equals_the_reference_composition(world: World, case, monkeypatch) -> None:
    label, upscaler, steps, hires_steps, strength, hires, target, truncate = case
    seed, cfg = 1234, 7.0
    latents, pixels, images, calls = run_ours(
        world, label, upscaler, steps, hires_steps, strength, seed, 2, cfg, **hires
    )
    ref = Reference(world, monkeypatch)
    ref_latents, ref_pixels, ran = reference_hires(
        ref, label, upscaler, steps, hires_steps, strength, [seed, seed + 1], cfg, target, truncate
    )
    # Image upscalers go through the first pass's uint8 pixels: where the two first passes (1e-6 apart)
    # land on either side of an integer, a pixel is a level off, and the encoder carries that level into
    # the second pass's latents (measured: 1.7e-4 of their scale, and the final pixels within a level).
    tolerance = 1e-4 if upscaler.startswith("Latent") else 1e-3
    assert_same(latents, pixels, ref_latents, ref_pixels, f"{label} {upscaler}", tolerance)
    assert ran == hires_steps  # A1111: exactly the hires steps, whatever the strength
    assert calls == steps + hires_steps  # (first-order samplers: one call a step)
    text = images[1].info["parameters"]
    assert f"Seed: {seed + 1}," in text and f"Size: {SIZE}x{SIZE}," in text and "Denoising strength" in text


@tiny
def test_hires_prompt_editing_counts_on_from_the_first_pass(world: World) -> None:
    """[cat:dog:1.5] switches halfway through the hires pass (A1111's hires schedule), and an integer
    switch inside the first pass's steps means the second text all through the hires pass."""
    pipe = Pipeline(world.ours)
    base = dict(
        steps=4,
        sampler="Euler",
        seed=3,
        width=SIZE,
        height=SIZE,
        a1111=True,
        strength=0.5,
        enable_hr=True,
        hr_second_pass_steps=4,
    )
    half = pipe.run(GenerationParams("a [cat:dog:1.5]", **base))[0]
    # in the hires pass an integer counts on from the first pass's 4 steps: 6 is its step 2
    manual = pipe.run(GenerationParams("a cat", **base, hr_prompt="a [cat:dog:6]"))[0]
    assert np.array_equal(np.asarray(half), np.asarray(manual))
    early = pipe.run(GenerationParams("a [cat:dog:2]", **base))[0]
    dog = pipe.run(GenerationParams("a [cat:dog:2]", **base, hr_prompt="a dog"))[0]
    assert np.array_equal(np.asarray(early), np.asarray(dog))
    assert "Hires prompt: a dog," in dog.info["parameters"]


@tiny
def test_diffusers_way_is_diffusers_txt2img_then_img2img(world: World) -> None:
    """diffusers' way: its txt2img, the latents interpolated, its img2img over them (a fresh generator of
    the seed), composed from diffusers' own pipelines. Tolerances as test_pipeline's."""
    from test_pipeline import diffusers_pipeline

    seed, steps, hires_steps, strength = 11, 4, 5, 0.6
    params = GenerationParams(
        PROMPT,
        NEGATIVE,
        steps=steps,
        sampler="euler_a",
        seed=seed,
        width=SIZE,
        height=SIZE,
        strength=strength,
        enable_hr=True,
        hr_second_pass_steps=hires_steps,
    )
    seen = []
    image = Pipeline(world.ours).run(params, callback=seen.append)[0]
    first = diffusers_pipeline(world, "euler_a")(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=steps,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        height=SIZE,
        width=SIZE,
    ).images
    upscaled = F.interpolate(first, size=(16, 16), mode="bilinear")
    kept = {}

    def keep(pipe, step, timestep, callback_kwargs):
        kept["latents"] = callback_kwargs["latents"]
        return callback_kwargs

    out = diffusers_pipeline(world, "euler_a", img2img=True)(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        image=upscaled,
        strength=strength,
        num_inference_steps=hires_steps,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        callback_on_step_end=keep,
    ).images
    ref_pixels = (out * 255).round().astype(np.uint8)
    assert image.size == (128, 128)
    scale = max(1.0, kept["latents"].abs().max().item())
    assert (seen[-1].latents - kept["latents"]).abs().max() <= 1e-4 * scale
    assert np.abs(np.asarray(image).astype(int) - ref_pixels[0].astype(int)).max() <= 1
    assert len(seen) == steps + int(hires_steps * strength)  # diffusers' img2img: int(steps x strength)


# --- infotext --------------------------------------------------------------------------------

A1111_TEXTS = [
    # (what A1111 v1.10.1 writes, the hires fields it means)
    ("Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, "
     "Denoising strength: 0.7, Hires upscale: 2, Hires upscaler: Latent, Version: v1.10.1",
     dict(hr_scale=2.0, hr_upscaler="Latent", strength=0.7)),
    ("Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1, Size: 512x768, "
     "Denoising strength: 0.55, Hires resize: 1024x0, Hires steps: 10, Hires upscaler: Lanczos, "
     "Version: v1.10.1",
     dict(hr_resize_x=1024, hr_resize_y=0, hr_second_pass_steps=10, hr_upscaler="Lanczos", strength=0.55)),
    # another hires sampler, no hires schedule: A1111 replays it on that sampler's own (Automatic) schedule
    ("Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, "
     "Denoising strength: 0.7, Hires sampler: Euler a, Hires upscale: 1.5, Version: v1.10.1",
     dict(hr_sampler_name="Euler a", hr_scheduler="Automatic", hr_scale=1.5, hr_upscaler=None)),
    # ... unless the first pass's schedule was not its sampler's own: then that one
    ("Steps: 20, Sampler: DPM++ 2M, Schedule type: Exponential, CFG scale: 7, Seed: 1, Size: 512x512, "
     "Denoising strength: 0.7, Hires sampler: Euler, Hires upscale: 2, Version: v1.10.1",
     dict(hr_sampler_name="Euler", hr_scheduler="Exponential")),
    ('Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, '
     'Denoising strength: 0.5, Hires prompt: "a cat, detailed", Hires negative prompt: blurry, '
     'Hires schedule type: Exponential, Hires upscale: 2, Hires upscaler: Latent (bicubic), Version: v1.10.1',
     dict(hr_prompt="a cat, detailed", hr_negative_prompt="blurry", hr_scheduler="Exponential",
          hr_upscaler="Latent (bicubic)")),
    # before v1.0: "First pass size", and Size the final one (restore_old_hires_fix_params)
    ("Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 1024x1024, Denoising strength: 0.7, "
     "First pass size: 0x0", dict(width=512, height=512, hr_resize_x=1024, hr_resize_y=1024)),
]  # fmt: skip


@pytest.mark.parametrize(("settings", "expected"), A1111_TEXTS, ids=range(len(A1111_TEXTS)))
def test_a1111_hires_infotexts_are_read_as_a1111_replays_them(settings: str, expected: dict) -> None:
    params = GenerationParams.from_text(f"a lighthouse\n{settings}")
    assert params.enable_hr and params.a1111 and params.unhonoured == ()
    for key, value in expected.items():
        assert getattr(params, key) == value, key


def test_hires_keys_without_denoising_strength_are_no_hires_fix() -> None:
    """A1111's paste turns hires on only with "Denoising strength" and a hires key."""
    text = "a\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Hires upscale: 2"
    assert not GenerationParams.from_text(text).enable_hr


ROUND_TRIPS = [
    dict(hr_scale=1.75),
    dict(hr_resize_x=1024, hr_resize_y=768, hr_upscaler="Latent (nearest)", hr_second_pass_steps=7),
    dict(hr_sampler_name="Euler a", hr_scheduler="Automatic", hr_prompt="a, b: c", hr_negative_prompt="x"),
    dict(hr_sampler_name="DPM++ SDE", hr_scheduler="Exponential", hr_upscaler="Lanczos"),
    dict(hr_scheduler="Uniform"),
]


@pytest.mark.parametrize("hires", ROUND_TRIPS, ids=range(len(ROUND_TRIPS)))
@pytest.mark.parametrize("schedule", ["Karras", "Exponential"])
def test_infotext_round_trip(hires: dict, schedule: str) -> None:
    """Written as A1111 writes it (plus "Hires schedule type" where a reader would take another schedule)
    and read back to the same settings: the second pass runs the same sampler on the same schedule."""
    from sd.hires import schedule_key

    params = GenerationParams(
        "a lighthouse",
        "fog",
        steps=20,
        sampler="DPM++ 2M",
        seed=9,
        a1111=True,
        schedule=schedule,
        strength=0.6,
        enable_hr=True,
        **hires,
    )
    text = params.to_text()
    back = GenerationParams.from_text(text)
    assert back.to_text() == text
    for field in (
        "hr_scale",
        "hr_resize_x",
        "hr_resize_y",
        "hr_upscaler",
        "hr_second_pass_steps",
        "strength",
        "hr_prompt",
        "hr_negative_prompt",
    ):
        assert getattr(back, field) == getattr(params, field), field
    sampler = params.hr_sampler_name or params.sampler
    assert (back.hr_sampler_name or back.sampler) == sampler
    # (None: the sampler's own is the model's, which "Uniform" names)
    assert (schedule_key(sampler, back.hr_scheduler or back.schedule) or "uniform") == (
        schedule_key(sampler, params.hr_scheduler or params.schedule) or "uniform"
    )


def test_the_keys_are_in_a1111s_order() -> None:
    params = GenerationParams(
        "p",
        steps=20,
        sampler="DPM++ 2M",
        a1111=True,
        schedule="Karras",
        strength=0.5,
        enable_hr=True,
        hr_sampler_name="Euler",
        hr_scheduler="Exponential",
        hr_prompt="q",
        hr_second_pass_steps=5,
        hr_upscaler="Latent",
    )
    line = params.to_text().splitlines()[-1]
    keys = [part.split(":")[0].strip() for part in line.split(", ")]
    assert keys == [
        "Steps",
        "Sampler",
        "Schedule type",
        "CFG scale",
        "Seed",
        "Size",
        "Denoising strength",
        "Hires sampler",
        "Hires prompt",
        "Hires schedule type",
        "Hires upscale",
        "Hires steps",
        "Hires upscaler",
    ]


@tiny
def test_an_image_replays_from_its_parameters(world: World) -> None:
    pipe = Pipeline(world.ours)
    params = GenerationParams(
        PROMPT,
        steps=3,
        sampler="DPM++ 2M",
        seed=4,
        width=SIZE,
        height=SIZE,
        a1111=True,
        strength=0.6,
        enable_hr=True,
        hr_upscaler="Nearest",
        hr_resize_x=96,
        hr_sampler_name="Euler a",
        hr_second_pass_steps=2,
    )
    image = pipe.run(params)[0]
    again = pipe.run(GenerationParams.from_text(image.info["parameters"]))[0]
    assert image.size == (96, 96)
    assert np.array_equal(np.asarray(image), np.asarray(again))


# --- the command line --------------------------------------------------------------------------------


def test_cli_hires_with_the_builtin_model_makes_twice_the_size_and_replays(
    tmp_path, monkeypatch, capsys
) -> None:
    from sd.checkpoints import BUILTIN_MODEL
    from sd.cli import main
    from sd.images import read_png_parameters

    if not BUILTIN_MODEL.is_file():
        pytest.skip("the built-in model is not trained yet (scripts/train_builtin.sh)")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SD_CHECKPOINT", raising=False)
    monkeypatch.setenv("SD_HOME", str(tmp_path / "home"))
    first = [
        "generate",
        "a red circle",
        "--seed",
        "3",
        "--steps",
        "2",
        "--hires",
        "2",
        "--hires-steps",
        "2",
        "--hires-upscaler",
        "Latent (bicubic)",
        "-o",
        "a.png",
    ]
    assert main(first) == 0
    assert main(["generate", "--from-png", "a.png", "-o", "b.png"]) == 0
    capsys.readouterr()
    a, b = Image.open("a.png"), Image.open("b.png")
    native = GenerationParams.from_text(read_png_parameters("a.png"))
    assert a.size == (2 * native.width, 2 * native.height)
    assert "Hires upscale: 2, Hires steps: 2, Hires upscaler: Latent (bicubic)" in read_png_parameters(
        "a.png"
    )
    assert np.array_equal(np.asarray(a), np.asarray(b))


BAD = [
    (["--hires", "2", "--hires-upscaler", "ESRGAN_4x"], "'ESRGAN_4x' needs its model"),
    (["--hires", "2", "--hires-upscaler", "bilinear"], "'bilinear' is not a built-in upscaler"),
    (["--hires", "0.5"], "hires scale must be at least 1, got 0.5"),
    (["--hires", "two"], "--hires takes a scale"),
    (["--hires", "4", "--width", "1024", "--height", "512"], "hires fix to 4096x2048: width must be"),
    (["--hires", "2", "--hires-strength", "0"], "hires denoising strength must be in (0, 1]"),
    (["--hires", "2", "--hires-steps", "-1"], "hires steps must be >= 0"),
    (["--hires-steps", "4"], "--hires-steps needs --hires"),
    (["--hires", "2", "--init-image", "in.png"], "--hires is for txt2img; it cannot go with --init-image"),
    (["--hires", "2", "--hires-sampler", "nope"], "unknown sampler 'nope'"),
]


@pytest.mark.parametrize(("flags", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_hires_input_is_one_clear_line(flags, message, tmp_path, monkeypatch, capsys) -> None:
    """Refused before any model loads (no checkpoint here at all), in one line."""
    from sd.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SD_HOME", str(tmp_path))
    monkeypatch.setattr("sd.checkpoints.BUILTIN_MODEL", tmp_path / "none.safetensors")
    code = main(["generate", "a fox", "--steps", "2", *flags])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and message in lines[0], err


def test_bad_hires_input_in_python() -> None:
    from sd.hires import check_hires

    good = dict(prompt="a", a1111=True, enable_hr=True, strength=0.5)
    with pytest.raises(ValueError, match="hires upscaler 'SwinIR 4x' needs its model"):
        check_hires(GenerationParams(**good, hr_upscaler="SwinIR 4x"))
    with pytest.raises(ValueError, match="hires resize must be >= 0"):
        check_hires(GenerationParams(**good, hr_resize_x=-8))
    with pytest.raises(ValueError, match="hires scale must be at least 1"):
        check_hires(GenerationParams(**good, hr_scale=0.9))


def test_the_server_maps_a1111s_hires_fields_one_to_one() -> None:
    from sd.server import parse_request

    body = {"prompt": "a", "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "latent (bicubic)",
            "denoising_strength": 0.45, "hr_second_pass_steps": 6, "hr_sampler_name": "Euler a",
            "hr_scheduler": "Use same scheduler", "hr_prompt": "b", "hr_resize_x": 0}  # fmt: skip
    params = parse_request(body, img2img=False).params
    assert (params.enable_hr, params.hr_scale, params.hr_upscaler, params.strength) == (
        True, 1.5, "Latent (bicubic)", 0.45)  # fmt: skip
    assert (params.hr_second_pass_steps, params.hr_sampler_name, params.hr_scheduler, params.hr_prompt) == (
        6, "Euler a", None, "b")  # fmt: skip
    assert not parse_request({"prompt": "a", "hr_scale": 3}, img2img=False).params.enable_hr


@tiny
@pytest.mark.parametrize(
    "hr_sampler", ["DDIM", "PLMS", "UniPC", "Heun", "DPM++ SDE", "DPM fast", "LCM", "Restart"]
)
def test_every_kind_of_hires_sampler_runs_its_calls(world: World, hr_sampler: str) -> None:
    """The second pass on A1111's other sampler kinds (timesteps, second-order, sigma-range, LCM): as many
    model calls as model_calls() says (the CLI's progress total), at the hires size."""
    from sd.config import TINY
    from sd.pipeline import model_calls

    params = GenerationParams(PROMPT, steps=3, sampler="Euler a", seed=2, width=SIZE, height=SIZE, a1111=True,
                              strength=0.7, enable_hr=True, hr_scale=1.5, hr_second_pass_steps=4,
                              hr_sampler_name=hr_sampler)  # fmt: skip
    seen = []
    image = Pipeline(world.ours).run(params, callback=seen.append)[0]
    assert image.size == (96, 96)
    assert len(seen) == model_calls(params, TINY.schedule)
    assert f"Hires sampler: {hr_sampler}," in image.info["parameters"]


def test_cli_replays_an_a1111_hires_png(tmp_path, monkeypatch, capsys) -> None:
    """--from-png of an A1111 hires infotext: its denoising strength, steps, sampler and upscaler, no
    warning; the image Pipeline.run makes from the parsed parameters."""
    from sd.checkpoints import BUILTIN_MODEL
    from sd.cli import main
    from sd.images import save_png
    from sd.weights import load_models

    if not BUILTIN_MODEL.is_file():
        pytest.skip("the built-in model is not trained yet (scripts/train_builtin.sh)")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SD_HOME", str(tmp_path / "home"))
    text = ("a red circle\nNegative prompt: blurry\nSteps: 3, Sampler: DPM++ 2M, Schedule type: Karras, "
            "CFG scale: 7, Seed: 5, Size: 64x64, Denoising strength: 0.55, Hires sampler: Euler a, "
            "Hires resize: 96x80, Hires steps: 2, Hires upscaler: Lanczos, Version: v1.10.1")  # fmt: skip
    save_png(Image.new("RGB", (96, 80)), tmp_path / "a1111.png", text)
    assert main(["generate", "--from-png", "a1111.png", "-o", "ours.png"]) == 0
    err = capsys.readouterr().err
    assert "warning" not in err, err
    expected = Pipeline(load_models(BUILTIN_MODEL)).run(GenerationParams.from_text(text))[0]
    ours = Image.open("ours.png")
    assert ours.size == (96, 80) and np.array_equal(np.asarray(ours), np.asarray(expected))
