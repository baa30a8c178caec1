"""ControlNet against diffusers: ControlNetModel built from the reference U-Net (random tiny weights, its
zero convs and hint output given random values so nothing is trivially zero), exported in the original
layout with a name map derived from diffusers' own converter, read by our loader from both layouts;
then the 13 residuals, and StableDiffusionControlNetPipeline against ours.

Tolerances: residuals and final latents within 1e-4 of their scale (fp32, the same operations), uint8
images at most 1 level apart (rounding ties).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sd.controlnet import ControlNetFileError, ControlUnit, load_controlnet
from sd.controlnet.model import ControlNet, ControlNetConfig
from sd.keymap import CONTROLNET_PREFIX, controlnet_key_map
from sd.pipeline import Pipeline

from conftest import World
from reference import reference_tokenizer
from test_samplers import make_scheduler

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]
SIZE = 64
PROMPT, NEGATIVE = "a stone bridge over a river", "blurry"


def hint_image() -> Image.Image:
    """An edge-map-like hint: white lines on black."""
    pixels = np.zeros((SIZE, SIZE, 3), np.uint8)
    pixels[10:12, :] = pixels[:, 40:42] = pixels[30:50, 20:22] = 255
    return Image.fromarray(pixels)


def derived_map(config) -> dict[str, str]:
    """original key -> diffusers key, from diffusers' single-file converter run on unique values."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    with torch.device("meta"):
        keys = list(ControlNet(ControlNetConfig(config)).state_dict())
    marked = {CONTROLNET_PREFIX + k: torch.tensor([float(i)]) for i, k in enumerate(keys)}
    converted = convert_controlnet_checkpoint(marked, {"layers_per_block": config.num_res_blocks})
    by_value = {float(v): k for k, v in converted.items()}
    return {CONTROLNET_PREFIX + k: by_value[float(i)] for i, k in enumerate(keys)}


@pytest.fixture(scope="module")
def reference(world: World, tmp_path_factory):
    """(diffusers ControlNetModel, its original-layout file, its diffusers folder)."""
    if world.name != "tiny":
        pytest.skip("the tiny model proves the wiring; the SD1.5 key set is checked on its own")
    from diffusers import ControlNetModel

    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(world.unet, conditioning_embedding_out_channels=(16, 32, 96, 256))
    with torch.no_grad():
        for name, param in controlnet.named_parameters():
            if name.startswith(
                ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding")
            ):
                param.copy_(torch.randn_like(param) * 0.2)
    controlnet.eval()
    folder = tmp_path_factory.mktemp("controlnet")
    to_diffusers = derived_map(world.config.unet)
    state = controlnet.state_dict()
    save_file({k: state[d].contiguous() for k, d in to_diffusers.items()}, str(folder / "cn.safetensors"))
    controlnet.save_pretrained(folder / "diffusers", safe_serialization=True)
    return controlnet, folder / "cn.safetensors", folder / "diffusers"


def test_the_key_map_is_diffusers_converter_inverted() -> None:
    from sd.config import SD15, TINY

    for config in (TINY.unet, SD15.unet):
        ours = controlnet_key_map(config)
        assert {ldm: d for d, ldm in ours.items()} == derived_map(config)
    assert len(controlnet_key_map(SD15.unet)) == 340  # the v1.1 files' tensors


@pytest.mark.parametrize("layout", ["original", "diffusers folder"])
def test_residuals_equal_diffusers(world: World, reference, layout: str) -> None:
    controlnet, file, folder = reference
    ours = load_controlnet(file if layout == "original" else folder, world.config.unet)
    x, context = torch.randn(2, 4, SIZE // 8, SIZE // 8), torch.randn(2, 77, world.config.unet.context_dim)
    hint, t = torch.rand(2, 3, SIZE, SIZE), torch.tensor([500, 500])
    with torch.no_grad():
        down, mid = controlnet(x, t, context, hint, conditioning_scale=1.0, return_dict=False)
        mine = ours(x, hint, context, t)
    for got, want in zip(mine, [*down, mid], strict=True):
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    # and the U-Net adds them as diffusers' does
    with torch.no_grad():
        want = world.unet(x, t, context, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid).sample  # fmt: skip
        got = world.ours["diffusion"](x, context, t, mine)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize(
    ("sampler", "scale", "start", "end"), [("euler", 0.8, 0.2, 0.8), ("dpmpp_2m", 1.0, 0, 1)]
)
def test_pipeline_equals_diffusers(world: World, reference, sampler, scale, start, end) -> None:
    from diffusers import StableDiffusionControlNetPipeline

    controlnet, file, _ = reference
    pipe = StableDiffusionControlNetPipeline(
        vae=world.vae, text_encoder=world.text_encoder, tokenizer=reference_tokenizer(), unet=world.unet,
        controlnet=controlnet, scheduler=make_scheduler(sampler), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    seen = {}

    def keep(pipe, step, timestep, kwargs):
        seen["latents"] = kwargs["latents"]
        return kwargs

    out = pipe(
        PROMPT, image=hint_image(), negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=5,
        guidance_scale=7.5, num_images_per_prompt=2, generator=torch.Generator().manual_seed(3),
        controlnet_conditioning_scale=scale, control_guidance_start=start, control_guidance_end=end,
        output_type="np", callback_on_step_end=keep,
    )  # fmt: skip
    ours = Pipeline(world.ours)
    unit = ControlUnit(load_controlnet(file, world.config.unet), hint_image(), scale, start, end)
    mine = {}
    images = ours.txt2img(PROMPT, NEGATIVE, SIZE, SIZE, steps=5, sampler=sampler, seed=3, num_images=2,
                          callback=lambda step: mine.update(latents=step.latents.clone()),
                          control=[unit])  # fmt: skip
    diff = (mine["latents"] - seen["latents"]).abs().max()
    levels = np.abs(np.stack([np.asarray(i) for i in images]).astype(int) - (out.images * 255).round()).max()
    print(
        f"ControlNet {sampler} scale {scale} {start}-{end}: latents max abs diff {diff:.3g}, {levels} levels"
    )
    assert diff <= 1e-4 * seen["latents"].abs().max() and levels <= 1
    plain = ours.txt2img(PROMPT, NEGATIVE, SIZE, SIZE, steps=5, sampler=sampler, seed=3)[0]
    assert np.abs(np.asarray(plain).astype(int) - np.asarray(images[0]).astype(int)).max() > 0


def test_bad_files_and_settings(world: World, reference, tmp_path) -> None:
    _, file, _ = reference
    unet = world.config.unet
    save_file({"lora_unet_down.lora_up.weight": torch.zeros(2, 2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ControlNetFileError, match=r"not a ControlNet file \(a LoRA"):
        load_controlnet(tmp_path / "lora.safetensors", unet)
    with pytest.raises(ControlNetFileError, match="ControlNet not found"):
        load_controlnet(tmp_path / "none.safetensors", unet)
    from sd.config import SD15

    with pytest.raises(ControlNetFileError, match="a ControlNet for another base model"):
        load_controlnet(file, SD15.unet)
    unit = ControlUnit(load_controlnet(file, unet), hint_image(), start=0.5, end=0.5)
    with pytest.raises(ValueError, match="0 <= start < end <= 1"):
        Pipeline(world.ours).txt2img("x", steps=1, control=[unit])
    from sd.params import GenerationParams

    unit = ControlUnit(unit.model, hint_image(), mode="My prompt is more important")
    with pytest.raises(ValueError, match="control and resize modes are A1111's"):
        Pipeline(world.ours).txt2img("x", steps=1, control=[unit])
    with pytest.raises(ValueError, match="guidance start/end with DPM adaptive is not supported yet"):
        Pipeline(world.ours).run(
            GenerationParams("x", steps=1, sampler="DPM adaptive", a1111=True, width=64, height=64),
            control=[ControlUnit(unit.model, hint_image(), end=0.5)],
        )


A1111_CASES = [
    ("Euler a", "Balanced", 0.0, 1.0),
    ("DPM++ 2M", "My prompt is more important", 0.2, 0.7),
    ("Heun", "ControlNet is more important", 0.0, 0.5),
]


@pytest.mark.parametrize(("sampler", "mode", "start", "end"), A1111_CASES)
def test_a1111_way_equals_the_reference_composition(
    world: World, reference, monkeypatch, sampler, mode, start, end
) -> None:
    """A1111's way with its ControlNet extension's rules against test_a1111's k-diffusion composition with
    the extension's rules written out there over diffusers' ControlNetModel (its progress from the real
    k-diffusion step callback)."""
    from test_a1111 import assert_same, reference_run

    from sd.params import GenerationParams

    controlnet, file, _ = reference
    hint = torch.from_numpy(np.asarray(hint_image(), np.float32) / 255).permute(2, 0, 1)[None]
    unit = ControlUnit(load_controlnet(file, world.config.unet), hint_image(), 0.9, start, end, mode)
    ours = Pipeline(world.ours)
    params = GenerationParams(
        "a watercolor painting of a lighthouse at dusk", "blurry, low quality", steps=4, sampler=sampler,
        cfg_scale=7.0, seed=21, width=SIZE, height=SIZE, a1111=True,
    )  # fmt: skip
    seen = []
    images = ours.run(params, num_images=2, callback=seen.append, control=[unit])
    latents, pixels = seen[-1].latents, np.stack([np.asarray(i) for i in images])
    ref = reference_run(
        world, sampler, 4, [21, 22], 7.0, monkeypatch, control=(controlnet, hint, 0.9, mode, start, end)
    )
    assert_same((latents, pixels), ref, f"ControlNet {sampler} {mode} {start}-{end}")
    plain = reference_run(world, sampler, 4, [21, 22], 7.0, monkeypatch)
    assert (latents - plain[0]).abs().max() > 1e-3, "the ControlNet changed nothing"


def test_cli_controlnet(tmp_path, monkeypatch, capsys) -> None:
    """`sd generate --controlnet FILE --control-image IMG` (an fp16 original-layout file, as ComfyUI's
    copies) makes what the Python API makes; bad flags are one line."""
    from sd.cli import main
    from sd.config import TINY
    from sd.testing import random_models
    from sd.weights import load_models, save_checkpoint

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SD_HOME", str(tmp_path / "home"))
    save_checkpoint(random_models(TINY, seed=5), tmp_path / "tiny.safetensors", config=TINY)
    torch.manual_seed(1)
    controlnet = ControlNet(ControlNetConfig(TINY.unet))
    save_file({CONTROLNET_PREFIX + k: v.half() for k, v in controlnet.state_dict().items()},
              str(tmp_path / "cn.safetensors"))  # fmt: skip
    hint_image().save(tmp_path / "hint.png")
    flags = ["--ckpt", "tiny.safetensors", "--steps", "3", "--seed", "4", "--way", "diffusers"]
    code = main(["generate", "a bridge", *flags, "--controlnet", "cn.safetensors", "--control-image",
                 "hint.png", "--control-scale", "0.7", "-o", "out.png"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    pipe = Pipeline(load_models(tmp_path / "tiny.safetensors"))
    unit = ControlUnit(load_controlnet(tmp_path / "cn.safetensors", TINY.unet), hint_image(), 0.7)
    expected = pipe.txt2img("a bridge", steps=3, seed=4, cfg_scale=7.5, control=[unit])[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), np.asarray(expected))
    for argv, message in [
        (["--controlnet", "cn.safetensors"], "give one --control-image per --controlnet"),
        (["--controlnet", "none.pth", "--control-image", "hint.png"], "ControlNet not found: none.pth"),
        (["--controlnet", "tiny.safetensors", "--control-image", "hint.png"], "not a ControlNet file"),
        (
            ["--controlnet", "cn.safetensors", "--control-image", "hint.png", "--control-end", "2"],
            "--control-end",
        ),
    ]:
        capsys.readouterr()
        assert main(["generate", "x", *flags, *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.strip().splitlines()[-1].startswith("sd generate: error:"), err


def test_every_edit_takes_control_and_v1_files_load(world: World, reference, tmp_path) -> None:
    """A v1.0 file (control_model.* beside a whole SD model) loads its ControlNet; the hires fix's second
    pass and inpainting take the hint at their own sizes."""
    from safetensors.torch import load_file

    _, file, _ = reference
    state = load_file(str(file))
    state["model.diffusion_model.out.2.weight"] = torch.zeros(4, 32, 3, 3)
    save_file(state, str(tmp_path / "control_sd15_v10.safetensors"))
    unit = ControlUnit(
        load_controlnet(tmp_path / "control_sd15_v10.safetensors", world.config.unet), hint_image()
    )
    pipe = Pipeline(world.ours)
    hires = {
        "enable_hr": True,
        "hr_scale": 1.5,
        "hr_second_pass_steps": 2,
        "denoising_strength": 0.6,
        "width": SIZE,
        "height": SIZE,
    }
    with_hint = pipe.txt2img("a bridge", steps=2, seed=1, control=[unit], **hires)[0]
    assert with_hint.size == (96, 96)
    assert not np.array_equal(
        np.asarray(with_hint), np.asarray(pipe.txt2img("a bridge", steps=2, seed=1, **hires)[0])
    )
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 16, 48, 48))
    inpainted = pipe.inpaint(hint_image(), mask, "a bridge", steps=2, seed=1, control=[unit])[0]
    assert inpainted.size == (SIZE, SIZE)


def test_server_runs_a1111_controlnet_units(tmp_path) -> None:
    """alwayson_scripts' ControlNet units as A1111 clients send them: the model by "stem [hash]" from
    models/ControlNet, the image as base64; the answer is the Python API's image, then the hint as used,
    and the infotext has the extension's "ControlNet 0"; bad units are one line."""
    import base64
    import io
    import json
    import threading
    import urllib.error
    import urllib.request

    from sd.config import TINY
    from sd.controlnet import legacy_hash
    from sd.params import GenerationParams
    from sd.server import Service, make_server
    from sd.testing import random_models

    folder = tmp_path / "models" / "ControlNet"
    folder.mkdir(parents=True)
    torch.manual_seed(2)
    state = ControlNet(ControlNetConfig(TINY.unet)).state_dict()
    save_file(
        {CONTROLNET_PREFIX + k: v for k, v in state.items()},
        str(folder / "control_v11p_sd15_canny.safetensors"),
    )
    name = f"control_v11p_sd15_canny [{legacy_hash(folder / 'control_v11p_sd15_canny.safetensors')}]"
    pipe = Pipeline(random_models(TINY), model_name="tiny", model_hash="0123456789")
    server = make_server(Service(pipe, models_dir=tmp_path / "models"), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"

    def call(path, body=None):
        data = None if body is None else json.dumps(body).encode()
        try:
            with urllib.request.urlopen(urllib.request.Request(url + path, data=data), timeout=60) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    buffer = io.BytesIO()
    hint_image().save(buffer, "PNG")
    unit = {"enabled": True, "image": base64.b64encode(buffer.getvalue()).decode(), "module": "none",
            "model": name, "weight": 0.8, "guidance_end": 0.7, "control_mode": "My prompt is more important",
            "pixel_perfect": False, "processor_res": -1, "threshold_a": -1, "threshold_b": -1}  # fmt: skip
    request = {
        "prompt": "a bridge",
        "seed": 3,
        "steps": 4,
        "sampler_name": "Euler a",
        "width": SIZE,
        "height": SIZE,
        "alwayson_scripts": {"ControlNet": {"args": [unit, {"enabled": False}]}},
    }
    try:
        assert call("/controlnet/model_list") == (200, {"model_list": [name]})
        status, answer = call("/sdapi/v1/txt2img", request)
        assert status == 200, answer
        images = [Image.open(io.BytesIO(base64.b64decode(d))) for d in answer["images"]]
        model = load_controlnet(folder / "control_v11p_sd15_canny.safetensors", TINY.unet)
        control = ControlUnit(model, hint_image(), 0.8, 0.0, 0.7, "My prompt is more important")
        params = GenerationParams("a bridge", steps=4, sampler="Euler a", cfg_scale=7.0, seed=3, width=SIZE,
                                  height=SIZE, a1111=True)  # fmt: skip
        expected = pipe.run(params, control=[control])[0]
        assert len(images) == 2 and np.array_equal(np.asarray(images[0].convert("RGB")), np.asarray(expected))
        assert np.array_equal(np.asarray(images[1].convert("RGB")), np.asarray(hint_image()))  # the map
        text = images[0].info["parameters"]
        assert (f'ControlNet 0: "Module: none, Model: {name}, Weight: 0.8, Resize Mode: Crop and Resize, '
                "Processor Res: 512, Threshold A: 0.5, Threshold B: 0.5, Guidance Start: 0.0, "
                "Guidance End: 0.7, Pixel Perfect: False, "
                'Control Mode: My prompt is more important"') in text  # fmt: skip
        assert text == expected.info["parameters"]
        for change, message in [
            ({"model": "control_v11p_sd15_canny [00000000]"}, "not found"),
            ({"module": "canny"}, "preprocessor 'canny' is not available here"),
            ({"weight": 3}, "weight must be a number in [0, 2]"),
            ({"control_mode": "Loud"}, "control_mode 'Loud'"),
            ({"image": None}, "has no image (and this is txt2img)"),
        ]:
            bad = {**request, "alwayson_scripts": {"controlnet": {"args": [{**unit, **change}]}}}
            status, answer = call("/sdapi/v1/txt2img", bad)
            assert status == 400 and message in answer["detail"], (change, answer)
        status, answer = call(
            "/sdapi/v1/txt2img", {**request, "alwayson_scripts": {"ADetailer": {"args": [{}]}}}
        )
        assert status == 400 and "'ADetailer' is not available here" in answer["detail"]
    finally:
        server.shutdown()
        server.server_close()
