"""`sd serve`: the A1111-style HTTP API gives what the Python API gives and refuses bad requests in a line."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from sd import TINY
from sd.cli import main
from sd.images import save_png
from sd.params import GenerationParams
from sd.pipeline import Pipeline
from sd.server import MAX_IMAGES, Service, make_server
from sd.testing import random_models

SIZE = dict(width=64, height=64)


@pytest.fixture(scope="module")
def served():
    pipe = Pipeline(random_models(TINY), model_name="tiny", model_hash="0123456789")
    server = make_server(Service(pipe), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", pipe
    server.shutdown()
    server.server_close()


def call(url: str, path: str, body: object | None = None) -> tuple[int, object]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(urllib.request.Request(url + path, data=data), timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def images_of(answer: dict) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(data))) for data in answer["images"]]


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b))


def a1111(pipe: Pipeline, prompt: str, negative: str = "", image=None, num_images: int = 1, **fields):
    """What the Python API makes A1111's way (the server's default) with A1111's API defaults (Euler, 50
    steps: its sampler_index default and StableDiffusionProcessing's)."""
    fields = {"sampler": "Euler", "cfg_scale": 7.0, "steps": 50, **SIZE, **fields}
    return pipe.run(GenerationParams(prompt, negative, a1111=True, **fields), image, num_images)


def test_txt2img_gives_what_the_python_api_gives(served):
    url, pipe = served
    request = {"prompt": "a red cat", "negative_prompt": "blur", "seed": 7, "steps": 4, "cfg_scale": 5,
               "sampler_name": "Euler a", "batch_size": 2, "send_images": True, **SIZE}  # fmt: skip
    status, answer = call(url, "/sdapi/v1/txt2img", request)
    assert status == 200, answer
    expected = a1111(pipe, "a red cat", "blur", steps=4, cfg_scale=5, sampler="Euler a", seed=7, num_images=2)
    got = images_of(answer)
    assert len(got) == 2 and all(same_pixels(g, e) for g, e in zip(got, expected, strict=True))
    assert not same_pixels(got[0], expected[1])  # the two images of the batch differ
    # Each PNG carries its parameters, as a saved file would (sd generate --from-png reads them).
    assert [g.info["parameters"] for g in got] == [e.info["parameters"] for e in expected]
    info = json.loads(answer["info"])
    # A1111's way: each image is its own seed
    assert info["all_seeds"] == [7, 8] and info["seed"] == 7 and info["sd_model_hash"] == "0123456789"
    assert info["ignored_fields"] == ["send_images"]


names_diffusers = {"sampler_name": "DPM++ 2M", "scheduler": "Karras"}


def test_a1111_sampler_and_scheduler_names(served):
    url, pipe = served
    base = {"prompt": "a boat", "seed": 3, "steps": 5, **SIZE}
    karras = [call(url, "/sdapi/v1/txt2img", {**base, **names})[1] for names in (
        {"sampler_name": "DPM++ 2M", "scheduler": "Karras"},
        {"sampler_name": "DPM++ 2M Karras"},  # older clients fold the schedule into the name
        {"sampler_name": "dpmpp_2m", "scheduler": "karras"},
    )]  # fmt: skip
    expected = a1111(pipe, "a boat", steps=5, seed=3, sampler="DPM++ 2M", schedule="Karras")
    automatic = call(url, "/sdapi/v1/txt2img", {**base, "sampler_name": "DPM++ 2M"})[1]  # its own: Karras
    for answer in [*karras, automatic]:
        assert same_pixels(images_of(answer)[0], expected[0])
    for scheduler in ("Uniform", "exponential", "SGM Uniform", "Align Your Steps"):
        request = {**base, "sampler_name": "DPM++ 2M", "scheduler": scheduler}
        status, answer = call(url, "/sdapi/v1/txt2img", request)
        assert status == 200, answer
        assert not same_pixels(images_of(answer)[0], expected[0])
    # diffusers' way, when a request asks
    # eta as A1111 clients send it: it means nothing to DPM++ 2M (listed as ignored), as in A1111
    status, answer = call(
        url, "/sdapi/v1/txt2img", {**base, **names_diffusers, "way": "diffusers", "eta": 1.0}
    )
    assert status == 200, answer
    ours = pipe.txt2img("a boat", steps=5, cfg_scale=7.0, sampler="dpmpp_2m", karras=True, seed=3, **SIZE)
    assert same_pixels(images_of(answer)[0], ours[0]) and "Sampling: diffusers" in ours[0].info["parameters"]
    assert "eta" in json.loads(answer["info"])["ignored_fields"]


def test_clip_skip_as_a1111_clients_send_it(served):
    url, pipe = served
    request = {"prompt": "a house", "seed": 2, "steps": 3, **SIZE}
    skip2 = call(url, "/sdapi/v1/txt2img", {**request, "override_settings": {"CLIP_stop_at_last_layers": 2}})[
        1
    ]
    expected = a1111(pipe, "a house", steps=3, seed=2, clip_skip=2)[0]
    assert same_pixels(images_of(skip2)[0], expected) and "Clip skip: 2" in expected.info["parameters"]
    plain = call(url, "/sdapi/v1/txt2img", request)[1]
    assert not same_pixels(images_of(plain)[0], expected)
    assert json.loads(skip2["info"])["ignored_fields"] == []


def test_a1111_prompts_and_emphasis_options(served):
    url, pipe = served
    prompt, negative = "a (red:1.3) house BREAK [cat:dog:2] AND snow:0.5", "blurry"  # 154 tokens vs 77
    request = {"prompt": prompt, "negative_prompt": negative, "seed": 2, "steps": 3, **SIZE}
    settings = {"emphasis": "No norm", "pad_cond_uncond": True}
    status, answer = call(url, "/sdapi/v1/txt2img", {**request, "override_settings": settings})
    assert status == 200, answer
    (expected,) = a1111(pipe, prompt, negative, steps=3, seed=2, emphasis="No norm", pad_conds=True)
    assert same_pixels(images_of(answer)[0], expected)
    infotext = images_of(answer)[0].info["parameters"]
    assert "Emphasis: No norm" in infotext and "Pad conds: True" in infotext
    assert json.loads(answer["info"])["ignored_fields"] == []


def test_n_iter_numbers_the_seeds_and_a_random_seed_is_reported(served):
    url, pipe = served
    status, answer = call(
        url, "/sdapi/v1/txt2img", {"prompt": "x", "seed": 10, "n_iter": 2, "steps": 3, **SIZE}
    )
    assert status == 200 and json.loads(answer["info"])["all_seeds"] == [10, 11]
    second = a1111(pipe, "x", steps=3, seed=11)[0]
    assert same_pixels(images_of(answer)[1], second)
    _, answer = call(url, "/sdapi/v1/txt2img", {"prompt": "x", "seed": -1, "steps": 2, **SIZE})
    seed = json.loads(answer["info"])["seed"]
    assert 0 <= seed < 2**32 and f"Seed: {seed}," in images_of(answer)[0].info["parameters"]
    # `parameters` is A1111's echo of the request, every field with its default (the seed as sent)
    echo = answer["parameters"]
    assert echo["seed"] == -1 and echo["prompt"] == "x" and echo["steps"] == 2 and echo["cfg_scale"] == 7.0
    assert echo["enable_hr"] is False and echo["script_args"] == [] and "init_images" not in echo


def test_img2img_takes_a_base64_image_or_data_url(served):
    url, pipe = served
    rng = np.random.default_rng(0)
    source = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    source.save(buffer, format="PNG")
    encoded = base64.b64encode(buffer.getvalue()).decode()
    expected = a1111(pipe, "a dog", image=source, strength=0.5, steps=6, seed=5)
    for image in (encoded, "data:image/png;base64," + encoded):
        request = {
            "prompt": "a dog",
            "init_images": [image],
            "denoising_strength": 0.5,
            "steps": 6,
            "seed": 5,
        }
        status, answer = call(url, "/sdapi/v1/img2img", request)
        assert status == 200, answer
        assert same_pixels(images_of(answer)[0], expected[0])
        assert json.loads(answer["info"])["denoising_strength"] == 0.5


NOT_AN_IMAGE = base64.b64encode(b"hello").decode()
_png = io.BytesIO()
Image.new("RGB", (64, 64), "red").save(_png, format="PNG")
RED_PNG = base64.b64encode(_png.getvalue()).decode()
BAD_REQUESTS = {
    "prompt not text": ("txt2img", {"prompt": 3}, "prompt: Input should be a valid string"),
    "seed not a number": ("txt2img", {"seed": "abc"}, "seed: Input should be a valid integer"),
    "seed a fraction": ("txt2img", {"seed": 1.5}, "seed: Input should be a valid integer"),
    "CFG not a number": ("txt2img", {"cfg_scale": "high"}, "cfg_scale: Input should be a valid number"),
    "CFG NaN": ("txt2img", b'{"cfg_scale": NaN}', "cfg_scale: Input should be a finite number"),
    "steps infinite": ("txt2img", b'{"steps": Infinity}', "steps:"),
    "huge size": ("txt2img", {"width": 100000, "height": 100000}, "width must be a multiple of 8 between"),
    "huge batch": ("txt2img", {"batch_size": 10**9}, f"at most {MAX_IMAGES} images"),
    "huge steps": ("txt2img", {"steps": 10**9}, "steps must be at most"),
    "1 MB prompt": ("txt2img", {"prompt": "a" * 2**20}, "prompt is 1048576 characters"),
    "override_settings not an object": ("txt2img", {"override_settings": [1]}, "override_settings:"),
    "unknown script": ("txt2img", {"script_name": "x/y/z plot"}, "Script 'x/y/z plot' not found"),
    "resize mode": (
        "img2img",
        {"init_images": [RED_PNG], "resize_mode": 2},
        "resize_mode 2 is not supported",
    ),
    "VAE swap": (
        "txt2img",
        {"override_settings": {"sd_vae": "nope.safetensors"}},
        "sd_vae 'nope.safetensors'",
    ),
    "width not a multiple of 8": ("txt2img", {"width": 100}, "width must be a multiple of 8"),
    "no steps": ("txt2img", {"steps": 0}, "steps must be at least 1"),
    "negative CFG": ("txt2img", {"cfg_scale": -1}, "CFG scale"),
    "unknown sampler": ("txt2img", {"sampler_name": "nope"}, "unknown sampler 'nope'"),
    "unknown scheduler": ("txt2img", {"scheduler": "Fast"}, "unknown schedule type 'Fast'"),
    "unknown scheduler, diffusers' way": (
        "txt2img",
        {"scheduler": "Exponential", "way": "diffusers"},
        "scheduler 'Exponential'",
    ),
    "unknown way": ("txt2img", {"way": "comfy"}, "way must be one of a1111, diffusers"),
    "hires upscaler": (
        "txt2img",
        {"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"},
        "'R-ESRGAN 4x+' needs its model",
    ),
    "hires scale": (
        "txt2img",
        {"enable_hr": True, "hr_scale": 0.5},
        "hires scale must be at least 1, got 0.5",
    ),
    "latent mask": (
        "img2img",
        {"init_images": [RED_PNG], "mask": RED_PNG, "latent_mask": RED_PNG},
        "latent_mask: a separate latent mask is not supported yet",
    ),
    "soft inpainting": (
        "img2img",
        {"init_images": [RED_PNG], "mask": RED_PNG, "mask_round": False},
        "mask_round: an unrounded latent mask",
    ),
    "bad masked content": (
        "img2img",
        {"init_images": [RED_PNG], "mask": RED_PNG, "inpainting_fill": 7},
        "inpainting_fill must be 0..3",
    ),
    "mask not an image": ("img2img", {"init_images": [RED_PNG], "mask": NOT_AN_IMAGE}, "mask"),
    "unknown noise source": ("txt2img", {"override_settings": {"randn_source": "TPU"}}, "RNG source"),
    "ENSD not a number": ("txt2img", {"override_settings": {"eta_noise_seed_delta": "x"}}, "must be int"),
    "subseed strength not a number": ("txt2img", {"subseed_strength": "a lot"}, "subseed_strength: Input"),
    "too many images": ("txt2img", {"batch_size": MAX_IMAGES, "n_iter": 2}, f"at most {MAX_IMAGES}"),
    "clip skip not a number": (
        "txt2img",
        {"override_settings": {"CLIP_stop_at_last_layers": "2"}},
        "must be int",
    ),
    "bad emphasis weight": ("txt2img", {"prompt": "(a:1.2.3)"}, "'1.2.3' in ':1.2.3)' is not a number"),
    "unknown emphasis": ("txt2img", {"override_settings": {"emphasis": "Loud"}}, "emphasis must be one of"),
    "body is a list": ("txt2img", [1], "body: Input should be a valid dictionary"),
    "body not JSON": ("txt2img", b"{nope", "not JSON"),
    "no init image": ("img2img", {"prompt": "x"}, "needs init_images"),
    "init image not base64": ("img2img", {"init_images": ["@@"]}, "not valid base64"),
    "init image not an image": ("img2img", {"init_images": [NOT_AN_IMAGE]}, "init_images[0]: not an image"),
    "strength above 1": ("img2img", {"init_images": [RED_PNG], "denoising_strength": 1.5}, "strength must"),
    "extras face restoration": ("extra-single-image", {"image": RED_PNG, "gfpgan_visibility": 0.5}, "GFPGAN"),
    "extras model upscaler": (
        "extra-single-image",
        {"image": RED_PNG, "upscaler_1": "R-ESRGAN 4x+"},
        "'R-ESRGAN 4x+' needs its model",
    ),
    "extras scale above 8": (
        "extra-single-image",
        {"image": RED_PNG, "upscaling_resize": 9},
        "upscaling_resize",
    ),
    "extras not an image": ("extra-single-image", {"image": NOT_AN_IMAGE, "upscaler_1": "Lanczos"}, "image"),
    "extras empty batch": ("extra-batch-images", {"imageList": []}, "at least one"),
}


@pytest.mark.parametrize("route, body, fragment", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_requests_get_4xx_and_one_line(served, route, body, fragment):
    """Wrong types get FastAPI's 422 (as A1111's), our own checks 400 (413 for a prompt too long to read)."""
    url, _ = served
    status, answer = call(url, f"/sdapi/v1/{route}", body)
    assert status in (400, 413, 422), answer
    assert fragment in answer["detail"] and "\n" not in answer["detail"], answer


def test_routes_and_unknown_paths(served):
    url, _ = served
    with urllib.request.urlopen(
        url + "/", timeout=30
    ) as answer:  # the web UI (or a page saying it is missing)
        assert answer.status == 200 and answer.headers["Content-Type"].startswith("text/html")
    with urllib.request.urlopen(url + "/docs", timeout=30) as answer:  # its files from here, not a CDN
        page = answer.read().decode()
    assert "/docs-files/swagger-ui-bundle.js" in page and "cdn" not in page.lower()
    with urllib.request.urlopen(url + "/docs-files/swagger-ui-bundle.js", timeout=30) as answer:
        assert answer.status == 200
    status, schema = call(url, "/openapi.json")
    assert status == 200 and {"/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/options"} <= set(
        schema["paths"]
    )
    _, samplers = call(url, "/sdapi/v1/samplers")
    by_name = {s["name"]: s for s in samplers}
    assert "DPM++ 2M" in by_name and "dpmpp_2m" in by_name and "euler_a" in by_name
    _, models = call(url, "/sdapi/v1/sd-models")
    assert models[0]["title"] == "tiny [0123456789]"
    assert call(url, "/sdapi/v1/options")[1]["sd_model_checkpoint"] == "tiny [0123456789]"
    status, answer = call(url, "/sdapi/v1/txt2imgs", {})
    assert status == 404 and "no route POST /sdapi/v1/txt2imgs" in answer["detail"]
    assert call(url, "/sdapi/v1/txt2img")[0] == 405  # GET of a POST route (FastAPI's answer, as A1111's)
    status, answer = call(url, "/sdapi/v1/interrogate", {"image": RED_PNG, "model": "clip"})
    assert status == 404 and "interrogator models" in answer["detail"]  # A1111's, named with the reason


A1111_LISTINGS = {
    "/sdapi/v1/schedulers": list, "/sdapi/v1/sd-vae": list, "/sdapi/v1/loras": list,
    "/sdapi/v1/upscalers": list, "/sdapi/v1/latent-upscale-modes": list, "/sdapi/v1/prompt-styles": list,
    "/sdapi/v1/scripts": dict, "/sdapi/v1/cmd-flags": dict, "/sdapi/v1/memory": dict,
    "/sdapi/v1/embeddings": dict, "/sdapi/v1/hypernetworks": list, "/sdapi/v1/face-restorers": list,
    "/sdapi/v1/sd-modules": list,
}  # fmt: skip


def test_every_a1111_listing_answers_in_its_shape(served):
    url, _ = served
    for path, kind in A1111_LISTINGS.items():
        status, answer = call(url, path)
        assert status == 200 and isinstance(answer, kind), (path, answer)
    assert call(url, "/sdapi/v1/scripts")[1] == {"txt2img": [], "img2img": []}
    assert {"ram", "cuda"} <= set(call(url, "/sdapi/v1/memory")[1])
    assert {"loaded", "skipped"} <= set(call(url, "/sdapi/v1/embeddings")[1])
    assert {"Latent", "Latent (antialiased)"} <= {
        m["name"] for m in call(url, "/sdapi/v1/latent-upscale-modes")[1]
    }
    for path in ("refresh-checkpoints", "refresh-loras", "refresh-vae", "skip", "interrupt"):
        assert call(url, f"/sdapi/v1/{path}", {})[0] == 200, path


def test_options_take_effect_and_read_back(served):
    url, pipe = served
    request = {"prompt": "a house", "seed": 2, "steps": 3, **SIZE}
    try:
        assert (
            call(
                url,
                "/sdapi/v1/options",
                {
                    "CLIP_stop_at_last_layers": 2,
                    "eta_noise_seed_delta": 31337,
                    "randn_source": "CPU",
                    "samples_format": "jpg",
                },
            )[0]
            == 200
        )
        options = call(url, "/sdapi/v1/options")[1]
        assert (options["CLIP_stop_at_last_layers"], options["randn_source"]) == (2, "CPU")
        status, answer = call(url, "/sdapi/v1/txt2img", {**request, "sampler_name": "Euler a"})
        expected = a1111(pipe, "a house", steps=3, seed=2, clip_skip=2, ensd=31337, rng="CPU",
                         sampler="Euler a")[0]  # fmt: skip
        assert status == 200 and same_pixels(images_of(answer)[0], expected)
        assert "Clip skip: 2" in images_of(answer)[0].info["parameters"]
        # a request's override_settings still win over the server's options
        override = {**request, "override_settings": {"CLIP_stop_at_last_layers": 1, "randn_source": "GPU",
                                                     "eta_noise_seed_delta": 0}}  # fmt: skip
        assert same_pixels(images_of(call(url, "/sdapi/v1/txt2img", override)[1])[0], a1111(pipe, "a house",
                           steps=3, seed=2)[0])  # fmt: skip
        status, answer = call(url, "/sdapi/v1/options", {"CLIP_stop_at_last_layers": "two"})
        assert status == 400 and "CLIP_stop_at_last_layers must be int" in answer["detail"]
        status, answer = call(url, "/sdapi/v1/options", {"sd_model_checkpoint": "nope.safetensors"})
        assert status == 400 and "model 'nope.safetensors' not found" in answer["detail"]
        assert call(url, "/sdapi/v1/options", {"sd_model_checkpoint": "tiny [0123456789]"})[0] == 200
    finally:
        call(url, "/sdapi/v1/options", {"CLIP_stop_at_last_layers": 1, "eta_noise_seed_delta": 0,
                                        "randn_source": "GPU"})  # fmt: skip


def test_negative_pass_skips_from_options_and_the_request(served):
    """A1111's NGMS (option s_min_uncond, or the request's field) and "Skip Early CFG" (skip_early_cond)."""
    url, pipe = served
    request = {"prompt": "a house", "negative_prompt": "fog", "seed": 4, "steps": 4, **SIZE}
    try:
        assert call(url, "/sdapi/v1/options", {"skip_early_cond": 0.3, "s_min_uncond_all": True})[0] == 200
        status, answer = call(url, "/sdapi/v1/txt2img", {**request, "s_min_uncond": 5.0})
        assert status == 200, answer
        expected = a1111(pipe, "a house", "fog", steps=4, seed=4, skip_early_cond=0.3, s_min_uncond=5.0,
                         s_min_uncond_all=True)[0]  # fmt: skip
        image = images_of(answer)[0]
        assert same_pixels(image, expected)
        assert not same_pixels(image, a1111(pipe, "a house", "fog", steps=4, seed=4)[0])
        assert "Skip Early CFG: 0.3, NGMS: 5, NGMS all steps: True" in image.info["parameters"]
        assert "s_min_uncond" not in json.loads(answer["info"])["ignored_fields"]
        status, answer = call(url, "/sdapi/v1/txt2img", {**request, "s_min_uncond": -1})
        assert status == 400 and "NGMS must be >= 0" in answer["detail"]
    finally:
        call(url, "/sdapi/v1/options", {"skip_early_cond": 0.0, "s_min_uncond_all": False})


def test_tiling_from_the_request_or_the_options(served):
    url, pipe = served
    request = {"prompt": "bricks", "seed": 8, "steps": 2, "sampler_name": "Euler", **SIZE}
    expected = a1111(pipe, "bricks", steps=2, seed=8, tiling=True)[0]
    status, answer = call(url, "/sdapi/v1/txt2img", {**request, "tiling": True})
    assert status == 200 and same_pixels(images_of(answer)[0], expected)
    assert "Tiling: True" in images_of(answer)[0].info["parameters"]
    status, answer = call(url, "/sdapi/v1/txt2img", {**request, "override_settings": {"tiling": True}})
    assert status == 200 and same_pixels(images_of(answer)[0], expected)
    status, answer = call(url, "/sdapi/v1/txt2img", {**request, "tiling": False,
                                                     "override_settings": {"tiling": True}})  # fmt: skip
    assert status == 200 and not same_pixels(images_of(answer)[0], expected)


def test_an_oversized_body_is_refused_unread(served):
    url, _ = served
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
    connection.putrequest("POST", "/sdapi/v1/txt2img")
    connection.putheader("Content-Length", str(2**40))
    connection.endheaders()
    answer = connection.getresponse()
    assert answer.status == 413 and "request body over" in json.loads(answer.read())["detail"]
    connection.close()


def test_a1111_seed_fields_and_settings(served):
    url, pipe = served
    request = {"prompt": "a lake", "seed": 4, "steps": 3, "sampler_name": "Euler a", "batch_size": 2,
               "subseed": 9, "subseed_strength": 0.4, "seed_resize_from_w": 32, "seed_resize_from_h": 48,
               "override_settings": {"eta_noise_seed_delta": 31337, "randn_source": "CPU",
                                     "eta_ancestral": 0.5, "sd_vae": "Automatic",
                                     "face_restoration_model": "CodeFormer"},
               **SIZE}  # fmt: skip
    status, answer = call(url, "/sdapi/v1/txt2img", request)
    assert status == 200, answer
    expected = a1111(pipe, "a lake", steps=3, seed=4, sampler="Euler a", subseed=9, subseed_strength=0.4,
                     seed_resize_from=(32, 48), ensd=31337, rng="CPU", eta=0.5, num_images=2)  # fmt: skip
    got = images_of(answer)
    assert all(same_pixels(g, e) for g, e in zip(got, expected, strict=True))
    text = got[1].info["parameters"]
    for part in ("Seed: 4,", "Variation seed: 10, Variation seed strength: 0.4", "Seed resize from: 32x48",
                 "ENSD: 31337", "RNG: CPU", "Eta: 0.5"):  # fmt: skip
        assert part in text, text
    info = json.loads(answer["info"])
    assert info["all_seeds"] == [4, 4]  # a variation batch shares the seed (and numbers the subseeds)
    assert info["ignored_fields"] == ["override_settings.face_restoration_model"]
    status, schedulers = call(url, "/sdapi/v1/schedulers")
    assert status == 200 and {"Automatic", "Karras", "Align Your Steps"} <= {s["label"] for s in schedulers}
    status, samplers = call(url, "/sdapi/v1/samplers")
    assert {"DPM++ 2M", "Euler a", "dpmpp_2m"} <= {s["name"] for s in samplers}


def test_a_request_as_a1111_clients_send_it(served):
    """Every field with A1111's defaults, as client libraries (webuiapi, ...) send them."""
    url, pipe = served
    request = {
        "enable_hr": False, "denoising_strength": 0.7, "firstphase_width": 0, "firstphase_height": 0,
        "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0,
        "prompt": "a barn", "styles": [], "seed": 6, "subseed": -1, "subseed_strength": 0.0,
        "seed_resize_from_h": 0, "seed_resize_from_w": 0, "sampler_name": "Euler a", "scheduler": None,
        "batch_size": 1, "n_iter": 1, "steps": 3, "cfg_scale": 7.0, "restore_faces": False, "tiling": False,
        "do_not_save_samples": False, "do_not_save_grid": False, "negative_prompt": "", "eta": 1.0,
        "s_churn": 0, "s_tmax": 0, "s_tmin": 0, "s_noise": 1, "override_settings": {},
        "override_settings_restore_afterwards": True, "script_args": [], "script_name": None,
        "sampler_index": "Euler a", "send_images": True, "save_images": False, "alwayson_scripts": {}, **SIZE,
    }  # fmt: skip
    status, answer = call(url, "/sdapi/v1/txt2img", request)
    assert status == 200, answer
    assert same_pixels(images_of(answer)[0], a1111(pipe, "a barn", steps=3, seed=6, sampler="Euler a")[0])


def test_png_info_reads_an_infotext_as_a1111(served):
    url, _ = served
    _, answer = call(url, "/sdapi/v1/txt2img", {"prompt": "a pier, (fog:1.2)", "negative_prompt": "rain",
                                                "seed": 12, "steps": 2, "sampler_name": "DPM++ 2M",
                                                **SIZE})  # fmt: skip
    status, info = call(url, "/sdapi/v1/png-info", {"image": answer["images"][0]})
    assert status == 200 and info["info"] == images_of(answer)[0].info["parameters"]
    parameters = info["parameters"]
    assert (parameters["Prompt"], parameters["Negative prompt"], parameters["Seed"]) == (
        "a pier, (fog:1.2)", "rain", "12",
    )  # fmt: skip
    assert (parameters["Size-1"], parameters["Size-2"], parameters["Sampler"]) == ("64", "64", "DPM++ 2M")
    assert call(url, "/sdapi/v1/png-info", {"image": RED_PNG}) == (
        200,
        {"info": "", "items": {}, "parameters": {}},
    )
    status, answer = call(url, "/sdapi/v1/png-info", {"image": NOT_AN_IMAGE})
    assert status == 400 and "not" in answer["detail"] and "0x" not in answer["detail"]


def test_long_prompts_are_whole_and_unapplied_tags_are_reported(served):
    url, _ = served
    status, answer = call(url, "/sdapi/v1/txt2img", {"prompt": "cat " * 100, "steps": 1, **SIZE})
    assert status == 200 and json.loads(answer["info"])["warnings"] == []  # 100 tokens: two chunks, no loss
    status, answer = call(url, "/sdapi/v1/txt2img", {"prompt": "a cat <hypernet:x:1>", "steps": 1, **SIZE})
    assert status == 200
    assert any("<hypernet:x:1>" in w for w in json.loads(answer["info"])["warnings"])


def _wait_for_step(url: str, step: int, deadline_s: float = 60) -> dict:
    deadline = time.monotonic() + deadline_s
    progress = call(url, "/sdapi/v1/progress")[1]
    while progress["state"]["sampling_step"] < step and time.monotonic() < deadline:
        time.sleep(0.02)
        progress = call(url, "/sdapi/v1/progress")[1]
    return progress


def test_progress_while_running_and_interrupt(served):
    url, _ = served
    results = {}
    request = {"prompt": "slow", "steps": 1000, "sampler_name": "Euler", "seed": 1, **SIZE}
    worker = threading.Thread(target=lambda: results.update(answer=call(url, "/sdapi/v1/txt2img", request)))
    worker.start()
    progress = _wait_for_step(url, 3)
    assert progress["state"]["sampling_steps"] == 1000 and progress["state"]["job_count"] == 1
    assert 0 < progress["progress"] < 1 and progress["eta_relative"] > 0
    preview = Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))  # the latents, as RGB
    assert preview.size == (8, 8) and preview.mode == "RGB"
    assert call(url, "/sdapi/v1/progress?skip_current_image=true")[1]["current_image"] is None
    assert call(url, "/sdapi/v1/interrupt", {})[0] == 200
    worker.join(60)
    status, answer = results["answer"]
    assert status == 200, answer  # A1111: the interrupted job answers with what it has
    info = json.loads(answer["info"])
    assert info["interrupted"] and info["all_seeds"] == [1] and len(answer["images"]) == 1
    assert "Steps: 1000" in images_of(answer)[0].info["parameters"]
    after = call(url, "/sdapi/v1/progress")[1]
    assert after["state"]["job_count"] == 0 and after["progress"] == 0
    # The next job runs normally: the interrupt belonged to the one before.
    assert call(url, "/sdapi/v1/txt2img", {"prompt": "x", "steps": 2, **SIZE})[0] == 200


def test_skip_ends_a_batch_and_the_job_goes_on(served):
    url, _ = served
    results = {}
    request = {"prompt": "slow", "steps": 1000, "sampler_name": "Euler", "seed": 5, "n_iter": 2, **SIZE}
    worker = threading.Thread(target=lambda: results.update(answer=call(url, "/sdapi/v1/txt2img", request)))
    worker.start()
    _wait_for_step(url, 3)
    assert call(url, "/sdapi/v1/skip", {})[0] == 200
    deadline = time.monotonic() + 60
    while call(url, "/sdapi/v1/progress")[1]["state"]["job_no"] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert call(url, "/sdapi/v1/interrupt", {})[0] == 200
    worker.join(60)
    status, answer = results["answer"]
    assert status == 200 and json.loads(answer["info"])["all_seeds"] == [5, 6], answer


def test_waiting_clients_see_their_place_in_the_queue(served):
    url, _ = served
    results: dict[str, tuple] = {}
    slow = {"prompt": "slow", "steps": 1000, "sampler_name": "Euler", **SIZE}
    threads = [threading.Thread(target=lambda: results.update(first=call(url, "/sdapi/v1/txt2img", slow)))]
    threads[0].start()
    _wait_for_step(url, 1)
    for name in ("second", "third"):
        body = {"prompt": name, "steps": 1, "force_task_id": name, **SIZE}
        threads.append(threading.Thread(target=lambda n=name, b=body: results.update({n: call(
            url, "/sdapi/v1/txt2img", b)})))  # fmt: skip
        threads[-1].start()
        deadline = time.monotonic() + 30
        while call(url, f"/sdapi/v1/progress?id_task={name}")[1]["queue_position"] is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    progress = call(url, "/sdapi/v1/progress?id_task=third")[1]
    assert [q["id_task"] for q in progress["queue"]] == ["second", "third"] and progress[
        "queue_position"
    ] == 2
    assert progress["state"]["queue_size"] == 2
    status, internal = call(url, "/internal/progress", {"id_task": "second", "id_live_preview": -1})
    assert status == 200 and internal["queued"] and not internal["active"] and internal["queue_position"] == 1
    call(url, "/sdapi/v1/interrupt", {})
    for thread in threads:
        thread.join(60)
    assert all(results[name][0] == 200 for name in ("first", "second", "third")), results
    assert call(url, "/internal/progress", {"id_task": "third"})[1]["completed"]


def test_serve_defaults_to_this_machine_only():
    from sd.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port) == ("127.0.0.1", 7860)


def test_serve_refuses_a_taken_port_before_loading_a_model(capsys, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # The checkpoint does not exist: had it been loaded first, the error would be about it.
        code = main(["serve", "--port", str(port), "--ckpt", str(tmp_path / "missing.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err and len(err.strip().splitlines()) == 1


def test_serve_rejects_a_bad_port(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--port", "70000"])
    assert exit_info.value.code == 2 and "a port is a number from 0 to 65535" in capsys.readouterr().err


def test_sd_serve_end_to_end_with_the_built_in_model(tmp_path):
    """The command itself: start on a free port, answer, stop cleanly on Ctrl-C (SIGINT)."""
    import re
    import signal
    import subprocess
    import sys

    from sd.checkpoints import BUILTIN_MODEL

    if not BUILTIN_MODEL.exists():
        pytest.skip("no built-in model")
    env = {k: v for k, v in os.environ.items() if k != "SD_CHECKPOINT"}
    env["SD_HOME"] = str(tmp_path)  # no checkpoint anywhere: the built-in model
    env["PYTHONFAULTHANDLER"] = "1"  # so that SIGABRT makes a stuck server print where it is
    process = subprocess.Popen([sys.executable, "-m", "sd", "serve", "--port", "0"], env=env,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    # stderr is read to the end in a thread: a server blocked on a full pipe would never answer.
    lines: list[str] = []
    serving = threading.Event()

    def read_stderr() -> None:
        for line in process.stderr:
            lines.append(line)
            if "serving at" in line:
                serving.set()
        serving.set()  # the process ended: let the test fail with what it printed

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert serving.wait(timeout=120), lines
        found = re.search(r"serving at (http://127\.0\.0\.1:\d+)/", "".join(lines))
        assert found and "built-in shapes model" in "".join(lines), lines
        status, answer = call(found.group(1), "/sdapi/v1/txt2img", {"prompt": "a red circle", "steps": 4})
        assert status == 200, answer
        assert images_of(answer)[0].size == (64, 64)  # the model's own size
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # (seen rarely, in full runs only) show where it hangs
            process.send_signal(signal.SIGABRT)
            process.wait(timeout=30)
            reader.join(timeout=10)
            pytest.fail("sd serve did not stop on SIGINT; its stderr and threads:\n" + "".join(lines))
        reader.join(timeout=10)
    assert process.returncode == 0 and "sd serve: stopped" in "".join(lines), lines


def _serve_folders(tmp_path):
    """A server over a models folder in A1111's layout: two checkpoints, a VAE, a LoRA."""
    import torch
    from safetensors.torch import save_file

    from sd.checkpoints import model_hash
    from sd.testing import ldm_state_dict
    from sd.weights import load_models, save_checkpoint

    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    (models / "VAE").mkdir()
    (models / "Lora").mkdir()
    first, second = (models / "Stable-diffusion" / f"{n}.safetensors" for n in ("one", "two"))
    save_checkpoint(random_models(TINY, seed=1), first, TINY)
    save_checkpoint(random_models(TINY, seed=2), second, TINY)
    state = ldm_state_dict(random_models(TINY, seed=3))
    vae = {
        k.removeprefix("first_stage_model."): v
        for k, v in state.items()
        if k.startswith("first_stage_model.")
    }
    save_file(vae, str(models / "VAE" / "mse.safetensors"))
    lora = {"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}
    save_file(
        lora, str(models / "Lora" / "ink_v2.safetensors"), {"ss_output_name": "ink", "ss_network_dim": "4"}
    )

    def loader(path):
        return Pipeline(load_models(path), model_name=path.stem, model_hash=model_hash(path))

    pipe = loader(first)
    pipe.lora_dir = models / "Lora"
    pipe.vae_dir = models / "VAE"
    server = make_server(Service(pipe, models_dir=models, checkpoint=first, loader=loader), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}", models


def test_refresh_embeddings_reads_the_folder_again(tmp_path):
    import torch

    folder = tmp_path / "embeddings"
    folder.mkdir()
    torch.save({"string_to_param": {"*": torch.randn(2, TINY.clip.width)}}, folder / "first.pt")
    pipe = Pipeline(random_models(TINY), model_name="tiny", embeddings=folder)
    server = make_server(Service(pipe), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert set(call(url, "/sdapi/v1/embeddings")[1]["loaded"]) == {"first"}
        torch.save({"string_to_param": {"*": torch.randn(1, TINY.clip.width)}}, folder / "second.pt")
        (folder / "first.pt").unlink()
        assert set(call(url, "/sdapi/v1/embeddings")[1]["loaded"]) == {"first"}  # until refreshed
        assert call(url, "/sdapi/v1/refresh-embeddings", b"")[0] == 200
        assert set(call(url, "/sdapi/v1/embeddings")[1]["loaded"]) == {"second"}
    finally:
        server.shutdown()
        server.server_close()


def test_checkpoints_vaes_and_loras_from_the_models_folder(tmp_path):
    server, url, models = _serve_folders(tmp_path)
    try:
        listed = call(url, "/sdapi/v1/sd-models")[1]
        assert [m["model_name"] for m in listed] == ["one", "two"]
        assert listed[0]["title"].startswith("one.safetensors [") and listed[0]["sha256"]
        request = {"prompt": "a cat", "seed": 3, "steps": 2, "sampler_name": "Euler", **SIZE}
        one = images_of(call(url, "/sdapi/v1/txt2img", request)[1])[0]
        # for one request, then back (override_settings_restore_afterwards, A1111's default)
        answer = call(
            url, "/sdapi/v1/txt2img", {**request, "override_settings": {"sd_model_checkpoint": "two"}}
        )[1]
        two = images_of(answer)[0]
        assert "Model: two" in two.info["parameters"] and not same_pixels(two, np.asarray(one))
        assert call(url, "/sdapi/v1/options")[1]["sd_model_checkpoint"].startswith("one.safetensors")
        # for good: POST /options
        assert call(url, "/sdapi/v1/options", {"sd_model_checkpoint": "two.safetensors"})[0] == 200
        assert call(url, "/sdapi/v1/options")[1]["sd_model_checkpoint"].startswith("two.safetensors")
        assert same_pixels(images_of(call(url, "/sdapi/v1/txt2img", request)[1])[0], np.asarray(two))
        assert [m["model_name"] for m in call(url, "/sdapi/v1/sd-models")[1]] == ["two", "one"]
        # the VAE: listed, swapped in by name, and back
        assert call(url, "/sdapi/v1/sd-vae")[1] == [
            {"model_name": "mse.safetensors", "filename": str(models / "VAE" / "mse.safetensors")}
        ]
        assert call(url, "/sdapi/v1/options", {"sd_vae": "mse.safetensors"})[0] == 200
        assert call(url, "/sdapi/v1/options")[1]["sd_vae"] == "mse.safetensors"
        swapped = images_of(call(url, "/sdapi/v1/txt2img", request)[1])[0]
        assert "VAE: mse.safetensors" in swapped.info["parameters"] and not same_pixels(
            swapped, np.asarray(two)
        )
        assert call(url, "/sdapi/v1/options", {"sd_vae": "Automatic"})[0] == 200
        assert same_pixels(images_of(call(url, "/sdapi/v1/txt2img", request)[1])[0], np.asarray(two))
        status, answer = call(url, "/sdapi/v1/options", {"sd_vae": "none-such.pt"})
        assert status == 400 and "none-such.pt" in answer["detail"]
        # LoRAs as A1111's Lora extension lists them
        (lora,) = call(url, "/sdapi/v1/loras")[1]
        assert (lora["name"], lora["alias"], lora["metadata"]["ss_network_dim"]) == ("ink_v2", "ink", "4")
        assert lora["path"] == str(models / "Lora" / "ink_v2.safetensors")
    finally:
        server.shutdown()
        server.server_close()


def test_hires_fix_through_the_server(served):
    url, pipe = served
    request = {"prompt": "a boat", "seed": 4, "steps": 2, "sampler_name": "Euler", "enable_hr": True,
               "hr_scale": 1.5, "hr_upscaler": "Latent", "denoising_strength": 0.6, "hr_second_pass_steps": 2,
               **SIZE}  # fmt: skip
    status, answer = call(url, "/sdapi/v1/txt2img", request)
    assert status == 200, answer
    expected = a1111(pipe, "a boat", steps=2, seed=4, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent",
                     strength=0.6, hr_second_pass_steps=2)[0]  # fmt: skip
    got = images_of(answer)[0]
    assert got.size == (96, 96) and same_pixels(got, expected)
    assert json.loads(answer["info"])["ignored_fields"] == []


def _png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_inpainting_through_the_server(served):
    """img2img's mask fields as A1111 reads them (its API defaults: blur 4, "fill", only masked, padding
    0), the same pixels as Pipeline.inpaint; without a mask the controls are listed as ignored."""
    url, pipe = served
    rng = np.random.default_rng(1)
    source = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 40, 48))
    base = {"prompt": "a hat", "init_images": [_png_b64(source)], "seed": 3, "steps": 3,
            "denoising_strength": 0.8, **SIZE}  # fmt: skip
    cases = [
        ({}, dict(mask_blur=4, inpainting_fill=0, inpaint_full_res=True, inpaint_full_res_padding=0)),
        ({"mask_blur": 0, "inpainting_fill": 1, "inpaint_full_res": False, "inpainting_mask_invert": 1},
         dict(mask_blur=0, inpainting_fill=1, inpaint_full_res=False, inpainting_mask_invert=1)),
        ({"mask_blur_x": 2, "mask_blur_y": 0, "inpainting_fill": 2, "inpaint_full_res": 0,
          "inpaint_full_res_padding": 8}, dict(mask_blur_x=2, mask_blur_y=0, inpainting_fill=2)),
    ]  # fmt: skip
    results = []
    for fields, keywords in cases:
        status, answer = call(url, "/sdapi/v1/img2img", {**base, "mask": _png_b64(mask), **fields})
        assert status == 200, answer
        expected = pipe.inpaint(source, mask, "a hat", steps=3, seed=3, strength=0.8, sampler="Euler",
                                cfg_scale=7.0, a1111=True, **SIZE, **keywords)[0]  # fmt: skip
        got = images_of(answer)[0]
        assert same_pixels(got, expected), fields
        assert got.info["parameters"] == expected.info["parameters"]
        echo = answer["parameters"]  # A1111 echoes the request less its images
        assert echo["init_images"] is None and echo["mask"] is None and echo["denoising_strength"] == 0.8
        assert json.loads(answer["info"])["ignored_fields"] == []
        results.append(np.asarray(got.convert("RGB")))
    kept = np.asarray(mask) == 255  # case 2: blur 0, inverted, so the painted area is the input's own
    assert np.array_equal(results[1][kept], np.asarray(source)[kept])
    assert not np.array_equal(results[1][~kept], np.asarray(source)[~kept])
    status, answer = call(url, "/sdapi/v1/img2img", {**base, "mask_blur": 4, "inpainting_fill": 1})
    assert status == 200 and json.loads(answer["info"])["ignored_fields"] == ["inpainting_fill", "mask_blur"]


def test_the_inpainting_model_through_the_server():
    """A 9-channel model: its mask weight from override_settings (A1111's option), and the answer says it
    uses the inpainting conditioning."""
    nine = replace(TINY, unet=replace(TINY.unet, in_channels=9))
    pipe = Pipeline(random_models(nine), model_name="tiny9", model_hash="9999999999")
    server = make_server(Service(pipe), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        source = Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8))
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (0, 0, 32, 64))
        request = {"prompt": "a door", "init_images": [_png_b64(source)], "mask": _png_b64(mask), "seed": 6,
                   "steps": 2, "inpaint_full_res": False, **SIZE,
                   "override_settings": {"inpainting_mask_weight": 0.5}}  # fmt: skip
        status, answer = call(url, "/sdapi/v1/img2img", request)
        assert status == 200, answer
        assert json.loads(answer["info"])["is_using_inpainting_conditioning"] is True
        expected = pipe.inpaint(source, mask, "a door", steps=2, seed=6, strength=0.75, sampler="Euler",
                                cfg_scale=7.0, a1111=True, mask_blur=4, inpainting_fill=0,
                                inpainting_mask_weight=0.5, **SIZE)[0]  # fmt: skip
        got = images_of(answer)[0]
        assert same_pixels(got, expected) and "Conditional mask weight: 0.5" in got.info["parameters"]
    finally:
        server.shutdown()
        server.server_close()


def test_a1111_request_details(served):
    """send_images, styles, sampler_index alone, steps null, and infotext filling the fields not given."""
    url, pipe = served
    base = {"prompt": "a kite", "seed": 8, "steps": 2, **SIZE}
    status, answer = call(url, "/sdapi/v1/txt2img", {**base, "send_images": False, "styles": ["mine"]})
    info = json.loads(answer["info"])
    assert status == 200 and answer["images"] == [] and info["all_seeds"] == [8]
    assert info["ignored_fields"] == ["send_images", "styles"]
    by_index = call(url, "/sdapi/v1/txt2img", {**base, "sampler_index": "Euler a"})[1]
    assert same_pixels(images_of(by_index)[0], a1111(pipe, "a kite", steps=2, seed=8, sampler="Euler a")[0])
    status, answer = call(url, "/sdapi/v1/txt2img", {**base, "steps": None, "sampler_name": "DDIM"})
    assert status == 200 and "Steps: 50," in images_of(answer)[0].info["parameters"]  # A1111's default
    text = images_of(by_index)[0].info["parameters"]
    status, again = call(url, "/sdapi/v1/txt2img", {"infotext": text, "steps": 3})  # steps given: 3 wins
    assert status == 200, again
    expected = a1111(pipe, "a kite", steps=3, seed=8, sampler="Euler a")[0]
    assert same_pixels(images_of(again)[0], expected)


def test_extras_upscale_as_a1111(served):
    """/extra-single-image and /extra-batch-images with the built-in upscalers, A1111's arithmetic
    (Upscaler.upscale: the filter's resize, then Lanczos to the size rounded down to 8; scale-to: the
    larger ratio, then a centred crop on black; upscaler 2 blended at its visibility), the input's
    parameters kept and A1111's postprocessing text added."""
    url, _ = served
    rng = np.random.default_rng(4)
    source = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    save_png(source, buffer, "a cat\nSteps: 3, Seed: 1")
    image = base64.b64encode(buffer.getvalue()).decode()

    def single(**fields) -> Image.Image:
        status, answer = call(url, "/sdapi/v1/extra-single-image", {"image": image, **fields})
        assert status == 200, answer
        return Image.open(io.BytesIO(base64.b64decode(answer["image"])))

    lanczos = Image.Resampling.LANCZOS
    got = single(upscaler_1="Lanczos", upscaling_resize=2)
    expected = source.resize((100, 60), lanczos).resize((96, 56), lanczos)  # 100x60 rounded down to 8
    assert np.array_equal(np.asarray(got), np.asarray(expected))
    assert got.info["parameters"] == "a cat\nSteps: 3, Seed: 1"
    assert got.info["postprocessing"] == "Postprocess upscale by: 2.0, Postprocess upscaler: Lanczos"

    got = single(resize_mode=1, upscaling_resize_w=120, upscaling_resize_h=40, upscaler_1="nearest")
    scaled = source.resize((120, 72), Image.Resampling.NEAREST)  # by max(120 / 50, 40 / 30) = 2.4
    canvas = Image.new("RGB", (120, 40))
    canvas.paste(scaled, (0, 20 - 36))
    assert got.size == (120, 40) and np.array_equal(np.asarray(got), np.asarray(canvas))
    assert "Postprocess upscale to: 120x40" in got.info["postprocessing"]

    got = single(upscaler_1="Lanczos", upscaler_2="Nearest", extras_upscaler_2_visibility=0.25)
    first = source.resize((100, 60), lanczos).resize((96, 56), lanczos)
    second = source.resize((100, 60), Image.Resampling.NEAREST).resize((96, 56), lanczos)
    assert np.array_equal(np.asarray(got), np.asarray(Image.blend(first, second, 0.25)))
    assert single().size == source.size  # upscaler "None": the image as it was

    status, answer = call(url, "/sdapi/v1/extra-batch-images", {
        "imageList": [{"data": image, "name": "a.png"}, {"data": RED_PNG, "name": "b.png"}],
        "upscaler_1": "Lanczos", "upscaling_resize": 1.5,
    })  # fmt: skip
    assert status == 200 and len(answer["images"]) == 2 and "Lanczos" in answer["html_info"], answer
