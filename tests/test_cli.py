"""The `sd` command line, end to end on a tiny checkpoint: outputs, PNG parameters, reproduction,
and one clear line with a non-zero exit for every kind of bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd.cli import main
from sd.config import TINY
from sd.images import read_png_parameters
from sd.params import GenerationParams
from sd.samplers import SAMPLERS
from sd.testing import random_models
from sd.weights import save_checkpoint

FAST = ["--steps", "3", "--width", "64", "--height", "64"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(random_models(TINY, seed=5), path, config=TINY)
    return str(path)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Run in a scratch folder with no checkpoint configured anywhere."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SD_CHECKPOINT", raising=False)
    monkeypatch.setenv("SD_HOME", str(tmp_path / "sd-home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_writes_png_with_parameters(ckpt, capsys, tmp_path) -> None:
    code, out, err = run(
        capsys,
        "generate",
        "a red fox",
        "--negative",
        "blurry, dark",
        "--ckpt",
        ckpt,
        "--seed",
        "42",
        "--sampler",
        "euler",
        "--karras",
        "-n",
        "2",
        *FAST,
    )
    assert code == 0, err
    paths = out.split()
    assert len(paths) == 2 and all(p.endswith(".png") for p in paths)
    assert "sampling" in err  # a progress bar
    params = GenerationParams.from_text(read_png_parameters(paths[1]))
    # A1111's way by default: our sampler names are read as A1111's, and each image is its own seed
    assert (params.prompt, params.negative_prompt, params.seed, params.steps) == (
        "a red fox",
        "blurry, dark",
        43,
        3,
    )
    assert params.a1111 and (params.sampler, params.schedule, params.width, params.height) == (
        "Euler",
        "Karras",
        64,
        64,
    )
    assert params.model_hash and len(params.model_hash) == 10
    assert not np.array_equal(pixels(paths[0]), pixels(paths[1]))
    flags = ["--seed", "42", "--sampler", "euler", "--karras", "-n", "2", "--way", "diffusers", "-o", "d.png"]
    code, out, err = run(capsys, "generate", "a red fox", "--ckpt", ckpt, *flags, *FAST)
    assert code == 0, err
    params = GenerationParams.from_text(read_png_parameters(out.split()[1]))
    assert not params.a1111 and (params.sampler, params.karras, params.seed) == ("euler", True, 42)
    assert (params.batch_size, params.batch_pos) == (2, 1)


@pytest.mark.parametrize("way", ["a1111", "diffusers"])
def test_from_png_reproduces_each_image_of_a_batch(ckpt, capsys, way) -> None:
    code, out, _ = run(capsys, "generate", "a blue square", "--ckpt", ckpt, "--seed", "7", "-n", "2",
                       "--way", way, *FAST)  # fmt: skip
    first, second = out.split()
    for original in (first, second):
        code, out, err = run(capsys, "generate", "--from-png", original, "--ckpt", ckpt, "-o", "again.png")
        assert code == 0, err
        assert np.array_equal(pixels(out.strip()), pixels(original))
    # Flags override what the PNG says.
    code, out, _ = run(capsys, "generate", "--from-png", first, "--ckpt", ckpt, "--seed", "8", "-n", "1")
    assert GenerationParams.from_text(read_png_parameters(out.strip())).seed == 8


def test_outputs_never_overwrite(ckpt, capsys) -> None:
    Image.new("RGB", (8, 8)).save("mine.png")
    before = pixels("mine.png").copy()
    code, out, _ = run(capsys, "generate", "x", "--ckpt", ckpt, "-o", "mine.png", "--seed", "1", *FAST)
    assert code == 0 and out.strip() != "mine.png"
    assert np.array_equal(pixels("mine.png"), before)


def test_checkpoint_found_from_env_and_default_folder(ckpt, capsys, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SD_CHECKPOINT", ckpt)
    assert run(capsys, "generate", "x", "--seed", "1", *FAST)[0] == 0
    monkeypatch.delenv("SD_CHECKPOINT")
    models = tmp_path / "sd-home" / "models"
    models.mkdir(parents=True)
    (models / "v1-5-pruned-emaonly.safetensors").symlink_to(ckpt)
    assert run(capsys, "generate", "x", "--seed", "1", *FAST)[0] == 0


def test_img2img_converts_odd_image_modes(ckpt, capsys, tmp_path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (70, 90, 4), dtype=np.uint8), "RGBA").save("rgba.png")
    Image.fromarray(rng.integers(0, 65535, (70, 90), dtype=np.uint16)).save("grey16.png")
    Image.fromarray(rng.integers(0, 255, (70, 90), dtype=np.uint8), "L").save("grey.png")
    for name in ("rgba.png", "grey16.png", "grey.png"):
        code, out, err = run(
            capsys,
            "generate",
            "a cat",
            "--ckpt",
            ckpt,
            "--init-image",
            name,
            "--strength",
            "0.5",
            "--steps",
            "4",
            "--seed",
            "3",
        )
        assert code == 0, err
        result = Image.open(out.strip())
        assert result.size == (88, 64)  # the input's size rounded down to a multiple of 8
        params = GenerationParams.from_text(read_png_parameters(out.strip()))
        assert params.strength == 0.5


def test_long_prompt_is_used_whole(ckpt, capsys) -> None:
    prompt = "a very long prompt about cats " * 20  # 120 tokens: two chunks, nothing dropped
    code, out, err = run(capsys, "generate", prompt, "--ckpt", ckpt, *FAST)
    assert code == 0 and "warning" not in err, err
    # (the trailing space goes, as in A1111's reading; CLIP never sees it)
    assert GenerationParams.from_text(read_png_parameters(out.strip())).prompt == prompt.strip()


WORDS = """stars moon clouds river forest mountain lake snow rain wind fire smoke light shadow glass stone
    wood metal gold silver red blue green yellow purple orange black white gray pink brown cyan magenta
    lantern bridge tower castle garden field ocean wave sand shell bird cat dog horse fox owl wolf bear
    deer"""
LONG = (
    "masterpiece, best quality, (detailed face:1.2), [blurry], a castle on a hill at dusk BREAK night sky, "
    + ", ".join(WORDS.split())
    + " <lora:ink_style:0.8>"
)


def test_sd_prompt_shows_how_a_prompt_is_read(capsys, tmp_path) -> None:
    torch.save({"string_to_param": {"*": torch.zeros(3, 768)}}, tmp_path / "EasyNegative.pt")
    code, out, err = run(capsys, "prompt", LONG, "--negative", "EasyNegative, (worst quality:1.4)",
                         "--embeddings-dir", str(tmp_path))  # fmt: skip
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "prompt: 182/225 tokens, 3 chunks of 75"  # 17 before BREAK, then 75 + 32
    assert "'detailed face' x1.2" in lines[1] and "'blurry' x0.9091" in lines[1] and " | BREAK | " in lines[1]
    assert lines[2].startswith(
        "  chunk 1 (17 tokens): masterpiece , best quality , (detailed:1.2) (face:1.2)"
    )
    assert lines[3].startswith("  chunk 2 (75 tokens): night sky , stars ,") and lines[3].endswith(" tower")
    assert (
        lines[4]
        == "  chunk 3 (32 tokens): , castle , garden , field , ocean , wave , sand , shell , bird , cat "
        ", dog , horse , fox , owl , wolf , bear , deer"
    )  # the comma after a full chunk starts the next one
    assert "negative prompt: 6/75 tokens, 1 chunk of 75" in out
    assert "chunk 1 (6 tokens): <EasyNegative> , (worst:1.4) (quality:1.4)" in out
    assert "embedding EasyNegative: 3 vector(s)" in out
    assert "tag <lora:ink_style:0.8>: LoRA 'ink_style', text encoder 0.8, U-Net 0.8" in out
    assert out.rstrip().endswith(f"embeddings in {tmp_path}: 1 usable")
    code, out, _ = run(capsys, "prompt", "a [cat:dog:0.5] AND a hat:1.2", "--steps", "10")
    assert "prompt part 1 of 2 (weight 1): changes during sampling (10 steps):" in out
    assert "  steps 1-5: 'a cat'" in out and "  steps 6-10: 'a dog'" in out
    assert "prompt part 2 of 2 (weight 1.2): 2/75 tokens" in out


def test_generate_with_an_embeddings_folder(ckpt, capsys, tmp_path) -> None:
    torch.save({"string_to_param": {"*": torch.randn(2, TINY.clip.width)}}, tmp_path / "mytok.pt")
    code, out, err = run(
        capsys, "generate", "a mytok", "--ckpt", ckpt, "--embeddings-dir", str(tmp_path), *FAST
    )
    assert code == 0, err
    assert "embeddings: mytok" in err
    assert 'TI hashes: "mytok: ' in read_png_parameters(out.strip())  # quoted, as A1111 quotes it


def test_empty_prompt_is_unconditional(ckpt, capsys) -> None:
    code, out, err = run(capsys, "generate", "", "--ckpt", ckpt, "--seed", "2", *FAST)
    assert code == 0, err
    assert GenerationParams.from_text(read_png_parameters(out.strip())).prompt == ""


BAD = {
    "no checkpoint": (["x"], "no checkpoint found"),
    "missing file": (["x", "--ckpt", "nope.safetensors"], "checkpoint not found"),
    "unknown sampler": (["x", "--sampler", "foo"], "unknown sampler 'foo'"),
    "size not multiple of 8": (["x", "--width", "100"], "multiple of 8"),
    "size too large": (["x", "--height", "8192"], "between 64 and 2048"),
    "strength > 1": (["x", "--init-image", "in.png", "--strength", "1.5"], "strength must be in (0, 1]"),
    "strength 0": (["x", "--init-image", "in.png", "--strength", "0"], "strength must be in (0, 1]"),
    "strength without image": (["x", "--strength", "0.5"], "--strength needs --init-image"),
    "steps 0": (["x", "--steps", "0"], "steps must be at least 1"),
    "unreadable image": (["x", "--init-image", "notes.txt"], "cannot read image"),
    "missing image": (["x", "--init-image", "none.png"], "image not found"),
    "karras where none": (
        ["x", "--sampler", "euler_a", "--karras", "--way", "diffusers"],
        "no Karras schedule",
    ),
    "unknown schedule type": (["x", "--scheduler", "fast"], "unknown schedule type 'fast'"),
    "missing LoRA folder": (["x", "--lora-dir", "nowhere"], "LoRA folder not found"),
    "no prompt": ([], "give a prompt"),
    "png without parameters": (["--from-png", "in.png"], "no generation parameters"),
    "bad emphasis weight": (["a (cat:1.2.3)"], "'1.2.3' in ':1.2.3)' is not a number"),
    "missing embeddings folder": (["x", "--embeddings-dir", "nowhere"], "embeddings folder not found"),
    "NGMS the diffusers way": (["x", "--way", "diffusers", "--ngms", "1"], "they need --way a1111"),
    "tiling decoded in tiles": (["x", "--tiling", "--vae-tiling", "on"], "tiling decodes the image whole"),
    "negative NGMS": (["x", "--ngms", "-1"], "NGMS must be >= 0"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_nonzero(case, ckpt, capsys, monkeypatch) -> None:
    Image.new("RGB", (64, 64)).save("in.png")
    with open("notes.txt", "w") as f:
        f.write("not an image")
    argv, message = BAD[case]
    if case not in ("no checkpoint", "missing file"):
        monkeypatch.setenv("SD_CHECKPOINT", ckpt)
    monkeypatch.setattr("sd.checkpoints.BUILTIN_MODEL", Path("no-builtin-model.safetensors"))
    code, out, err = run(capsys, "generate", *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("sd generate: error: "), err
    assert message in err
    assert out == ""


def test_not_a_model_is_one_line(capsys, tmp_path) -> None:
    (tmp_path / "junk.ckpt").write_bytes(b"\x00garbage" * 100)
    code, out, err = run(capsys, "generate", "x", "--ckpt", "junk.ckpt", *FAST)
    errors = [line for line in err.splitlines() if line.startswith("sd generate: error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "not a model" in errors[0]
    code, out, err = run(capsys, "info", "junk.ckpt")
    assert code != 0 and "Traceback" not in out + err


def test_samplers_and_info(ckpt, capsys) -> None:
    from sd.samplers.a1111 import LABELS

    code, out, _ = run(capsys, "samplers")
    assert code == 0 and all(name in out for name in [*SAMPLERS, *LABELS])
    assert "  DPM++ 2M           Karras  [alias k_dpmpp_2m]\n" in out
    assert "  Euler a            the model's own (Uniform)  [alias k_euler_a, k_euler_ancestral]\n" in out
    assert "  DDIM               none: its own timesteps" in out
    assert "schedule types: Automatic, Uniform, Karras, Exponential," in out
    code, out, _ = run(capsys, "info", ckpt)
    assert code == 0 and "SD1.x" in out


def test_python_dash_m_and_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sd", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and "generate" in result.stdout and "info" in result.stdout
    result = subprocess.run(
        [sys.executable, "-m", "sd", "generate", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "--from-png" in result.stdout and "examples:" in result.stdout


def test_builtin_model_when_no_checkpoint(capsys, tmp_path, caplog) -> None:
    """No checkpoint anywhere: txt2img, img2img and the Python API all fall back to the shipped model."""
    from sd.checkpoints import BUILTIN_MODEL
    from sd.pipeline import Pipeline

    if not BUILTIN_MODEL.is_file():
        pytest.skip("the built-in model is not trained yet (scripts/train_builtin.sh)")
    code, out, err = run(
        capsys, "generate", "a red circle on a blue background", "--seed", "0", "--steps", "3"
    )
    assert code == 0, err
    assert "built-in shapes model" in err and "--ckpt" in err
    assert Image.open(out.strip()).size == (64, 64)  # the model's own size when none is given
    code, _, err = run(
        capsys, "generate", "a green square on a white background", "--init-image", out.strip(),
        "--strength", "0.5", "--steps", "4", "-o", str(tmp_path / "i2i.png"),
    )  # fmt: skip
    assert code == 0, err
    assert "built-in shapes model" in err and Image.open(tmp_path / "i2i.png").size == (64, 64)
    capsys.readouterr()
    with caplog.at_level("WARNING", logger="sd"):
        pipe = Pipeline.from_checkpoint()
    # The CLI above gave the "sd" logger its stderr handler (no propagation to caplog); alone, caplog sees it.
    assert "built-in shapes model" in caplog.text + capsys.readouterr().err
    assert pipe.model_name == BUILTIN_MODEL.stem
    assert pipe.txt2img("a red circle", steps=2, seed=0)[0].size == (64, 64)  # its size, not SD's 512


def test_a1111_way_from_the_command_line_and_back_from_its_png(ckpt, capsys, tmp_path) -> None:
    flags = ["--ckpt", ckpt, "--width", "64", "--height", "64", "--steps", "4", "--seed", "9"]
    code, _, err = run(capsys, "generate", "a (red:1.2) fox", "--way", "a1111", "--sampler", "DPM++ 2M",
                         "--scheduler", "karras", "--rng", "cpu", "--ensd", "31337", "--variation-seed", "5",
                         "--variation-strength", "0.3", "--skip-early-cfg", "0.25", "--ngms", "5",
                         "--tiling", "-o", str(tmp_path / "a.png"), *flags)  # fmt: skip
    assert code == 0, err
    text = read_png_parameters(tmp_path / "a.png")
    expected_parts = (
        "Sampler: DPM++ 2M, Schedule type: Karras",
        "Variation seed: 5, Variation seed strength: 0.3",
        "RNG: CPU",  # (no ENSD: A1111 names it only for samplers that use it, DPM++ 2M does not)
        "Skip Early CFG: 0.25, NGMS: 5",
        "RNG: CPU, Tiling: True,",
    )
    for part in expected_parts:
        assert part in text, text
    assert "Sampling" not in text  # an A1111 infotext, nothing of ours
    code, _, err = run(capsys, "generate", "--from-png", str(tmp_path / "a.png"), "--ckpt", ckpt,
                         "-o", str(tmp_path / "b.png"))  # fmt: skip
    assert code == 0, err
    first, again = (np.asarray(Image.open(tmp_path / n)) for n in ("a.png", "b.png"))
    assert np.array_equal(first, again)
    # our names in A1111's way (the default, with A1111's defaults: DPM++ 2M, Karras, CFG 7), and a
    # diffusers-way PNG says which way it was
    code, _, err = run(capsys, "generate", "a fox", "--sampler", "euler_a", "-o", str(tmp_path / "c.png"),
                       *flags)  # fmt: skip
    assert code == 0 and "Sampler: Euler a, Schedule type: Automatic" in read_png_parameters(
        tmp_path / "c.png"
    )
    code, _, err = run(capsys, "generate", "a fox", "-o", str(tmp_path / "e.png"), *flags)
    assert "Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7," in read_png_parameters(
        tmp_path / "e.png"
    )
    code, _, err = run(
        capsys, "generate", "a fox", "--way", "diffusers", "-o", str(tmp_path / "d.png"), *flags
    )
    text = read_png_parameters(tmp_path / "d.png")
    assert "Sampler: dpmpp_2m, CFG scale: 7.5," in text and "Sampling: diffusers" in text


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ SDE Karras", "DDIM", "UniPC", "Restart", "LCM"])
def test_an_a1111_png_is_made_a1111s_way_with_what_cannot_be_honoured_named(
    ckpt, capsys, tmp_path, sampler
) -> None:
    from sd.images import save_png
    from sd.pipeline import Pipeline
    from sd.weights import load_models

    text = (f"a lighthouse\nNegative prompt: blurry\nSteps: 3, Sampler: {sampler}, Schedule type: Automatic, "
            "CFG scale: 7, Seed: 42, Face restoration: CodeFormer, Size: 64x64, Model hash: 0000000000, "
            "Model: other, Tiling: True, "
            "Version: v1.10.1")  # fmt: skip
    save_png(Image.new("RGB", (64, 64)), tmp_path / "a1111.png", text)
    code, _, err = run(capsys, "generate", "--from-png", str(tmp_path / "a1111.png"), "--ckpt", ckpt,
                         "-o", str(tmp_path / "ours.png"))  # fmt: skip
    assert code == 0, err
    assert "warning: Face restoration (from the PNG) is not supported yet" in err
    assert "Tiling" not in err and "Tiling: True" in read_png_parameters(tmp_path / "ours.png")
    assert "model hash 0000000000" in err
    expected = Pipeline(load_models(ckpt)).run(GenerationParams.from_text(text))[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "ours.png")), np.asarray(expected))
