"""Whole pipelines against diffusers' StableDiffusionPipeline / StableDiffusionImg2ImgPipeline.

Both run on the same random weights (the `world` fixture: TINY, and full-size SD1.5 at a small image
size), the same prompt, seed, sampler and settings. Tolerances: final latents within 1e-4 of their
scale (fp32; in practice bit-identical), uint8 images off by at most 1 level (rounding ties).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sd.config import ScheduleConfig
from sd.pipeline import Pipeline, generate
from sd.samplers import SAMPLERS

from conftest import World
from reference import reference_tokenizer
from test_samplers import make_scheduler

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

PROMPT = "a watercolor painting of a lighthouse at dusk"
NEGATIVE = "blurry, low quality"
SIZE = 64  # pixels: 8x8 latents keep the full-size U-Net cheap on a CPU
STEPS = 4
# Full-size runs cost real time: a representative subset there, every sampler on the tiny model.
SD15_SAMPLERS = ("pndm", "euler_a", "dpmpp_2m", "ddim")


def diffusers_pipeline(
    world: World, sampler: str, karras: bool = False, img2img: bool = False, prediction_type: str = "epsilon"
):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
    pipe = cls(
        vae=world.vae,
        text_encoder=world.text_encoder,
        tokenizer=reference_tokenizer(),
        unet=world.unet,
        scheduler=make_scheduler(sampler, karras, prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_reference(pipe, **kwargs) -> tuple[torch.Tensor, np.ndarray]:
    """Final latents and uint8 images of a diffusers pipeline call."""
    seen = {}

    def keep_latents(pipe, step, timestep, callback_kwargs):
        seen["latents"] = callback_kwargs["latents"]
        return callback_kwargs

    out = pipe(**kwargs, output_type="np", callback_on_step_end=keep_latents)
    return seen["latents"], (out.images * 255).round().astype(np.uint8)


def run_ours(method, **kwargs) -> tuple[torch.Tensor, np.ndarray]:
    seen = {}
    images = method(**kwargs, callback=lambda step: seen.update(latents=step.latents))
    return seen["latents"], np.stack([np.asarray(im) for im in images])


def assert_same(ours: tuple, ref: tuple, what: str) -> None:
    (latents, images), (ref_latents, ref_images) = ours, ref
    diff = (latents - ref_latents).abs().max().item()
    scale = max(1.0, ref_latents.abs().max().item())
    levels = np.abs(images.astype(int) - ref_images.astype(int))
    print(
        f"{what}: latents max abs diff {diff:.3g}; image levels off: max {levels.max()}, "
        f"{(levels > 0).mean():.2%} of values"
    )
    assert diff <= 1e-4 * scale, f"{what}: latents differ by {diff:.3g}"
    assert images.shape == ref_images.shape
    assert levels.max() <= 1, f"{what}: uint8 images differ by up to {levels.max()} levels"


def samplers_for(world: World) -> tuple[str, ...]:
    return SD15_SAMPLERS if world.name == "sd15" else tuple(SAMPLERS)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_txt2img_matches_diffusers(world: World, sampler: str) -> None:
    if sampler not in samplers_for(world):
        pytest.skip("full-size runs cover a subset of samplers")
    steps = STEPS if sampler != "lcm" else 2
    ref = run_reference(
        diffusers_pipeline(world, sampler),
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        height=SIZE,
        width=SIZE + 16,
        num_inference_steps=steps,
        guidance_scale=7.5,
        num_images_per_prompt=2,
        generator=torch.Generator().manual_seed(42),
    )
    ours = run_ours(
        Pipeline(world.ours).txt2img,
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        height=SIZE,
        width=SIZE + 16,
        steps=steps,
        cfg_scale=7.5,
        num_images=2,
        sampler=sampler,
        seed=42,
    )
    assert_same(ours, ref, f"{world.name} txt2img {sampler}")


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_v_prediction_txt2img_matches_diffusers(world: World, sampler: str) -> None:
    """The same random U-Net read as a v-prediction model, in both pipelines."""
    if world.name == "sd15":
        pytest.skip("the sampler-side conversion is the same at every model size")
    v_schedule = ScheduleConfig(prediction_type="v_prediction")
    common = dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE)
    ref = run_reference(
        diffusers_pipeline(world, sampler, prediction_type="v_prediction"),
        **common,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(3),
    )
    ours = run_ours(
        Pipeline(world.ours, schedule=v_schedule).txt2img, **common, steps=STEPS, sampler=sampler, seed=3
    )
    assert_same(ours, ref, f"{world.name} v-prediction txt2img {sampler}")
    as_eps = run_ours(Pipeline(world.ours).txt2img, **common, steps=STEPS, sampler=sampler, seed=3)
    assert (as_eps[0] - ref[0]).abs().max() > 1e-2  # the v path is not the eps one


def test_txt2img_karras_and_no_guidance(world: World) -> None:
    ref = run_reference(
        diffusers_pipeline(world, "dpmpp_2m", karras=True),
        prompt=PROMPT,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(3),
    )
    ours = run_ours(
        Pipeline(world.ours).txt2img,
        prompt=PROMPT,
        height=SIZE,
        width=SIZE,
        steps=STEPS,
        cfg_scale=1.0,
        sampler="dpmpp_2m",
        karras=True,
        seed=3,
    )
    assert_same(ours, ref, f"{world.name} txt2img dpmpp_2m karras, CFG off")


def init_image(width: int = SIZE, height: int = SIZE) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.mark.parametrize("sampler", ["pndm", "euler_a", "dpmpp_2m", "ddim", "heun"])
@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_img2img_matches_diffusers(world: World, sampler: str, strength: float) -> None:
    if sampler not in samplers_for(world) or (world.name == "sd15" and strength == 1.0):
        pytest.skip("full-size runs cover a subset")
    image = init_image()
    ref = run_reference(
        diffusers_pipeline(world, sampler, img2img=True),
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        image=image,
        strength=strength,
        num_inference_steps=5,
        guidance_scale=7.5,
        num_images_per_prompt=2,
        generator=torch.Generator().manual_seed(7),
    )
    ours = run_ours(
        Pipeline(world.ours).img2img,
        image=image,
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        strength=strength,
        steps=5,
        cfg_scale=7.5,
        num_images=2,
        sampler=sampler,
        seed=7,
    )
    assert_same(ours, ref, f"{world.name} img2img {sampler} strength {strength}")


def test_seed_generate_equals_pipeline(world: World) -> None:
    if world.name != "tiny":
        pytest.skip("API equivalence needs no full-size model")
    common = dict(seed=11, width=SIZE, height=SIZE)
    seed_api = generate(
        PROMPT, NEGATIVE, sampler_name="ddpm", n_inference_steps=3, models=world.ours, device="cpu", **common
    )
    (image,) = Pipeline(world.ours).txt2img(PROMPT, NEGATIVE, steps=3, sampler="ddpm", **common)
    assert seed_api.dtype == np.uint8 and seed_api.shape == (SIZE, SIZE, 3)
    assert np.array_equal(seed_api, np.asarray(image))
    # The seed's callers pass transformers' tokenizer: A1111 prompts work with it too.
    weighted = "a (watercolor:1.3) painting BREAK of a lighthouse"
    with_hf = generate(weighted, NEGATIVE, sampler_name="ddpm", n_inference_steps=3, models=world.ours,
                       tokenizer=reference_tokenizer(), **common)  # fmt: skip
    (image,) = Pipeline(world.ours).txt2img(weighted, NEGATIVE, steps=3, sampler="ddpm", **common)
    assert np.array_equal(with_hf, np.asarray(image))

    # img2img with CFG switched off, and the models parked on an idle device between uses.
    picture = init_image(80, 72)
    moves: list[tuple[str, str]] = []
    for name, model in world.ours.items():
        model.to = lambda device, _name=name, _to=model.to: (moves.append((_name, str(device))), _to(device))[
            1
        ]
    try:
        seed_api = generate(
            PROMPT,
            input_image=picture,
            strength=0.5,
            do_cfg=False,
            sampler_name="euler",
            n_inference_steps=4,
            models=world.ours,
            device="cpu",
            idle_device="cpu",
            **common,
        )
    finally:
        for model in world.ours.values():
            del model.to
    used = [name for name, _ in moves]
    for name in ("clip", "encoder", "diffusion", "decoder"):
        assert used.count(name) >= 2, f"{name} was not moved to the device and back: {moves}"
    (image,) = Pipeline(world.ours).img2img(
        picture, PROMPT, strength=0.5, cfg_scale=1.0, steps=4, sampler="euler", **common
    )
    assert seed_api.shape == (SIZE, SIZE, 3)  # the seed's API resizes the input to width x height
    assert np.array_equal(seed_api, np.asarray(image))


def test_run_replays_the_parameters_an_image_carries(world: World) -> None:
    if world.name != "tiny":
        pytest.skip("API equivalence needs no full-size model")
    from sd.params import GenerationParams

    pipe = Pipeline(world.ours)
    images = pipe.txt2img(PROMPT, NEGATIVE, steps=3, sampler="euler_a", seed=4, num_images=2, width=SIZE,
                          height=SIZE)  # fmt: skip
    params = GenerationParams.from_text(images[1].info["parameters"])
    again = pipe.run(params, num_images=params.batch_size)
    assert np.array_equal(np.asarray(again[1]), np.asarray(images[1]))
    assert not np.array_equal(np.asarray(again[0]), np.asarray(images[1]))  # a different image of the batch

    picture = init_image(80, 72)
    (edited,) = pipe.img2img(picture, PROMPT, strength=0.5, steps=4, seed=2)
    replayed = pipe.run(GenerationParams.from_text(edited.info["parameters"]), picture)
    assert edited.size == (80, 72) and np.array_equal(np.asarray(replayed[0]), np.asarray(edited))
    with pytest.raises(ValueError, match="img2img needs a strength"):
        pipe.run(GenerationParams(PROMPT, steps=2), picture)


@pytest.mark.parametrize(
    ("sampler", "a1111", "final_ratio"),
    [("euler", False, 0.0), ("dpmpp_2m", False, 0.0), ("Euler", True, 0.0), ("DDIM", True, 0.05)],
)
def test_steps_carry_the_clean_image_prediction(world: World, sampler: str, a1111: bool, final_ratio: float):
    """Step.denoised is the call's guided x0 (A1111's previews and interrupted results). Euler-like runs end
    on it exactly (their last step goes to sigma 0); A1111's DDIM stops at abar[1], within a few percent;
    mid-run the sampler's latents are noisy, far from it."""
    if world.name != "tiny":
        pytest.skip("the prediction's bookkeeping needs no full-size model")
    from sd.params import GenerationParams

    steps: list = []
    params = GenerationParams(PROMPT, NEGATIVE, 6, sampler, False, 7.5, 3, SIZE, SIZE, a1111=a1111)
    Pipeline(world.ours).run(params, callback=steps.append)
    assert all(s.denoised is not None and s.denoised.shape == s.latents.shape for s in steps)

    def off(step) -> float:
        return ((step.latents - step.denoised).abs().max() / step.denoised.abs().max()).item()

    assert off(steps[-1]) <= max(final_ratio, 1e-5), off(steps[-1])
    assert off(steps[0]) > 0.1
