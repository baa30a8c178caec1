"""Inpainting and outpainting: against diffusers' StableDiffusionInpaintPipeline (random tiny weights, 4- and
9-channel U-Nets), A1111's formulas, the composite, and bad input.

Tolerances: final latents within 1e-4 of their scale (fp32; diffusers' and our arithmetic are the same
operations), uint8 images at most 1 level apart (rounding ties). diffusers returns the decoded image as it
is; ours composites the original outside the mask, so the images are compared with `composite=False`, and
the composite is checked on its own (exact equality outside the mask).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from sd.config import TINY
from sd.inpaint import InpaintSettings, blur_mask, crop_region, expand_crop_region, gaussian_kernel, load_mask
from sd.params import GenerationParams
from sd.pipeline import Pipeline

from reference import reference_models, reference_tokenizer
from test_samplers import make_scheduler

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

PROMPT = "a red door in a white wall"
NEGATIVE = "blurry"
SIZE = 64
TINY9 = replace(TINY, unet=replace(TINY.unet, in_channels=9))


def picture(width: int = SIZE, height: int = SIZE) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x * y) % 251], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def rectangle(width: int = SIZE, height: int = SIZE, box=(16, 20, 44, 52)) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, box)
    return mask


@pytest.fixture(scope="module", params=[4, 9], ids=["4-channel", "9-channel"])
def models(request, tmp_path_factory):
    """(channels, our models, diffusers' unet, vae, text encoder, checkpoint path) on the same weights."""
    from safetensors.torch import save_file

    from sd.keymap import diffusers_configs
    from sd.testing import ldm_state_dict, random_models
    from sd.weights import load_models

    config = TINY9 if request.param == 9 else TINY
    state = ldm_state_dict(random_models(config, seed=99))
    path = tmp_path_factory.mktemp("inpaint") / "model.safetensors"
    save_file(state, str(path), metadata={"sd_config": config.to_json()})
    unet, vae, text_encoder = reference_models(state, diffusers_configs(config))
    return request.param, load_models(path), unet, vae, text_encoder, path


def reference_pipe(models, sampler: str):
    from diffusers import StableDiffusionInpaintPipeline

    _, _, unet, vae, text_encoder, _ = models
    pipe = StableDiffusionInpaintPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=reference_tokenizer(), unet=unet,
        scheduler=make_scheduler(sampler), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compare(ours, ref, what: str):
    (latents, images), (ref_latents, ref_images) = ours, ref
    diff = (latents - ref_latents).abs().max().item()
    scale = max(1.0, ref_latents.abs().max().item())
    levels = np.abs(images.astype(int) - ref_images.astype(int)).max()
    print(f"{what}: latents max abs diff {diff:.3g}, image levels off {levels}")
    assert diff <= 1e-4 * scale, f"{what}: latents differ by {diff:.3g}"
    assert levels <= 1, f"{what}: images differ by {levels} levels"


@pytest.mark.parametrize(
    ("sampler", "strength"),
    [("euler", 1.0), ("euler", 0.6), ("dpmpp_2m", 0.75), ("ddim", 1.0), ("euler_a", 0.7), ("pndm", 0.8)],
)
def test_matches_diffusers_inpaint_pipeline(models, sampler: str, strength: float) -> None:
    channels = models[0]
    image, mask = picture(), rectangle()
    seen = {}

    def keep(pipe, step, timestep, kwargs):
        seen["latents"] = kwargs["latents"]
        return kwargs

    out = reference_pipe(models, sampler)(
        prompt=PROMPT, negative_prompt=NEGATIVE, image=image, mask_image=mask, height=SIZE, width=SIZE,
        strength=strength, num_inference_steps=5, guidance_scale=7.5, num_images_per_prompt=2,
        generator=torch.Generator().manual_seed(5), output_type="np", callback_on_step_end=keep,
    )  # fmt: skip
    ref = (seen["latents"], (out.images * 255).round().astype(np.uint8))
    mine = {}
    images = Pipeline(models[1]).inpaint(
        image, mask, PROMPT, NEGATIVE, strength=strength, steps=5, sampler=sampler, seed=5, num_images=2,
        mask_blur=0, composite=False, callback=lambda step: mine.update(latents=step.latents.clone()),
    )  # fmt: skip
    compare((mine["latents"], np.stack([np.asarray(i) for i in images])), ref,
            f"{channels}-channel inpaint {sampler} strength {strength}")  # fmt: skip


def test_composite_keeps_the_input_outside_the_mask(models) -> None:
    image, mask = picture(), rectangle()
    pipe = Pipeline(models[1])
    sharp = pipe.inpaint(image, mask, PROMPT, strength=0.8, steps=3, seed=1, mask_blur=0)[0]
    inside = np.asarray(mask) > 0
    got, original = np.asarray(sharp), np.asarray(image)
    assert (got[~inside] == original[~inside]).all()
    assert (got[inside] != original[inside]).any()
    # a blurred mask blends: the overlay is the blurred mask doubled (A1111's "whole picture")
    blurred = pipe.inpaint(image, mask, PROMPT, strength=0.8, steps=3, seed=1, mask_blur=4)[0]
    soft = np.clip(np.asarray(blur_mask(mask, 4, 4), dtype=np.float32) * 2, 0, 255)
    far = soft == 0
    assert (np.asarray(blurred)[far] == original[far]).all()
    ring = (soft > 0) & ~inside
    assert ring.any() and (np.asarray(blurred)[ring] != original[ring]).any()
    assert "Mask blur: 4" in blurred.info["parameters"]


def test_only_masked_works_on_the_crop_and_pastes_back(models, caplog) -> None:
    big = picture(160, 120)
    mask = rectangle(160, 120, (100, 30, 130, 60))
    only = dict(inpaint_full_res=True, width=64, height=64)
    out = Pipeline(models[1]).inpaint(big, mask, PROMPT, strength=0.7, steps=2, seed=3, mask_blur=0,
                                      inpaint_full_res_padding=8, **only)[0]  # fmt: skip
    assert out.size == big.size
    inside = np.asarray(mask) > 0
    assert (np.asarray(out)[~inside] == np.asarray(big)[~inside]).all()
    assert "Inpaint area: Only masked" in out.info["parameters"]
    assert "Masked area padding: 8" in out.info["parameters"]
    with caplog.at_level(logging.WARNING, logger="sd"):  # an empty mask: plain img2img, as A1111
        blank = Image.new("L", big.size)
        plain = Pipeline(models[1]).inpaint(big, blank, PROMPT, strength=0.5, steps=2, seed=3, **only)[0]
    assert "blank" in caplog.text and plain.size == (64, 64)


@pytest.mark.parametrize("fill", ["fill", "original", "latent noise", "latent nothing"])
def test_a1111_way_and_fills(models, fill: str) -> None:
    image, mask = picture(), rectangle()
    sampler = "Euler a" if fill != "fill" else "dpmpp_2m"  # ours read as A1111's DPM++ 2M
    out = Pipeline(models[1]).inpaint(image, mask, PROMPT, strength=0.75, steps=3, seed=2, sampler=sampler,
                                      a1111=True, inpainting_fill=fill)[0]  # fmt: skip
    text = out.info["parameters"]
    assert ("Masked content" in text) == (fill != "original")
    params = GenerationParams.from_text(text)
    assert params.inpaint.inpainting_fill == ["fill", "original", "latent noise", "latent nothing"].index(
        fill
    )
    assert not params.unhonoured
    again = Pipeline(models[1]).run(params, image, mask=mask)[0]
    assert np.array_equal(np.asarray(again), np.asarray(out))


def test_a1111_blend_is_the_x0_formula(models) -> None:
    """A1111 blends the clean-image prediction: with the U-Net predicting zero noise, denoised = x, so an
    Euler run keeps the init latents exactly where the mask is 0 (the noisy blend would not be exact)."""
    from sd.inpaint_sampling import InpaintJob

    job = InpaintJob(InpaintSettings(), None, nine=False)
    job.nmask = torch.tensor([[[[1.0, 0.0]]]])
    job.clean = torch.tensor([[[[5.0, 7.0]]]])
    assert torch.equal(job.blend(torch.tensor([[[[1.0, 2.0]]]])), torch.tensor([[[[1.0, 7.0]]]]))


def test_outpaint(models) -> None:
    image = picture(48, 60)
    pipe = Pipeline(models[1])
    out = pipe.outpaint(image, PROMPT, left=16, right=8, top=0, bottom=5, steps=2, seed=4)
    assert out[0].size == (48 + 24, 60 + 5)  # made at 72x72 (a multiple of 8), cropped back
    # the image itself, less the seam A1111 blends (twice the mask blur, plus the blur's reach), is kept
    kept = np.asarray(out[0])[0:40, 36:44]
    assert np.array_equal(kept, np.asarray(image)[0:40, 20:28])


def test_masks_from_files_alpha_arrays(tmp_path, caplog) -> None:
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.paste((255, 255, 255, 255), (2, 2, 6, 6))
    assert np.array_equal(np.asarray(load_mask(rgba)) > 0, np.asarray(rectangle(8, 8, (2, 2, 6, 6))) > 0)
    array = np.zeros((8, 8), dtype=bool)
    array[1:3, 1:3] = True
    assert load_mask(array).getbbox() == (1, 1, 3, 3)
    assert load_mask(array.astype(np.float32)).getbbox() == (1, 1, 3, 3)
    path = tmp_path / "m.png"
    rectangle(8, 8, (0, 0, 4, 4)).convert("RGB").save(path)
    assert load_mask(path).mode == "L" and load_mask(path).getbbox() == (0, 0, 4, 4)
    with pytest.raises(ValueError, match="not found"):
        load_mask(tmp_path / "none.png")


def test_bad_input(models, caplog) -> None:
    pipe = Pipeline(models[1])
    image = picture()
    with caplog.at_level(logging.WARNING, logger="sd"):  # a mask of another size is resized
        pipe.inpaint(image, rectangle(32, 32, (8, 8, 20, 20)), PROMPT, strength=0.5, steps=2, seed=1)
    assert "resized" in caplog.text
    with pytest.raises(ValueError, match="needs a mask"):
        pipe.inpaint(image, None, PROMPT)
    with pytest.raises(ValueError, match="multiple of 8"):
        pipe.inpaint(image, rectangle(), PROMPT, width=70, height=64)
    with pytest.raises(ValueError, match="inpainting_fill"):
        pipe.inpaint(image, rectangle(), PROMPT, inpainting_fill=7)
    with pytest.raises(ValueError, match="outpainting"):
        pipe.outpaint(image, PROMPT)


def test_inpainting_model_without_a_mask(models) -> None:
    """A1111 uses the inpainting model for txt2img / img2img with a mask of ones (a grey image)."""
    if models[0] != 9:
        pytest.skip("the 9-channel model only")
    pipe = Pipeline(models[1])
    assert pipe.txt2img(PROMPT, width=SIZE, height=SIZE, steps=2, seed=1)[0].size == (SIZE, SIZE)
    assert pipe.img2img(picture(), PROMPT, strength=0.5, steps=2, seed=1)[0].size == (SIZE, SIZE)


def test_loading_and_sd_info(models, tmp_path) -> None:
    from sd.weights import describe

    if models[0] != 9:
        pytest.skip("the 9-channel model only")
    info = describe(models[5])
    assert info.usable and info.family == "SD1.x inpainting", info.reason
    assert models[1]["diffusion"].input_blocks[0][0].weight.shape[1] == 9


def test_blur_and_crop_formulas() -> None:
    kernel = gaussian_kernel(4)
    assert len(kernel) == 2 * int(2.5 * 4 + 0.5) + 1 and abs(kernel.sum() - 1) < 1e-12
    mask = rectangle(40, 40, (10, 10, 20, 30))
    assert crop_region(mask, 4) == (6, 6, 24, 34)
    assert crop_region(Image.new("L", (8, 8)), 4) is None
    assert expand_crop_region((6, 6, 24, 34), 64, 64, 40, 40) == (1, 6, 29, 34)


def test_inpainting_diffusers_folder_and_sd15_file_without_metadata(models, tmp_path) -> None:
    """A diffusers folder of the inpainting model loads; an original-layout file without our metadata is
    read as SD1.5 inpainting from its 9-channel input conv."""
    import json
    from types import SimpleNamespace

    from sd.config import SD15_INPAINTING
    from sd.testing import ldm_state_dict
    from sd.weights import _default_config, _identify, describe, load_models

    if models[0] != 9:
        pytest.skip("the 9-channel model only")
    folder = tmp_path / "pipeline"
    models[2].save_pretrained(folder / "unet")
    models[3].save_pretrained(folder / "vae")
    models[4].save_pretrained(folder / "text_encoder")
    index = {"_class_name": "StableDiffusionInpaintPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    loaded = load_models(folder)
    for name, model in models[1].items():
        for key, value in model.state_dict().items():
            assert torch.equal(value, loaded[name].state_dict()[key]), f"{name}.{key}"
    assert describe(folder).family == "SD1.x inpainting"
    from sd.models import build_models

    # the file's keys and shapes, without writing 1 GB: what describe / load_models judge a file by
    shapes = {
        k: tuple(v.shape) for k, v in ldm_state_dict(build_models(SD15_INPAINTING, device="meta")).items()
    }
    assert _identify(shapes).name == "SD1.x inpainting" and _identify(shapes).problem is None
    entries = {k: SimpleNamespace(shape=v) for k, v in shapes.items()}
    assert _default_config(SimpleNamespace(entries=entries)) == SD15_INPAINTING


def test_cli_inpaint_outpaint_and_replay(tmp_path, monkeypatch, capsys) -> None:
    """sd generate --mask / --only-masked / --outpaint end to end with the built-in shapes model, and the
    PNG's settings read back (the mask is in no PNG: --from-png needs --mask again)."""
    from sd.checkpoints import BUILTIN_MODEL
    from sd.cli import main
    from sd.images import read_png_parameters

    if not BUILTIN_MODEL.is_file():
        pytest.skip("no built-in model")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SD_CHECKPOINT", raising=False)
    monkeypatch.setenv("SD_HOME", str(tmp_path / "home"))
    picture().save(tmp_path / "in.png")
    rectangle().save(tmp_path / "mask.png")
    common = ["--init-image", "in.png", "--steps", "3", "--seed", "7"]
    flags = ["--mask", "mask.png", "--mask-blur", "2", "--inpaint-fill", "latent nothing", "--invert-mask"]
    assert main(["generate", "a blue circle", *common, *flags, "-o", "a.png"]) == 0
    text = read_png_parameters(tmp_path / "a.png")
    for key in ("Mask blur: 2", "Masked content: latent nothing", "Mask mode: Inpaint not masked",
                "Denoising strength: 0.75"):  # fmt: skip
        assert key in text, text
    assert main(["generate", "--from-png", "a.png", "--init-image", "in.png", "--mask", "mask.png",
                 "-o", "b.png"]) == 0  # fmt: skip
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png"))
    )
    only = [
        "--mask",
        "mask.png",
        "--only-masked",
        "--only-masked-padding",
        "8",
        "--width",
        "64",
        "--height",
        "64",
    ]
    assert main(["generate", "a red square", *common, *only, "-o", "c.png"]) == 0
    assert "Inpaint area: Only masked, Masked area padding: 8" in read_png_parameters(tmp_path / "c.png")
    assert main(["generate", "a red square", *common, "--outpaint", "left=16,bottom=8", "-o", "d.png"]) == 0
    assert Image.open(tmp_path / "d.png").size == (SIZE + 16, SIZE + 8)
    capsys.readouterr()
    assert main(["generate", "x", "--mask", "mask.png"]) != 0
    assert "--mask and --outpaint need --init-image" in capsys.readouterr().err


@pytest.mark.parametrize("a1111", [False, True], ids=["diffusers", "a1111"])
def test_final_latents_keep_the_init_latents_outside_the_latent_mask(models, a1111: bool) -> None:
    """Both blends end on the clean init latents where the latent mask is 0 (diffusers: after its last step;
    A1111: `samples * nmask + init_latent * mask` after sampling), bit for bit; the latent mask is A1111's
    (PIL resize of the mask, rounded) or diffusers' (binarised, nearest)."""
    if models[0] != 4:
        pytest.skip("the blends are the 4-channel model's")
    pipe = Pipeline(models[1])
    seen = {}
    decode = pipe.decode
    pipe.decode = lambda latents, truncate=False: decode(seen.setdefault("latents", latents), truncate)
    image, mask = picture(), rectangle()
    sampler = "Euler a" if a1111 else "euler_a"
    pipe.inpaint(
        image, mask, PROMPT, strength=0.7, steps=3, seed=8, sampler=sampler, mask_blur=0, a1111=a1111
    )
    clean = pipe.encode_image(image, None)
    if a1111:
        small = np.asarray(mask.convert("RGB").resize((8, 8)), dtype=np.float32)[..., 0] / 255
        known = torch.from_numpy(np.around(small) == 0)
    else:
        known = torch.nn.functional.interpolate(torch.from_numpy(np.asarray(mask) >= 128).float()[None, None],
                                                size=(8, 8))[0, 0] == 0  # fmt: skip
        # diffusers' init latents: a VAE sample, the generator's first draw
        clean = pipe.encode_image(image, torch.Generator().manual_seed(8))
    assert known.any() and (~known).any()
    assert torch.equal(seen["latents"][:, :, known], clean[:, :, known])


@pytest.mark.parametrize("sampler", ["DDIM", "PLMS", "UniPC"])
def test_a1111_timestep_samplers_blend_the_unet_input(models, sampler: str) -> None:
    """A1111 v1.10.1's DDIM, PLMS and UniPC inpaint through CFGDenoiserTimesteps (mask_before_denoising):
    the U-Net is given the noisy latents with the *clean* init latents put in where the mask keeps them,
    the sampler steps on from its own latents, and the final latents are blended once more. Reference:
    the same sampler's plain img2img run (fill "original": the same init latents and noise) over a U-Net
    that makes that blend itself, blended at the end. Equal bit for bit: the same operations."""
    if models[0] != 4:
        pytest.skip("a 9-channel model's plain img2img takes another conditioning")
    pipe = Pipeline(models[1])
    image, mask = picture(), rectangle()
    clean = pipe.encode_image(image, None)
    small = np.asarray(mask.convert("RGB").resize((8, 8)), dtype=np.float32)[..., 0] / 255
    nmask = torch.from_numpy(np.around(small))  # A1111's latent mask, 1 = repaint

    def run(method, *args, blend_in_unet: bool = False, **kw):
        seen = {"inputs": []}

        def pre_hook(module, args):
            x = args[0]
            if blend_in_unet:
                x = x * nmask + clean * (1 - nmask)
            seen["inputs"].append(x.clone())
            return (x, *args[1:])

        decode = pipe.decode
        pipe.decode = lambda latents, truncate=False: decode(seen.setdefault("latents", latents), truncate)
        handle = pipe.models["diffusion"].register_forward_pre_hook(pre_hook)
        try:
            method(image, *args, PROMPT, NEGATIVE, strength=0.7, steps=8, seed=8, **kw)
        finally:
            handle.remove()
            pipe.decode = decode
        return seen

    masked = run(pipe.inpaint, mask, sampler=sampler, mask_blur=0, a1111=True)
    known = nmask == 0
    assert known.any() and (~known).any()
    for x in masked["inputs"]:  # every U-Net input holds the clean init latents where the mask keeps them
        assert torch.equal(x[:, :, known], clean.expand(x.shape[0], -1, -1, -1)[:, :, known])

    params = GenerationParams(PROMPT, NEGATIVE, 8, sampler, False, 7.5, 8, None, None, 0.7, a1111=True)
    reference = run(lambda im, p, n, **kw: pipe.run(params, im), blend_in_unet=True)
    assert len(reference["inputs"]) == len(masked["inputs"]) > 1
    for ours, ref in zip(masked["inputs"], reference["inputs"], strict=True):
        assert torch.equal(ours, ref)
    expected = reference["latents"] * nmask + clean * (1 - nmask)
    assert torch.equal(masked["latents"], expected)


def test_only_masked_on_a_large_photo_works_on_the_crop(models) -> None:
    """A 2048x2048 photo inpainted "only masked" at 64x64: the models see the crop's latents only."""
    if models[0] != 4:
        pytest.skip("one model is enough")
    photo = picture(2048, 2048)
    mask = rectangle(2048, 2048, (1500, 200, 1600, 330))
    shapes = []
    keep = lambda step: shapes.append(step.latents.shape)  # noqa: E731
    only = dict(inpaint_full_res=True, width=64, height=64, mask_blur=0)
    out = Pipeline(models[1]).inpaint(
        photo, mask, PROMPT, strength=0.6, steps=2, seed=1, callback=keep, **only
    )
    assert out[0].size == (2048, 2048) and set(shapes) == {torch.Size([1, 4, 8, 8])}
    inside = np.asarray(mask) > 0
    assert (np.asarray(out[0])[~inside] == np.asarray(photo)[~inside]).all()
