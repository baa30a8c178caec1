"""A1111's infotext (a1111-semantics.md §e): its quoting and parsing, Version back-compatibility, NovelAI
PNGs, and round trips A1111 text -> our parameters -> the same text."""

from __future__ import annotations

import json

import pytest
from PIL import Image, PngImagePlugin

from sd.images import read_png_parameters
from sd.infotext import backcompat, format_infotext, parse_infotext, parse_version, quote
from sd.params import GenerationParams

# Texts as A1111 v1.10.1 writes them, for settings we honour whole: each must come back unchanged.
ROUND_TRIPS = {
    "defaults": "a photo of a cat, (masterpiece:1.2)\nNegative prompt: lowres, bad anatomy\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly",
    "no negative": "a lighthouse\nSteps: 30, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.5, "
    "Seed: 4294967295, Size: 640x512",
    "multi-line prompts": "line one\nline two, (detail:1.1)\nNegative prompt: bad\nworse\n"
    "Steps: 20, Sampler: DPM++ SDE, Schedule type: Karras, CFG scale: 6, Seed: 5, Size: 512x512",
    "seeds and noise": "x\nSteps: 25, Sampler: DPM2 a, Schedule type: Exponential, CFG scale: 7, "
    "Seed: 10, Size: 768x512, Variation seed: 77, Variation seed strength: 0.25, Seed resize from: 512x512, "
    "Denoising strength: 0.55, Clip skip: 2, ENSD: 31337, RNG: CPU",
    "quoted values": "x\nSteps: 20, Sampler: Euler, Schedule type: Automatic, CFG scale: 7, Seed: 1, "
    'Size: 512x512, Model: "odd, name: \\"v2\\"", '
    'TI hashes: "easyneg: c74b4e810b03, bad-hands: 0123456789ab"',
    "sampler settings": "(a) [b]\nSteps: 20, Sampler: DPM2 a, Schedule type: Polyexponential, CFG scale: 7, "
    "Seed: 3, Size: 512x512, Emphasis: No norm, Schedule min sigma: 0.1, Schedule max sigma: 10, "
    "Schedule rho: 2.5, Discard penultimate sigma: True, Eta: 0.67, Sigma noise: 0.98, "
    "Pad conds: True",
    "churn and old settings": "a [cat:dog:0.5]\nSteps: 12, Sampler: Heun, Schedule type: Uniform, "
    "CFG scale: 9, Seed: 8, Size: 512x512, Denoising strength: 0.6, Sigma churn: 0.5, Sigma tmin: 0.2, "
    "Sigma tmax: 8, "
    "Noise multiplier: 0.9, Downcast alphas_cumprod: True, Old prompt editing timelines: True",
    "sgm noise": "x\nSteps: 8, Sampler: LMS, Schedule type: SGM Uniform, CFG scale: 3.5, Seed: 0, "
    "Size: 512x512, SGM noise multiplier: True",
}


@pytest.mark.parametrize("text", ROUND_TRIPS.values(), ids=ROUND_TRIPS.keys())
def test_a1111_text_comes_back_unchanged(text: str) -> None:
    params = GenerationParams.from_text(text)
    assert params.a1111 and params.unhonoured == ()
    assert params.to_text() == text


def test_what_each_key_sets() -> None:
    params = GenerationParams.from_text(ROUND_TRIPS["seeds and noise"])
    assert (params.sampler, params.schedule, params.seed, params.width, params.height) == (
        "DPM2 a", "Exponential", 10, 768, 512,
    )  # fmt: skip
    assert (params.subseed, params.subseed_strength, params.seed_resize_from) == (77, 0.25, (512, 512))
    assert (params.strength, params.clip_skip, params.ensd, params.rng) == (0.55, 2, 31337, "CPU")
    params = GenerationParams.from_text(ROUND_TRIPS["sampler settings"])
    assert (params.sigma_min, params.sigma_max, params.rho, params.discard_penultimate) == (
        0.1,
        10,
        2.5,
        True,
    )
    assert (params.eta, params.s_noise, params.emphasis, params.pad_conds) == (0.67, 0.98, "No norm", True)
    params = GenerationParams.from_text(ROUND_TRIPS["churn and old settings"])
    assert (params.s_churn, params.s_tmin, params.s_tmax, params.noise_multiplier) == (0.5, 0.2, 8, 0.9)
    assert params.downcast_alphas and params.old_prompt_editing
    assert GenerationParams.from_text(ROUND_TRIPS["quoted values"]).model == 'odd, name: "v2"'
    # A1111 names ENSD only for the samplers that use it, with eta not 0 (it is still read)
    quiet = GenerationParams.from_text(ROUND_TRIPS["defaults"] + ", ENSD: 31337")
    assert quiet.ensd == 31337 and quiet.to_text() == ROUND_TRIPS["defaults"]
    # 0 is A1111's "the schedule's own"
    text = ROUND_TRIPS["defaults"] + ", Schedule min sigma: 0, Schedule rho: 0"
    assert GenerationParams.from_text(text).sigma_min is None


def test_quoting_as_a1111() -> None:
    assert quote("plain") == "plain" and quote(7.5) == "7.5"
    assert quote("a, b") == '"a, b"' and quote("k: v") == '"k: v"'
    assert quote('say "hi", now\n') == '"say \\"hi\\", now\\n"'
    assert quote("ünïcode, ok") == '"ünïcode, ok"'  # ensure_ascii=False
    assert format_infotext("p", "", [("Steps", 2), ("Skip", None), ("Tiling", "Tiling"), ("X", "a,b")]) == (
        'p\nSteps: 2, Tiling, X: "a,b"'
    )
    assert json.loads(quote("a\\b, c")) == "a\\b, c"


def test_parsing_as_a1111() -> None:
    # A last line with fewer than three "key: value" pairs is more prompt, and there are no settings.
    assert parse_infotext("a cat: cute\nSteps: 20, Seed: 1") == ("a cat: cute\nSteps: 20, Seed: 1", "", {})
    prompt, negative, settings = parse_infotext(
        '  first \nNegative prompt:  neg one\nneg two\nSteps: 1, Sampler: Euler, Seed: 2, Bad quote: "a\\q", '
        'Model: "x, y"'
    )
    assert (prompt, negative) == ("first", "neg one\nneg two")
    assert settings == {"Steps": "1", "Sampler": "Euler", "Seed": "2", "Bad quote": '"a\\q"', "Model": "x, y"}
    with pytest.raises(ValueError, match="no 'Steps: 20, Sampler"):
        GenerationParams.from_text("just a prompt")


@pytest.mark.parametrize(
    "version, expected",
    [
        ("v1.10.1", (1, 10, 1, 0)),
        ("v1.7.0-225-g4afaaf8a", (1, 7, 0, 225)),
        ("v1.7.0-RC-5-gf92d6149", (1, 7, 0, -1)),
        ("v1.6.0", (1, 6, 0, 0)),
        ("f2.0.1v1.10.1-previous-313-g8bd7e057", None),  # Forge: not A1111's, no back-compatibility
        ("", None),
    ],
)
def test_versions(version: str, expected) -> None:
    assert parse_version(version) == expected


def test_back_compatibility_by_version() -> None:
    base = {"Steps": "20", "Sampler": "Euler a"}
    assert backcompat({**base, "Version": "v1.10.1"}, "a [b:c:3]") == {**base, "Version": "v1.10.1"}
    assert backcompat({**base, "Version": "v1.7.0-225-gabc"}, "x") == {**base, "Version": "v1.7.0-225-gabc"}
    assert backcompat({**base, "Version": "v1.7.0-224-gabc"}, "x")["Downcast alphas_cumprod"] == "True"
    old = backcompat({**base, "Sampler": "DDIM", "Version": "v1.5.2"}, "a [b:c:3]")
    assert (
        old["Old prompt editing timelines"] == old["Pad conds v0"] == old["Downcast alphas_cumprod"] == "True"
    )
    assert "Old prompt editing timelines" not in backcompat({**base, "Version": "v1.5.2"}, "no brackets")
    assert backcompat({**base, "Version": "f2.0.1v1.10.1-previous-3-gabc"}, "[a:b:1]") == {
        **base, "Version": "f2.0.1v1.10.1-previous-3-gabc",
    }  # fmt: skip


def test_old_texts_are_read_as_a1111_made_them() -> None:
    settings = "Steps: 20, CFG scale: 7, Seed: 1, Size: 512x512"
    read = lambda sampler, rest="": GenerationParams.from_text(f"x\n{settings}, Sampler: {sampler}{rest}")  # noqa: E731
    # before v1.9 the name carried the schedule, and a plain name meant the model's own
    assert (read("DPM++ 2M Karras").sampler, read("DPM++ 2M Karras").schedule) == ("DPM++ 2M", "Karras")
    assert read("DPM++ 2M SDE Exponential").schedule == "Exponential"
    assert read("DPM++ 2M", ", Version: v1.8.0").schedule == "Uniform"
    assert read("DPM++ 2M").schedule == "Uniform"  # no Version, no Schedule type: an old file
    assert read("DPM++ 2M", ", Version: v1.10.1").schedule == "Automatic"
    assert read("k_euler_a").sampler == "Euler a"
    old = read("Euler a", ", Version: v1.5.1")
    assert old.downcast_alphas and not old.old_prompt_editing
    assert GenerationParams.from_text(
        f"[a:b:0.5]\n{settings}, Sampler: Euler, Version: v1.5.1"
    ).old_prompt_editing
    assert not read("Euler a", ", Version: v1.10.1").downcast_alphas


def test_what_cannot_be_honoured_is_named() -> None:
    text = (
        "x\nSteps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1, Face restoration: "
        'CodeFormer, Size: 512x512, Model hash: abc, Token merging ratio: 0.5, Lora hashes: "a: 0123", '
        "Tiling: True, Version: v1.10.1"
    )
    params = GenerationParams.from_text(text)
    assert params.unhonoured == ("Face restoration", "Token merging ratio")
    assert params.tiling  # (honoured: sd.seamless)


def test_novelai_pngs_read_as_a1111_reads_them(tmp_path) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "NovelAI")
    info.add_text("Description", "masterpiece, 1girl")
    comment = {"steps": 28, "sampler": "k_euler_ancestral", "seed": 123, "scale": 11, "uc": "lowres, bad"}
    info.add_text("Comment", json.dumps(comment))
    Image.new("RGB", (512, 768)).save(tmp_path / "nai.png", pnginfo=info)
    text = read_png_parameters(tmp_path / "nai.png")
    assert text == (
        "masterpiece, 1girl\nNegative prompt: lowres, bad\nSteps: 28, Sampler: Euler a, CFG scale: 11, "
        "Seed: 123, Size: 512x768, Clip skip: 2, ENSD: 31337"
    )
    params = GenerationParams.from_text(text)
    assert (params.a1111, params.sampler, params.clip_skip, params.ensd, params.height) == (
        True, "Euler a", 2, 31337, 768,
    )  # fmt: skip
