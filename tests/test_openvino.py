"""The OpenVINO backend against our fp32 eager modules, on TINY random weights.

Tolerances, stated once:
- f32 inference: max |openvino - eager| <= 1e-4 x the output's scale (max |eager|), every component.
- bf16 inference: one U-Net step within 3e-2 relative L2 error; VAE decode PSNR > 30 dB (images clamped
  to [-1, 1] and read on [0, 1], as the pipeline turns them into pixels).
- Whole pipeline (f32, 64 px): uint8 images off by <= 2 levels on >= 99% of pixels.

Skipped when openvino is not installed, except the test that the backend then fails politely.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sd.config import TINY
from sd.pipeline import Pipeline
from sd.testing import random_models

F32_TOLERANCE = 1e-4  # x output scale
BF16_UNET_REL_L2 = 3e-2
BF16_DECODE_PSNR_DB = 30.0
PIPELINE_LEVELS, PIPELINE_FRACTION = 2, 0.99


@pytest.fixture(scope="module")
def ov():
    return pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def models() -> dict:
    return random_models(TINY, seed=7)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One cache for the module: f32 and bf16 share the IR, as they would in real use."""
    return tmp_path_factory.mktemp("openvino-cache")


# With OpenVINO's blob cache on, so the bf16 tests also guard against reusing f32 blobs.
@pytest.fixture(scope="module")
def f32(ov, models, cache) -> dict:
    from sd.backends.openvino import compile_models

    return compile_models(models, "f32", cache, blob_cache=True)


@pytest.fixture(scope="module")
def bf16(ov, models, cache) -> dict:
    from sd.backends.openvino import compile_models

    return compile_models(models, "bf16", cache, blob_cache=True)


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max abs difference in units of the output's scale."""
    return ((got - want).abs().max() / want.abs().max()).item()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- without openvino -------------------------------------------------------------------------------


def test_import_without_openvino_and_one_line_error():
    # A fresh interpreter where `import openvino` fails: importing the backend still works, and
    # compile_models says what to install.
    code = (
        "import sys; sys.modules['openvino'] = None\n"
        "import sd.backends.openvino as backend\n"
        "assert not backend.available()\n"
        "try:\n"
        "    backend.compile_models({})\n"
        "except RuntimeError as error:\n"
        "    print(error)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "OpenVINO backend needs the openvino package: pip install openvino"


# --- drop-in behaviour --------------------------------------------------------------------------------


def test_looks_like_our_modules(f32, models):
    assert set(f32) == {"clip", "encoder", "decoder", "diffusion"}
    for name, module in f32.items():
        assert module.to("cpu") is module
        assert next(module.parameters()).dtype == torch.float32
        assert module.config == models[name].config


def test_rejects_bad_arguments(ov, models, tmp_path):
    from sd.backends.openvino import compile_models

    with pytest.raises(ValueError, match="precision"):
        compile_models(models, "f16", tmp_path)
    half = dict(models, decoder=random_models(TINY)["decoder"].to(torch.bfloat16))
    with pytest.raises(ValueError, match="fp32"):
        compile_models(half, "f32", tmp_path)


# --- numbers: f32 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_f32(f32, models, clip_skip):
    tokens = torch.randint(0, TINY.clip.vocab_size, (2, 77), generator=gen(0))
    want = models["clip"](tokens, clip_skip=clip_skip)
    assert max_error(f32["clip"](tokens, clip_skip=clip_skip), want) <= F32_TOLERANCE


# Two sizes each: the IR is converted once at the first and reshaped for the second.
@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_encoder_f32(f32, models, size):
    from sd.encoder import LatentDistribution

    image = torch.rand(1, 3, *size, generator=gen(1)) * 2 - 1
    got, want = f32["encoder"].encode(image), models["encoder"].encode(image)
    assert isinstance(got, LatentDistribution)
    assert max_error(got.mean, want.mean) <= F32_TOLERANCE
    assert max_error(got.logvar, want.logvar) <= F32_TOLERANCE
    noise = torch.randn(want.mean.shape, generator=gen(2))
    assert max_error(f32["encoder"](image, noise), models["encoder"](image, noise)) <= F32_TOLERANCE


@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (2, 4, 6, 10)])
def test_decoder_f32(f32, models, shape):
    latents = torch.randn(shape, generator=gen(3))
    assert max_error(f32["decoder"](latents), models["decoder"](latents)) <= F32_TOLERANCE


@pytest.mark.parametrize(
    ("shape", "timestep"),
    [((2, 4, 8, 8), torch.tensor(981.0)), ((2, 4, 8, 8), torch.tensor([1.0, 500.0])), ((1, 4, 6, 10), 250)],
)
def test_diffusion_f32(f32, models, shape, timestep):
    latents = torch.randn(shape, generator=gen(4))
    context = torch.randn(shape[0], 77, TINY.unet.context_dim, generator=gen(5))
    want = models["diffusion"](latents, context, timestep)
    assert max_error(f32["diffusion"](latents, context, timestep), want) <= F32_TOLERANCE


# --- numbers: bf16 -----------------------------------------------------------------------------------


def test_unet_step_bf16(f32, bf16, models, cache):
    # Batch 2 (a CFG pair) at a late, large timestep: its sinusoidal features are the most fragile in bf16.
    latents = torch.randn(2, 4, 8, 8, generator=gen(6))
    context = torch.randn(2, 77, TINY.unet.context_dim, generator=gen(7))
    timestep = torch.tensor(961.0)
    # f32 first, at the same shape and in the same cache: a bf16 compile must not pick up the f32 blob
    # (OpenVINO 2026.4 keys its blob cache without the precision and then computes garbage).
    f32["diffusion"](latents, context, timestep)
    want = models["diffusion"](latents, context, timestep)
    got = bf16["diffusion"](latents, context, timestep)
    assert ((got - want).norm() / want.norm()).item() < BF16_UNET_REL_L2
    for precision in ("f32", "bf16"):
        assert list(cache.glob(f"*/compiled/{precision}/*.blob")), f"no {precision} blobs in the cache"


def test_decode_psnr_bf16(f32, bf16, models):
    latents = torch.randn(1, 4, 8, 8, generator=gen(8))
    f32["decoder"](latents)  # see test_unet_step_bf16
    to_unit = lambda x: (x.clamp(-1, 1) + 1) / 2  # noqa: E731
    mse = (to_unit(bf16["decoder"](latents)) - to_unit(models["decoder"](latents))).pow(2).mean().item()
    assert 10 * np.log10(1.0 / max(mse, 1e-20)) > BF16_DECODE_PSNR_DB


# --- disk cache ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("blob_cache", [False, True])
def test_disk_cache_second_run_skips_conversion(ov, models, tmp_path, monkeypatch, blob_cache):
    from sd.backends.openvino import compile_models, fingerprint

    conversions = []
    real_convert = ov.convert_model

    def counting_convert(*args, **kwargs):
        conversions.append(args)
        return real_convert(*args, **kwargs)

    monkeypatch.setattr(ov, "convert_model", counting_convert)
    latents = torch.randn(1, 4, 8, 8, generator=gen(9))
    compiled = compile_models(models, "f32", tmp_path, blob_cache=blob_cache)
    first = compiled["decoder"](latents)
    assert len(conversions) == 1
    # With its IR on disk the decoder no longer needs (nor keeps alive) the torch module.
    assert compiled["decoder"].module is None and compiled["clip"].module is not None
    folder = tmp_path / fingerprint(models)
    assert (folder / "decoder.xml").is_file() and (folder / "decoder.bin").is_file()
    # OpenVINO's own compiled blobs only when asked for.
    assert bool(list(folder.glob("compiled/f32/*.blob"))) == blob_cache

    # A fresh set of objects (as in a new process): nothing converted, not even traced.
    def no_tracing(*args, **kwargs):
        raise AssertionError("the cached IR should have been used")

    monkeypatch.setattr(torch.jit, "trace", no_tracing)
    again = compile_models(models, "f32", tmp_path, blob_cache=blob_cache)
    # Its IR on disk, the decoder lets the torch module go at once; the U-Net's IR is not there yet.
    assert again["decoder"].module is None and again["diffusion"].module is not None
    second = again["decoder"](latents)
    assert len(conversions) == 1
    assert torch.equal(first, second)


def test_fingerprint_follows_the_weights(ov, models):
    from sd.backends.openvino import fingerprint

    other = random_models(TINY, seed=7)
    assert fingerprint(other) == fingerprint(models)
    with torch.no_grad():
        other["decoder"].decoder.conv_out.weight[0, 0, 0, 0] += 1e-3
    assert fingerprint(other) != fingerprint(models)
    # A caller-given checkpoint id replaces the weights checksum.
    assert fingerprint(other, weights_id="abc") == fingerprint(models, weights_id="abc")
    assert fingerprint(models, weights_id="abc") != fingerprint(models, weights_id="abd")


# --- the whole pipeline ---------------------------------------------------------------------------------


def close_images(got, want) -> bool:
    off = np.abs(np.asarray(got, dtype=np.int16) - np.asarray(want, dtype=np.int16))
    return (off <= PIPELINE_LEVELS).mean() >= PIPELINE_FRACTION


def test_pipeline_txt2img_and_img2img_f32(f32, models):
    settings = dict(prompt="a lighthouse at dusk", width=64, height=64, steps=3, cfg_scale=7.5, seed=3)
    eager, compiled = Pipeline(models), Pipeline(f32)
    want = eager.txt2img(**settings)[0]
    got = compiled.txt2img(**settings)[0]
    assert got.size == (64, 64)
    assert close_images(got, want)
    assert close_images(
        compiled.img2img(want, strength=0.6, **settings)[0], eager.img2img(want, strength=0.6, **settings)[0]
    )


def test_pipeline_bf16_runs(bf16):
    image = Pipeline(bf16).txt2img("a lighthouse", width=64, height=64, steps=2, seed=0)[0]
    assert image.size == (64, 64)


def test_compile_checkpoint_reads_weights_only_for_what_it_converts(ov, models, tmp_path, monkeypatch):
    """From a file: a component's weights are read when its IR is made, and never on a second run."""
    import sd.weights
    from sd.backends.openvino import compile_checkpoint, compile_models
    from sd.weights import save_checkpoint

    path = tmp_path / "tiny.safetensors"
    save_checkpoint(models, path, TINY)
    reads = []
    real_load = sd.weights.load_models

    def counting_load(*args, **kwargs):
        if kwargs.get("device") != "meta":
            reads.append(tuple(kwargs.get("components", ())))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(sd.weights, "load_models", counting_load)
    latents = torch.randn(1, 4, 8, 8, generator=gen(11))
    first = compile_checkpoint(path, "f32", tmp_path / "cache", weights_id="tiny")
    assert reads == []  # nothing read to set up
    decoded = first["decoder"](latents)
    assert reads == [("decoder",)]
    assert max_error(decoded, models["decoder"](latents)) <= F32_TOLERANCE
    again = compile_checkpoint(path, "f32", tmp_path / "cache", weights_id="tiny")
    assert torch.equal(again["decoder"](latents), decoded)
    assert reads == [("decoder",)]  # the second run read no weights at all
    with pytest.raises(ValueError, match="weights_id= and load="):
        compile_models(sd.weights.load_models(path, device="meta"), "f32", tmp_path / "cache")


def test_sd_generate_with_the_openvino_backend(ov, models, tmp_path, monkeypatch, capsys):
    """`sd generate --backend openvino`, twice: the second run converts nothing and draws the same image,
    which is the eager one within the whole-pipeline tolerance."""
    from PIL import Image

    from sd.cli import main
    from sd.weights import save_checkpoint

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SD_HOME", str(tmp_path / "sd-home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ckpt = tmp_path / "tiny.safetensors"
    save_checkpoint(models, ckpt, TINY)
    common = ["generate", "a red fox", "--ckpt", str(ckpt), "--seed", "3", "--steps", "3", "--dtype", "fp32"]
    common += ["--width", "64", "--height", "64"]
    images = []
    for backend in ("openvino", "openvino", "torch"):
        out_file = tmp_path / f"{len(images)}.png"
        assert main([*common, "--backend", backend, "-o", str(out_file)]) == 0, capsys.readouterr().err
        images.append(np.asarray(Image.open(out_file)).astype(int))
    assert np.array_equal(images[0], images[1])
    off = np.abs(images[0] - images[2])
    assert (off <= PIPELINE_LEVELS).mean() >= PIPELINE_FRACTION
    assert len(list((tmp_path / "cache" / "sd" / "openvino").glob("*/diffusion.xml"))) == 1
