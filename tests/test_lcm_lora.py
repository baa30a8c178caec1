"""The fast path: an LCM-LoRA-shaped file (sd.testing.lcm_lora_like: kohya keys over the 278 U-Net layers
diffusers' LCM-LoRA training targets) with A1111's LCM sampler, 4 steps, CFG 1, in every precision and
with the OpenVINO backend, whose converted U-Net must get the merged weights.

Tolerances, as whole uint8 images: fp16 eager and OpenVINO f32 against eager fp32, at least 99% of the
values within 2 levels (the OpenVINO tests' pipeline rule); bf16 eager (8 mantissa bits) against fp32,
a mean difference under 2 levels, where the LoRA itself moves the image by ~25.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sd.config import TINY
from sd.params import GenerationParams
from sd.pipeline import Pipeline
from sd.testing import lcm_lora_like, random_models

LEVELS, FRACTION = 2, 0.99
FAST = dict(steps=4, sampler="LCM", cfg_scale=1.0, a1111=True, seed=5, width=64, height=64)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from sd.weights import save_checkpoint

    folder = tmp_path_factory.mktemp("lcm")
    ckpt = folder / "tiny.safetensors"
    save_checkpoint(random_models(TINY, seed=21), ckpt, config=TINY)
    lora = folder / "lcm-lora-sdv1-5.safetensors"
    state = lcm_lora_like(TINY, rank=4, seed=3)
    save_file({k: v * 8 if k.endswith("up.weight") else v for k, v in state.items()}, str(lora))  # visible
    return ckpt, lora


def _image(pipe: Pipeline, prompt: str = "a red fox") -> np.ndarray:
    return np.asarray(pipe.run(GenerationParams(prompt, **FAST))[0]).astype(int)


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    return (np.abs(a - b) <= LEVELS).mean() >= FRACTION


def test_lcm_lora_shape_is_lcm_loras() -> None:
    from sd.config import SD15

    state = lcm_lora_like(SD15, rank=64)
    assert len(state) == 3 * 278
    assert (
        sum(v.numel() for k, v in state.items() if not k.endswith("alpha")) == 67_252_224
    )  # the card's 67.5M


def test_each_precision_runs_the_fast_path(files) -> None:
    ckpt, lora = files
    images = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        pipe = Pipeline.from_checkpoint(ckpt, dtype=dtype)
        plain = _image(pipe)
        pipe.set_loras([(lora, 1.0)])
        calls: list[int] = []

        def count(module, args, out, calls=calls) -> None:
            calls.append(args[0].shape[0])

        hook = pipe.models["diffusion"].register_forward_hook(count)
        images[name] = _image(pipe)
        hook.remove()
        assert calls == [1, 1, 1, 1], f"{name}: CFG 1 must cost one batch-1 U-Net call per step, got {calls}"
        assert not np.array_equal(images[name], plain), f"{name}: the LoRA changed nothing"
        text = pipe.run(GenerationParams("a red fox", **FAST))[0].info["parameters"]
        assert "Steps: 4, Sampler: LCM" in text and "CFG scale: 1," in text
        assert 'Lora hashes: "lcm-lora-sdv1-5: ' in text or "Lora hashes: lcm-lora-sdv1-5: " in text
    assert _close(images["fp16"], images["fp32"])
    assert np.abs(images["bf16"] - images["fp32"]).mean() < 2


def test_openvino_gets_the_merged_weights_and_caches_them(files, tmp_path, monkeypatch) -> None:
    pytest.importorskip("openvino")
    from sd.backends import openvino as backend

    ckpt, lora = files
    eager = Pipeline.from_checkpoint(ckpt)
    eager_plain = _image(eager)
    eager.set_loras([(lora, 1.0)])
    eager_lora = _image(eager)

    conversions = []
    convert = backend._Compiler._convert

    def counted(graph, inputs, path) -> None:
        conversions.append(path.name)
        convert(graph, inputs, path)

    monkeypatch.setattr(backend._Compiler, "_convert", staticmethod(counted))
    cache = tmp_path / "ov"
    pipe = Pipeline(backend.compile_checkpoint(ckpt, "f32", cache))
    assert _close(_image(pipe), eager_plain)
    pipe.set_loras([(lora, 1.0)])
    with_lora = _image(pipe)
    assert _close(with_lora, eager_lora) and not _close(with_lora, eager_plain)
    assert conversions.count("diffusion.xml") == 2  # the checkpoint's U-Net, then the merged one
    assert conversions.count("clip.xml") == 1  # LCM-LoRA has no text-encoder part: the IR is shared
    pipe.set_loras([])
    assert np.array_equal(_image(pipe), _image(Pipeline(backend.compile_checkpoint(ckpt, "f32", cache))))

    conversions.clear()  # a new process, the same set: everything comes from the disk cache
    again = Pipeline(backend.compile_checkpoint(ckpt, "f32", cache))
    again.set_loras([(lora, 1.0)])
    assert np.array_equal(_image(again), with_lora)
    assert conversions == []


def test_openvino_without_a_loader_says_how(files) -> None:
    pytest.importorskip("openvino")
    from sd.backends.openvino import compile_models

    _, lora = files
    pipe = Pipeline(compile_models(random_models(TINY, seed=21), "f32"))
    with pytest.raises(ValueError, match="compile_checkpoint"):
        pipe.set_loras([(lora, 1.0)])


@pytest.mark.parametrize("mode", [["--dtype", "fp32"], ["--dtype", "bf16"], ["--backend", "openvino"]])
def test_cli_fast_path(files, mode, tmp_path, capsys, monkeypatch) -> None:
    if "openvino" in mode:
        pytest.importorskip("openvino")
    from sd.cli import main
    from sd.images import read_png_parameters

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SD_HOME", str(tmp_path / "sd-home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ckpt, lora = files
    argv = ["generate", "a cat", "--ckpt", str(ckpt), "--lora", str(lora), "--sampler", "lcm", "--steps", "4"]
    argv += ["--cfg", "1", "--width", "64", "--height", "64", "--seed", "2", "-o", "out.png", *mode]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    text = read_png_parameters(out.strip())
    assert "Steps: 4, Sampler: LCM" in text and "Lora hashes" in text
