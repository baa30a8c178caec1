"""sd.guidance and the pipeline's use of A1111 prompts: which contexts each model call sees, and the sum.

A recording model stands in for the U-Net, so each test sees exactly the batches and contexts of every call.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch

from sd.conditioning import Conditioning, ScheduledConditioning
from sd.config import TINY
from sd.guidance import Guidance, UncondSkip
from sd.pipeline import Pipeline
from sd.testing import random_models

from conftest import World


def constant(value: float, chunks: int = 1, variants: int = 1, ends: list[int] | None = None):
    tensors = torch.full((variants, 77 * chunks, 4), value) + torch.arange(variants)[:, None, None] * 100
    return ScheduledConditioning(ends or [20], tensors)


class Recorder:
    """model(x, context, t): records (batch, context length, first context value of each row); predicts
    the context's first value everywhere, so the guided sum is easy to state."""

    def __init__(self):
        self.calls: list[tuple[int, int, list[float]]] = []

    def __call__(self, x, context, t):
        self.calls.append((x.shape[0], context.shape[1], context[:, 0, 0].tolist()))
        return context[:, 0, 0].reshape(-1, 1, 1, 1).expand_as(x).clone()


X = torch.zeros(2, 4, 2, 2)
T = torch.tensor(1.0)


def test_same_lengths_run_as_one_batch_negative_first() -> None:
    model = Recorder()
    out = Guidance(Conditioning(constant(1.0), [(constant(3.0), 1.0)]), 7.5)(model, X, T)
    assert model.calls == [(4, 77, [1.0, 1.0, 3.0, 3.0])]
    assert torch.equal(out, torch.full_like(X, 1.0 + 7.5 * (3.0 - 1.0)))


def test_different_lengths_run_as_two_calls_and_pad_conds_makes_one() -> None:
    model = Recorder()
    conditioning = Conditioning(constant(1.0), [(constant(3.0, chunks=2), 1.0)])
    Guidance(conditioning, 5.0)(model, X, T)
    assert model.calls == [(2, 77, [1.0, 1.0]), (2, 154, [3.0, 3.0])]
    model = Recorder()
    padded = Conditioning(constant(1.0), [(constant(3.0, chunks=2), 1.0)], empty=torch.full((77, 4), -1.0))
    Guidance(padded, 5.0)(model, X, T)
    assert model.calls == [(4, 154, [1.0, 1.0, 3.0, 3.0])]


def test_and_parts_are_weighted_and_padded_by_repeating_the_last_vector() -> None:
    model = Recorder()
    parts = [(constant(3.0), 1.0), (constant(5.0, chunks=2), 0.5)]
    out = Guidance(Conditioning(constant(1.0, chunks=2), parts), 2.0)(model, X, T)
    assert model.calls == [(6, 154, [1.0, 1.0, 3.0, 3.0, 5.0, 5.0])]
    assert torch.equal(out, torch.full_like(X, 1.0 + 2.0 * 1.0 * (3.0 - 1.0) + 2.0 * 0.5 * (5.0 - 1.0)))


def test_prompt_editing_switches_by_model_call_count() -> None:
    model = Recorder()
    guidance = Guidance(Conditioning(constant(1.0), [(constant(3.0, variants=2, ends=[2, 4]), 1.0)]), 7.0)
    for _ in range(4):
        guidance(model, X, T)
    # calls 0..2 use the first variant (end_at_step 2 includes call 2), call 3 the second
    assert [calls[2][-1] for calls in model.calls] == [3.0, 3.0, 3.0, 103.0]


def test_a1111_skips_of_the_negative_pass() -> None:
    """A1111's CFGDenoiser (v1.10.1): "Skip Early CFG" while call / total_steps <= the fraction, NGMS on odd
    calls below its sigma (every call with "all steps"); a skipped call runs the conditional rows alone and
    combines the AND parts around the first at scale 1."""
    parts = [(constant(3.0), 1.0), (constant(5.0), 0.5)]
    conditioning = Conditioning(constant(1.0), parts)
    guided = 1.0 + 7.0 * (3.0 - 1.0) + 7.0 * 0.5 * (5.0 - 1.0)
    skipped = 3.0 + 0.5 * (5.0 - 3.0)
    for skip, sigmas, expected, reasons in [
        (UncondSkip(4, early=0.3), [9, 5, 2, 1], [skipped, skipped, guided, guided], {"early"}),
        (UncondSkip(4, min_sigma=3.0), [9, 5, 2, 1], [guided, guided, guided, skipped], {"ngms"}),
        (UncondSkip(4, min_sigma=6.0), [9, 5, 2, 1], [guided, skipped, guided, skipped], {"ngms"}),
        (UncondSkip(4, min_sigma=6.0, every_call=True), [9, 5, 2, 1], [guided, skipped, skipped, skipped],
         {"ngms"}),
        (UncondSkip(4, early=0.25, min_sigma=6.0), [9, 5, 2, 1], [skipped, skipped, guided, skipped],
         {"early", "ngms"}),
        (UncondSkip(4, min_sigma=0.5), [9, 5, 2, 1], [guided] * 4, set()),
    ]:  # fmt: skip
        model, guidance = Recorder(), Guidance(conditioning, 7.0, a1111=True, skip=skip)
        outs = [guidance(model, X, torch.tensor(float(s)))[0, 0, 0, 0].item() for s in sigmas]
        assert outs == pytest.approx(expected), skip
        assert [batch for batch, _, _ in model.calls] == [4 if o == skipped else 6 for o in expected], skip
        assert guidance.skipped == reasons, skip


def test_below_cfg_1_a_plain_prompt_runs_alone_but_and_still_guides() -> None:
    model = Recorder()
    Guidance(Conditioning(constant(1.0), [(constant(3.0), 1.0)]), 1.0)(model, X, T)
    assert model.calls == [(2, 77, [3.0, 3.0])]
    model = Recorder()
    out = Guidance(Conditioning(constant(1.0), [(constant(3.0), 1.5)]), 1.0)(model, X, T)
    assert len(model.calls[0][2]) == 4 and torch.equal(out, torch.full_like(X, 1.0 + 1.5 * 2.0))


# --- in the pipeline ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline(random_models(TINY, seed=3))


def contexts_seen(pipe: Pipeline, **kwargs) -> list[torch.Tensor]:
    seen = []
    unet = pipe.models["diffusion"]
    original = unet.forward

    def record(latents, context, timestep, control=None):
        seen.append(context.clone())
        return original(latents, context, timestep, control)

    unet.forward = record
    try:
        pipe.txt2img(width=64, height=64, seed=1, **kwargs)
    finally:
        del unet.forward
    return seen


@torch.no_grad()
def test_plain_prompts_condition_exactly_as_before(pipe) -> None:
    """No syntax, <= 75 tokens: one U-Net batch of [negative, prompt] whose context is the text encoder's
    output for that batch, bit for bit (what every diffusers parity test was written against)."""
    prompt, negative = "a watercolor painting of a lighthouse", "blurry"
    (context, *_) = contexts_seen(pipe, prompt=prompt, negative_prompt=negative, steps=2)
    ids = torch.tensor(pipe.tokenizer.batch_encode_plus([negative, prompt], padding="max_length",
                                                        max_length=77).input_ids)  # fmt: skip
    before = pipe.models["clip"](ids)
    assert torch.equal(context, torch.cat([before[:1], before[1:]]))


@torch.no_grad()
def test_long_prompts_reach_the_unet_whole(pipe) -> None:
    seen = contexts_seen(pipe, prompt="a cat, " * 40, negative_prompt="", steps=2, sampler="euler")
    assert [c.shape[1] for c in seen] == [77, 154, 77, 154]  # uncond then cond, each step
    images = pipe.txt2img("a cat, " * 40, steps=2, seed=1, width=64, height=64)
    truncated = pipe.txt2img(("a cat, " * 40)[:150], steps=2, seed=1, width=64, height=64)
    assert images[0].tobytes() != truncated[0].tobytes()


@torch.no_grad()
def test_prompt_editing_in_the_pipeline_counts_model_calls(pipe) -> None:
    seen = contexts_seen(pipe, prompt="[cat:dog:2]", steps=4, sampler="euler", cfg_scale=1.0)
    encoder = pipe.prompt_encoder()
    (cat,), _ = encoder.encode_groups([["cat"]])
    (dog,), _ = encoder.encode_groups([["dog"]])
    assert [torch.equal(c[0], cat[0]) for c in seen] == [True, True, True, False]
    assert torch.equal(seen[3][0], dog[0])
    # A second-order sampler counts schedule steps twice: heun, 3 steps = 6 schedule steps, 5 calls.
    seen = contexts_seen(pipe, prompt="[cat:dog:0.5]", steps=3, sampler="heun", cfg_scale=1.0)
    assert [torch.equal(c[0], cat[0]) for c in seen] == [True] * 4 + [False]


def test_tags_are_taken_out_and_named(pipe, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="sd"):
        tagged = pipe.txt2img("a cat <lora:ink:0.8>", steps=1, seed=1, width=64, height=64)
    assert any(
        "<lora:ink:0.8>" in r.getMessage() and "no LoRA named 'ink'" in r.getMessage() for r in caplog.records
    )
    plain = pipe.txt2img("a cat ", steps=1, seed=1, width=64, height=64)
    assert tagged[0].tobytes() == plain[0].tobytes()


def test_embeddings_in_a_run_and_its_png_parameters(tmp_path) -> None:
    import hashlib

    from sd.params import GenerationParams

    torch.save({"string_to_param": {"*": torch.randn(2, TINY.clip.width)}}, tmp_path / "EasyNegative.pt")
    pipe = Pipeline(random_models(TINY, seed=3), embeddings=tmp_path)
    (image,) = pipe.txt2img("a cat", negative_prompt="EasyNegative", steps=1, seed=1, width=64, height=64)
    params = GenerationParams.from_text(image.info["parameters"])
    digest = hashlib.sha256((tmp_path / "EasyNegative.pt").read_bytes()).hexdigest()[:12]
    assert params.ti_hashes == f"EasyNegative: {digest}"
    (without,) = Pipeline(pipe.models).txt2img("a cat", negative_prompt="EasyNegative", steps=1, seed=1,
                                               width=64, height=64)  # fmt: skip
    assert image.tobytes() != without.tobytes() and "TI hashes" not in without.info["parameters"]


def test_emphasis_mode_and_pad_conds_are_recorded_and_read_back(pipe) -> None:
    from sd.params import GenerationParams

    (image,) = pipe.txt2img("a (cat:1.3)", steps=1, seed=1, width=64, height=64)
    assert "Emphasis" not in image.info["parameters"]
    params = GenerationParams("a (cat:1.3)", steps=1, sampler="euler", seed=1, width=64, height=64,
                              emphasis="No norm", pad_conds=True)  # fmt: skip
    (image,) = pipe.run(params)
    assert "Emphasis: No norm" in image.info["parameters"] and "Pad conds" not in image.info["parameters"]
    (image,) = pipe.run(replace(params, prompt="a (cat:1.3), " * 30))  # 154 tokens against 77: padded
    text = image.info["parameters"]
    assert "Emphasis: No norm" in text and "Pad conds: True" in text
    again = GenerationParams.from_text(text)
    assert again.emphasis == "No norm" and again.pad_conds
    with pytest.raises(ValueError, match="emphasis must be one of"):
        pipe.run(GenerationParams("x", steps=1, seed=1, width=64, height=64, emphasis="Strong"))


def test_unet_takes_any_multiple_of_77_tokens_like_diffusers(world: World) -> None:
    if world.name != "tiny":
        pytest.skip("cross-attention length is architecture-independent; the tiny model proves it")
    from test_parity import assert_close

    gen = torch.Generator().manual_seed(4)
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 231, world.config.unet.context_dim, generator=gen)
    ref = world.unet(latents, 500, encoder_hidden_states=context).sample
    assert_close(world.ours["diffusion"](latents, context, 500), ref, "unet with 231 context tokens")
