"""LoRA / LyCORIS files applied as A1111 applies them (sd.networks, Pipeline.set_loras, prompt tags).

Reference: diffusers' `load_lora_weights` (with peft) on the offline-built reference models of the
`world` fixture, which hold the same random weights as ours. diffusers runs the LoRA unmerged
(W x + s B A x), we merge it (W + s B A), so the outputs agree up to fp32 rounding:
max |ours - reference| <= 1e-5 * max(1, max |reference|). LoHa / LoKr / DoRA, which diffusers does not
load for SD1.5, are checked against their formulas written out here.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import pickle
import struct
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sd.config import TINY
from sd.keymap import diffusers_key_map
from sd.networks import delta_weight, load_lora, lora_hashes
from sd.params import GenerationParams
from sd.pipeline import Pipeline
from sd.testing import random_models
from sd.tokenizer import CLIPTokenizer

from conftest import World

RTOL = 1e-5
PROMPTS = ["a photograph of an astronaut riding a horse", ""]
# kohya's usual settings: one alpha for linear / 1x1 layers (network_alpha), one for 3x3 convs (conv_alpha);
# the text encoder's alpha may differ (diffusers takes the most common one per model).
RANK, ALPHA, CONV_RANK, CONV_ALPHA, TE_ALPHA = 4, 2.0, 2, 1.0, 3.0


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    diff = (ours - ref).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    print(f"{what}: max abs diff {diff:.3g}, relative {diff / scale:.3g} (reference scale {scale:.3g})")
    assert diff <= rtol * scale, f"{what}: max abs diff {diff:.3g} > {rtol} * {scale:.3g}"


# --- random LoRA files over the reference models' module names ---------------------------------------

_UNET_BLOCKS = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")
_TE_BLOCKS = ("CLIPAttention", "CLIPMLP")


def _targets(model: torch.nn.Module, blocks: tuple[str, ...]) -> list[tuple[str, torch.nn.Module]]:
    """The Linear / Conv2d children of the block types kohya's LoCon targets, by diffusers path."""
    out = []
    for name, block in model.named_modules():
        if type(block).__name__ in blocks:
            for child, layer in block.named_modules():
                if child and isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                    out.append((f"{name}.{child}", layer))
    return out


def _pair(layer: torch.nn.Module, rank: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) with non-zero values (a zero up would make every comparison pass)."""
    if isinstance(layer, torch.nn.Conv2d):
        out_ch, in_ch, kh, kw = layer.weight.shape
        down = torch.randn(rank, in_ch, kh, kw, generator=gen) * 0.1
        up = torch.randn(out_ch, rank, 1, 1, generator=gen) * 0.1
    else:
        out_ch, in_ch = layer.weight.shape
        down = torch.randn(rank, in_ch, generator=gen) * 0.1
        up = torch.randn(out_ch, rank, generator=gen) * 0.1
    return down, up


def kohya_lora(world: World, seed: int = 0, ldm_names: bool = False, locon: bool = True) -> dict:
    """A kohya-format LoRA (lora_unet_* / lora_te_*, lora_down / lora_up / alpha) over the world's models."""
    gen = torch.Generator().manual_seed(seed)
    unet_map = diffusers_key_map(world.config)["unet"]
    state = {}
    for path, layer in _targets(world.unet, _UNET_BLOCKS if locon else _UNET_BLOCKS[:1]):
        conv3 = isinstance(layer, torch.nn.Conv2d) and layer.kernel_size != (1, 1)
        rank, alpha = (CONV_RANK, CONV_ALPHA) if conv3 else (RANK, ALPHA)
        if ldm_names:
            path = unet_map[path + ".weight"].removeprefix("model.diffusion_model.").removesuffix(".weight")
        name = "lora_unet_" + path.replace(".", "_")
        down, up = _pair(layer, rank, gen)
        state |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
        state[f"{name}.alpha"] = torch.tensor(alpha)
    for path, layer in _targets(world.text_encoder, _TE_BLOCKS):
        name = "lora_te_text_model_" + path.removeprefix("text_model.").replace(".", "_")
        down, up = _pair(layer, RANK, gen)
        state |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
        state[f"{name}.alpha"] = torch.tensor(TE_ALPHA)
    return state


def peft_lora(world: World, seed: int = 1) -> dict:
    """A diffusers / peft-format LoRA (unet.* / text_encoder.*, lora_A / lora_B), no alpha tensors."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    parts = (("unet.", world.unet, _UNET_BLOCKS), ("text_encoder.", world.text_encoder, _TE_BLOCKS))
    for prefix, model, blocks in parts:
        for path, layer in _targets(model, blocks):
            if prefix == "text_encoder.":
                path = "text_model." + path.removeprefix("text_model.")
            down, up = _pair(layer, RANK, gen)
            state |= {f"{prefix}{path}.lora_A.weight": down, f"{prefix}{path}.lora_B.weight": up}
    return state


@pytest.fixture
def reference(world: World):
    """A diffusers StableDiffusionPipeline over (copies of, when small) the world's reference models."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from reference import reference_tokenizer

    small = world.name == "tiny"
    unet, text_encoder = (copy.deepcopy(m) if small else m for m in (world.unet, world.text_encoder))
    pipe = StableDiffusionPipeline(vae=world.vae, text_encoder=text_encoder, tokenizer=reference_tokenizer(),
                                   unet=unet, scheduler=DDIMScheduler(clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    yield pipe
    if not small:
        pipe.unload_lora_weights()


@pytest.fixture
def ours(world: World):
    """A Pipeline over the world's own models; every test leaves their weights as it found them (bit for
    bit: compared by sha256, which costs no copy of the full-size models)."""
    before = _digests(world)
    pipe = Pipeline(world.ours)
    yield pipe
    pipe.set_loras([])
    assert _digests(world) == before, "weights not restored"


def _digests(world: World) -> dict[str, str]:
    # A weight that is parametrized (un-merged LoRA) is stored as parametrizations.weight.original.
    return {
        f"{name}.{k.replace('.parametrizations.weight.original', '.weight')}": hashlib.sha256(
            v.detach().reshape(-1).view(torch.uint8).numpy()
        ).hexdigest()
        for name in ("clip", "diffusion")
        for k, v in world.ours[name].state_dict().items()
        if v.dim()
    }


def _inputs(world: World) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 77, world.config.clip.width, generator=gen)
    return latents, context, CLIPTokenizer()(PROMPTS)


def _unet_out(world: World, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    return world.ours["diffusion"](latents, context, torch.tensor([999, 300]))


@torch.no_grad()
def _check_against_diffusers(world, reference, ours, path, label: str, strength: float = 1.0) -> None:
    latents, context, tokens = _inputs(world)
    reference.load_lora_weights(str(path), adapter_name="t")
    if strength != 1.0:
        reference.set_adapters(["t"], adapter_weights=[strength])
    ref_unet = reference.unet(latents, torch.tensor([999, 300]), encoder_hidden_states=context).sample
    ref_te = reference.text_encoder(tokens).last_hidden_state
    plain = _unet_out(world, latents, context)
    ours.set_loras([(path, strength)])
    assert_close(_unet_out(world, latents, context), ref_unet, f"{world.name} {label} U-Net x{strength}")
    assert_close(world.ours["clip"](tokens), ref_te, f"{world.name} {label} text encoder x{strength}")
    assert (ref_unet - plain).abs().max() > 1e-3, "a LoRA that changes nothing would prove nothing"


def test_kohya_locon_matches_diffusers(world: World, reference, ours, tmp_path) -> None:
    """The one test that also runs at SD1.5's real shapes (the `world` fixture's slow parameter)."""
    path = tmp_path / "style.safetensors"
    save_file(kohya_lora(world), str(path))
    _check_against_diffusers(world, reference, ours, path, "kohya LoCon")
    if world.name == "sd15":
        return
    reference.unload_lora_weights()
    _check_against_diffusers(world, reference, ours, path, "kohya LoCon", strength=0.7)


def test_peft_lora_matches_diffusers(world: World, reference, ours, tmp_path) -> None:
    if world.name != "tiny":
        pytest.skip("one full-size LoRA test is enough (kohya LoCon)")
    path = tmp_path / "peft.safetensors"
    # diffusers' own saved LoraConfig carries the alpha (here 8 for rank 4: scale 2)
    # (its target_modules: the exact module paths; peft needs them to build the adapter)
    targets = {"unet": [p for p, _ in _targets(world.unet, _UNET_BLOCKS)],
               "text_encoder": [p for p, _ in _targets(world.text_encoder, _TE_BLOCKS)]}  # fmt: skip
    meta = {f"{p}.{k}": v for p, names in targets.items()
            for k, v in (("r", RANK), ("lora_alpha", 8), ("target_modules", names))}  # fmt: skip
    save_file(peft_lora(world), str(path), metadata={"lora_adapter_metadata": json.dumps(meta)})
    _check_against_diffusers(world, reference, ours, path, "peft")
    reference.unload_lora_weights()
    bare = tmp_path / "peft_bare.safetensors"  # no metadata: scale 1
    save_file(peft_lora(world), str(bare))
    _check_against_diffusers(world, reference, ours, bare, "peft without alpha")


# --- our own checks, on the tiny model --------------------------------------------------------------------


@pytest.fixture
def tiny(world: World) -> World:
    if world.name != "tiny":
        pytest.skip("formula checks run on the tiny model")
    return world


@torch.no_grad()
def test_original_block_names_equal_diffusers_names(tiny, ours, tmp_path) -> None:
    latents, context, _ = _inputs(tiny)
    a, b = tmp_path / "diffusers_names.safetensors", tmp_path / "ldm_names.safetensors"
    save_file(kohya_lora(tiny, seed=3), str(a))
    save_file(kohya_lora(tiny, seed=3, ldm_names=True), str(b))
    assert any(k.startswith("lora_unet_input_blocks_") for k in load_lora_keys(b))
    ours.set_loras([(a, 0.8)])
    out_a = _unet_out(tiny, latents, context)
    weights_a = {k: v.clone() for k, v in tiny.ours["diffusion"].state_dict().items()}
    ours.set_loras([(b, 0.8)])
    assert all(torch.equal(weights_a[k], v) for k, v in tiny.ours["diffusion"].state_dict().items())
    assert torch.equal(_unet_out(tiny, latents, context), out_a)


def load_lora_keys(path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


@torch.no_grad()
def test_strength_zero_removal_caching_and_sums(tiny, ours, tmp_path) -> None:
    latents, context, _ = _inputs(tiny)
    one, two = tmp_path / "one.safetensors", tmp_path / "two.pt"
    save_file(kohya_lora(tiny, seed=4), str(one))
    torch.save(kohya_lora(tiny, seed=5), two)  # a .pt LoRA (read with weights_only=True)
    originals = {k: v.clone() for k, v in tiny.ours["diffusion"].state_dict().items()}
    plain = _unet_out(tiny, latents, context)

    ours.set_loras([(one, 0.0)])  # strength 0: bit for bit no LoRA
    assert torch.equal(_unet_out(tiny, latents, context), plain)

    ours.set_loras([(one, 1.0)])
    weight = tiny.ours["diffusion"].get_submodule("input_blocks.1.1.proj_in").weight
    version = weight._version
    ours.set_loras([(one, 1.0)])  # the same set again: nothing is written
    assert weight._version == version

    ours.set_loras([(one, 1.0), (two, 0.5)])  # two files: W0 + dW1 + 0.5 dW2, in order
    f1, f2 = load_lora(one, tiny.config), load_lora(two, tiny.config)
    d1 = next(m for m in f1.modules if m.module == "input_blocks.1.1.proj_in")
    d2 = next(m for m in f2.modules if m.module == "input_blocks.1.1.proj_in")
    w0 = originals["input_blocks.1.1.proj_in.weight"]
    expected = w0 + delta_weight(d1.tensors, w0.shape) + delta_weight(d2.tensors, w0.shape) * 0.5
    assert torch.equal(weight, expected)
    # by hand: the formula, for the 1x1 conv with alpha 2, rank 4
    t = d1.tensors
    by_hand = (t["up"].flatten(1) @ t["down"].flatten(1)).reshape(w0.shape) * (ALPHA / RANK)
    assert torch.allclose(delta_weight(t, w0.shape), by_hand, rtol=0, atol=1e-7)

    ours.set_loras([])  # removal: the exact original weights
    for k, v in tiny.ours["diffusion"].state_dict().items():
        assert torch.equal(v, originals[k]), k
    assert torch.equal(_unet_out(tiny, latents, context), plain)


@torch.no_grad()
def test_text_encoder_and_unet_strengths_apart(tiny, ours, tmp_path) -> None:
    latents, context, tokens = _inputs(tiny)
    path = tmp_path / "lora.safetensors"
    save_file(kohya_lora(tiny, seed=6), str(path))
    plain_unet, plain_te = _unet_out(tiny, latents, context), tiny.ours["clip"](tokens)
    ours.set_loras([(path, (0.0, 1.0))])  # U-Net only
    assert torch.equal(tiny.ours["clip"](tokens), plain_te)
    unet_only = _unet_out(tiny, latents, context)
    assert not torch.equal(unet_only, plain_unet)
    ours.set_loras([(path, (1.0, 0.0))])  # text encoder only
    assert torch.equal(_unet_out(tiny, latents, context), plain_unet)
    te_only = tiny.ours["clip"](tokens)
    assert not torch.equal(te_only, plain_te)
    ours.set_loras([(path, (1.0, 1.0))])
    assert torch.equal(_unet_out(tiny, latents, context), unet_only)
    assert torch.equal(tiny.ours["clip"](tokens), te_only)


def _lyco_file(tiny: World, kind: str, gen: torch.Generator) -> tuple[dict, dict]:
    """A LoHa or LoKr file on one linear and one 3x3 conv, and dW by the formula for each of our layers."""
    layers = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": "input_blocks.1.1.transformer_blocks.0.attn1.to_q",  # noqa: E501
        "lora_unet_down_blocks_0_resnets_0_conv1": "input_blocks.1.0.in_layers.2",
        "lora_te_text_model_encoder_layers_0_mlp_fc1": "text_model.encoder.layers.0.mlp.fc1",
    }  # fmt: skip
    state, expected = {}, {}
    for name, ours_name in layers.items():
        w = _weight(tiny, ours_name)
        out_ch, in_ch, *k = w.shape
        k_numel = int(torch.tensor(k).prod()) if k else 1
        r, alpha = 3, 1.5
        if kind == "loha":
            t = {f"hada_w{i}_a": torch.randn(out_ch, r, generator=gen) for i in (1, 2)}
            t |= {f"hada_w{i}_b": torch.randn(r, in_ch * k_numel, generator=gen) for i in (1, 2)}
            # (w1_a w1_b) elementwise-times (w2_a w2_b), scaled by alpha / r
            full = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * (alpha / r)
        else:
            a, b = 2, 4  # w1 (a, b) full; w2 (out/a, in/b, k...) = w2_a @ w2_b
            t = {"lokr_w1": torch.randn(a, b, generator=gen)}
            t["lokr_w2_a"] = torch.randn(out_ch // a, r, generator=gen)
            t["lokr_w2_b"] = torch.randn(r, in_ch // b * k_numel, generator=gen)
            w2 = (t["lokr_w2_a"] @ t["lokr_w2_b"]).reshape(out_ch // a, in_ch // b, *k)
            w1 = t["lokr_w1"].reshape(a, b, *[1] * len(k))
            full = torch.kron(w1, w2) * (alpha / r)  # the conv Kronecker product, by definition
        state |= {f"{name}.{role}": v for role, v in t.items()}
        state[f"{name}.alpha"] = torch.tensor(alpha)
        expected[ours_name] = full.reshape(w.shape)
    return state, expected


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_lycoris_formulas(tiny, ours, tmp_path, kind) -> None:
    gen = torch.Generator().manual_seed(7)
    state, expected = _lyco_file(tiny, kind, gen)
    path = tmp_path / f"{kind}.safetensors"
    save_file(state, str(path))
    before = {n: _weight(tiny, n).clone() for n in expected}
    ours.set_loras([(path, 0.6)])
    for name, delta in expected.items():
        diff = (_weight(tiny, name) - (before[name] + 0.6 * delta)).abs().max().item()
        print(f"{kind} {name}: max abs diff to the formula {diff:.3g}")
        assert diff <= 1e-5 * max(1.0, delta.abs().max().item())


def _weight(tiny: World, name: str) -> torch.Tensor:
    model = tiny.ours["clip"] if name.startswith("text_model") else tiny.ours["diffusion"]
    return model.get_submodule(name).weight


def test_dora_formula(tiny, ours, tmp_path) -> None:
    """LyCORIS DoRA (dora_scale per input channel): W' = m (W + dW) / ||W + dW||, norm over the other axes."""
    gen = torch.Generator().manual_seed(8)
    name, ours_name = "lora_unet_down_blocks_0_attentions_0_proj_in", "input_blocks.1.1.proj_in"
    w0 = _weight(tiny, ours_name).detach().clone()
    out_ch, in_ch = w0.shape[:2]
    down, up = torch.randn(2, in_ch, 1, 1, generator=gen) * 0.1, torch.randn(out_ch, 2, 1, 1, generator=gen)
    magnitude = torch.rand(1, in_ch, 1, 1, generator=gen) + 0.5
    path = tmp_path / "dora.safetensors"
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
               f"{name}.alpha": torch.tensor(1.0), f"{name}.dora_scale": magnitude}, str(path))  # fmt: skip
    ours.set_loras([(path, 1.0)])
    merged = w0 + (up.flatten(1) @ down.flatten(1)).reshape(w0.shape) * 0.5
    norms = torch.stack([merged[:, i].norm() for i in range(in_ch)]).reshape(1, in_ch, 1, 1)
    assert torch.allclose(_weight(tiny, ours_name), merged * magnitude / norms, rtol=1e-5, atol=1e-6)


# --- file formats and their errors ----------------------------------------------------------------------


def test_errors_name_what_a_file_is(tiny, ours, tmp_path, caplog) -> None:
    unrelated = tmp_path / "checkpoint.safetensors"
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 4)}, str(unrelated))
    with pytest.raises(ValueError, match="not a LoRA file: none of its 1 keys is a LoRA tensor") as error:
        ours.set_loras([(unrelated, 1.0)])
    assert "\n" not in str(error.value)
    nothing = tmp_path / "nothing.safetensors"
    save_file({"lora_unet_nowhere_9.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_nowhere_9.lora_up.weight": torch.zeros(4, 2)}, str(nothing))  # fmt: skip
    with pytest.raises(ValueError, match=r"no key names a module of this SD1\.x U-Net or text encoder"):
        ours.set_loras([(nothing, 1.0)])
    attn, proj = (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
        "lora_unet_down_blocks_0_attentions_0_proj_in",
    )
    refused = {
        "sdxl": ("lora_te2_text_model_encoder_layers_0_mlp_fc1", (2, 1280), (5120, 2), "an SDXL LoRA"),
        "sd2": (attn, (2, 1024), (320, 2), r"an SD2\.x LoRA \(1024-wide cross-attention input"),
        "big": (proj, (2, 320), (320, 2), r"layer input_blocks\.1\.1\.proj_in: its lora weights make"),
    }
    for file_name, (name, down, up, message) in refused.items():
        path = tmp_path / f"{file_name}.safetensors"
        save_file({f"{name}.lora_down.weight": torch.zeros(down), f"{name}.lora_up.weight": torch.zeros(up)},
                  str(path))  # fmt: skip
        with pytest.raises(ValueError, match=message):
            ours.set_loras([(path, 1.0)])
    assert ours._lora_merger.touched == 0  # a failed set leaves the originals in place

    partial = tmp_path / "partial.safetensors"
    state = kohya_lora(tiny, seed=9, locon=False)
    state["bundle_emb.mytoken.string_to_param.*"] = torch.zeros(1, 32)  # an embedded TI: not a LoRA key
    save_file(state, str(partial))
    with caplog.at_level(logging.WARNING, logger="sd"):
        ours.set_loras([(partial, 1.0)])
    said = f"used {len(state) - 1} of {len(state)} keys, skipped 1"
    assert any(said in r.getMessage() for r in caplog.records)


class _Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_a_malicious_pt_never_runs(tiny, ours, tmp_path, capsys) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1)}, path)
    with zipfile.ZipFile(path) as archive:  # swap the pickle for one that would call print("pwned")
        entries = {i.filename: archive.read(i.filename) for i in archive.infolist()}
    pkl = next(n for n in entries if n.endswith("data.pkl"))
    entries[pkl] = pickle.dumps({"x": _Payload()}, protocol=2)
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    with pytest.raises(ValueError, match=r"refusing to unpickle: needs builtins\.print"):
        ours.set_loras([(path, 1.0)])
    assert "pwned" not in capsys.readouterr().out


# --- prompt tags through Pipeline.run, and the PNG's Lora hashes -----------------------------------------


def test_prompt_tags_end_to_end_and_lora_hashes(tmp_path, caplog, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # where .pt hashes are cached
    models = random_models(TINY, seed=11)
    folder = tmp_path / "Lora" / "styles"
    folder.mkdir(parents=True)
    state = _tiny_kohya(models, seed=12)
    save_file(state, str(folder / "ink,style.safetensors"), metadata={"ss_output_name": "ink_v2"})
    torch.save(_tiny_kohya(models, seed=13), folder / "old.pt")
    pipe = Pipeline(models)
    pipe.lora_dir = tmp_path / "Lora"
    originals = {k: v.clone() for k, v in models["diffusion"].state_dict().items()}
    kwargs = dict(steps=2, seed=1, width=64, height=64)
    (plain,) = pipe.txt2img("a cat", **kwargs)
    with caplog.at_level(logging.WARNING, logger="sd"):
        (tagged,) = pipe.txt2img("a cat <lora:ink,style:0.8> <lora:old:1:0.5> <lora:missing:1>", **kwargs)
    assert any("<lora:missing:1>: no LoRA named 'missing'" in r.getMessage() for r in caplog.records)
    assert tagged.tobytes() != plain.tobytes()
    # the same files through set_loras give the same image (tags merge in the same way)
    pipe.set_loras([(folder / "ink,style.safetensors", 0.8), (folder / "old.pt", (1.0, 0.5))])
    (direct,) = pipe.txt2img("a cat", **kwargs)
    assert direct.tobytes() == tagged.tobytes()
    pipe.set_loras([])
    # the alias a kohya file records finds it too
    (by_alias,) = pipe.txt2img("a cat <lora:ink_v2:0.8> <lora:old:1:0.5>", **kwargs)
    assert by_alias.tobytes() == tagged.tobytes()

    raw = (folder / "ink,style.safetensors").read_bytes()
    (header,) = struct.unpack("<Q", raw[:8])
    addnet = hashlib.sha256(raw[8 + header :]).hexdigest()[:12]
    whole = hashlib.sha256((folder / "old.pt").read_bytes()).hexdigest()[:12]
    text = tagged.info["parameters"]
    assert f'Lora hashes: "inkstyle: {addnet}, old: {whole}", TI hashes' in text or (
        f'Lora hashes: "inkstyle: {addnet}, old: {whole}"' in text and "TI hashes" not in text
    )
    params = GenerationParams.from_text(text)
    assert params.lora_hashes == f"inkstyle: {addnet}, old: {whole}" and params.unhonoured == ()
    assert "<lora:ink,style:0.8>" in params.prompt  # A1111 keeps the tags in the PNG's prompt
    assert GenerationParams.from_text(params.to_text()) == params
    assert "Lora hashes" not in plain.info["parameters"]
    # a run without tags restores the weights
    pipe.txt2img("a cat", **kwargs)
    for k, v in models["diffusion"].state_dict().items():
        assert torch.equal(v, originals[k]), k


def _tiny_kohya(models: dict, seed: int) -> dict:
    """A kohya file over the attention layers of our tiny models, by their original (LDM) names."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for component, prefix in (("diffusion", "lora_unet_"), ("clip", "lora_te_")):
        for name, layer in models[component].named_modules():
            if isinstance(layer, torch.nn.Linear) and ("attn" in name or "mlp" in name):
                key = prefix + name.replace(".", "_")  # lora_te_text_model_encoder_layers_0_...
                down, up = _pair(layer, 2, gen)
                state |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up * 3}
                state[f"{key}.alpha"] = torch.tensor(1.0)
    return state


def test_lora_hashes_prefer_the_recorded_hash(tmp_path) -> None:
    from sd.networks import ActiveLora, LoraFile

    file = LoraFile(tmp_path / "x.safetensors", [], {"sshs_model_hash": "abcdef0123456789"})
    assert lora_hashes([ActiveLora("a:b", file)]) == "ab: abcdef012345"
    assert lora_hashes([]) is None


def test_cli_lora_option_and_tags(tmp_path, capsys, monkeypatch) -> None:
    from sd.cli import main
    from sd.images import read_png_parameters
    from sd.weights import save_checkpoint

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SD_HOME", str(tmp_path / "sd-home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    models = random_models(TINY, seed=5)
    ckpt = tmp_path / "tiny.safetensors"
    save_checkpoint(models, ckpt, config=TINY)
    folder = tmp_path / "loras"
    folder.mkdir()
    save_file(_tiny_kohya(models, seed=14), str(folder / "ink.safetensors"))
    fast = ["--ckpt", str(ckpt), "--steps", "2", "--width", "64", "--height", "64", "--seed", "3"]

    def generate(*argv: str) -> tuple[int, str, str]:
        code = main(["generate", *argv, *fast])
        out, err = capsys.readouterr()
        return code, out.strip(), err

    code, by_option, err = generate("a cat", "--lora", f"{folder / 'ink.safetensors'}:1:0.5", "-o", "a.png")
    assert code == 0, err
    code, by_name, err = generate("a cat", "--lora", "ink:1:0.5", "--lora-dir", str(folder), "-o", "b.png")
    assert code == 0, err
    code, by_tag, err = generate("a cat <lora:ink:1:0.5>", "--lora-dir", str(folder), "-o", "c.png")
    assert code == 0, err
    code, plain, err = generate("a cat", "-o", "d.png")
    assert code == 0, err
    unmerged_mode = ["--lora-dir", str(folder), "--lora-mode", "unmerged", "-o", "e.png"]
    code, unmerged, err = generate("a cat <lora:ink:1:0.5>", *unmerged_mode)
    assert code == 0, err
    differing = np.frombuffer(np_bytes(unmerged), np.uint8) != np.frombuffer(np_bytes(by_tag), np.uint8)
    assert differing.mean() < 0.01, "un-merged: the merged image up to rounding"
    pixels = [np_bytes(p) for p in (by_option, by_name, by_tag, plain)]
    assert pixels[0] == pixels[1] == pixels[2] != pixels[3]
    assert 'Lora hashes: "ink: ' in read_png_parameters(by_tag)
    code, _, err = generate("a cat", "--lora", "nowhere.safetensors:0.5")
    assert code != 0 and "LoRA file not found: nowhere.safetensors" in err
    assert len(err.strip().splitlines()) == 1


def np_bytes(path: str) -> bytes:
    from PIL import Image

    return Image.open(path).tobytes()


@torch.no_grad()
def test_locon_cp_and_loha_tucker_formulas(tiny, ours, tmp_path) -> None:
    """LyCORIS' decomposed 3x3 kernels: LoCon with lora_mid is the conv chain down (1x1) -> mid (3x3) ->
    up (1x1); a Tucker LoHa factor is the core contracted with w_b (input side) and w_a (output side)."""
    gen = torch.Generator().manual_seed(15)
    conv = tiny.ours["diffusion"].get_submodule("input_blocks.1.0.in_layers.2")
    w0 = conv.weight.detach().clone()
    out_ch, in_ch = w0.shape[:2]
    r = 3
    down, mid = torch.randn(r, in_ch, 1, 1, generator=gen), torch.randn(r, r, 3, 3, generator=gen)
    up = torch.randn(out_ch, r, 1, 1, generator=gen)
    locon = "lora_unet_down_blocks_0_resnets_0_conv1"
    path = tmp_path / "cp.safetensors"
    save_file({f"{locon}.lora_down.weight": down, f"{locon}.lora_mid.weight": mid,
               f"{locon}.lora_up.weight": up, f"{locon}.alpha": torch.tensor(1.5)}, str(path))  # fmt: skip
    ours.set_loras([(path, 1.0)])
    x = torch.randn(1, in_ch, 6, 6, generator=gen)
    chain = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up) * (1.5 / r)
    merged = F.conv2d(x, conv.weight, padding=1) - F.conv2d(x, w0, padding=1)
    assert_close(merged, chain, "LoCon CP kernel against the conv chain")

    t = {f"hada_t{i}": torch.randn(r, r, 3, 3, generator=gen) for i in (1, 2)}
    t |= {f"hada_w{i}_a": torch.randn(r, out_ch, generator=gen) for i in (1, 2)}
    t |= {f"hada_w{i}_b": torch.randn(r, in_ch, generator=gen) for i in (1, 2)}

    def factor(i: int) -> torch.Tensor:  # (i j k l) x (j r) -> (i k l r); (p i) x (i k l r) -> (p k l r)
        inner = torch.tensordot(t[f"hada_t{i}"], t[f"hada_w{i}_b"], dims=([1], [0]))
        return torch.tensordot(t[f"hada_w{i}_a"].T, inner, dims=([1], [0])).permute(0, 3, 1, 2)

    path = tmp_path / "tucker.safetensors"
    save_file({f"{locon}.{k}": v for k, v in t.items()} | {f"{locon}.alpha": torch.tensor(2.0)}, str(path))
    ours.set_loras([(path, 0.5)])
    expected = w0 + factor(1) * factor(2) * (2.0 / r) * 0.5
    assert_close(conv.weight.detach(), expected, "LoHa Tucker against the contraction")


def test_key_spellings_map_to_our_modules(tiny, tmp_path) -> None:
    """The other spellings files use (A1111 / ComfyUI / old diffusers) land on the same layer."""
    q = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    spellings = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight": q,
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight": q,
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight": q,
        "text_encoder.text_model.encoder.layers.1.self_attn.to_out_lora.down.weight":
            "text_model.encoder.layers.1.self_attn.out_proj",
        "text_encoder.encoder.layers.1.mlp.fc2.lora_linear_layer.down.weight":
            "text_model.encoder.layers.1.mlp.fc2",
        "lora_te1_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight":
            "text_model.encoder.layers.0.self_attn.k_proj",
    }  # fmt: skip
    for i, (key, module) in enumerate(spellings.items()):
        up = key.replace("lora_down", "lora_up").replace("down.weight", "up.weight")
        path = tmp_path / f"{i}.safetensors"
        save_file({key: torch.ones(1, 1), up: torch.ones(1, 1)}, str(path))
        (found,) = load_lora(path, tiny.config).modules
        assert found.module == module, key


def test_lora_hashes_sit_before_ti_hashes() -> None:
    params = GenerationParams("a <lora:x:1>", lora_hashes="x: 0123456789ab", ti_hashes="e: ba9876543210")
    assert 'Lora hashes: "x: 0123456789ab", TI hashes: "e: ba9876543210"' in params.to_text()
    assert GenerationParams.from_text(params.to_text()).lora_hashes == "x: 0123456789ab"


@torch.no_grad()
def test_unmerged_equals_merged_and_leaves_the_weights(tiny, ours, tmp_path) -> None:
    """set_loras(merge=False): the weights are read as W0 + deltas (plain LoRA from its low-rank factors,
    LoHa / LoKr / DoRA as full dW); outputs equal the merged model's up to fp32 rounding (RTOL) and no
    stored weight changes by a bit."""
    from sd.testing import lcm_lora_like

    files = []
    for kind in ("loha", "lokr"):
        state, _ = _lyco_file(tiny, kind, torch.Generator().manual_seed(9))
        files.append(tmp_path / f"{kind}.safetensors")
        save_file(state, str(files[-1]))
    files.append(tmp_path / "locon.safetensors")
    save_file(lcm_lora_like(tiny.config, rank=3, seed=4), str(files[-1]))
    files.append(tmp_path / "kohya.safetensors")
    save_file(kohya_lora(tiny, seed=2), str(files[-1]))
    loras = [(files[0], 0.5), (files[1], (0.3, 0.7)), (files[2], 1.0), (files[3], 0.8)]
    latents, context, tokens = _inputs(tiny)
    before, plain = _digests(tiny), _unet_out(tiny, latents, context)
    ours.set_loras(loras)
    merged_unet, merged_te = _unet_out(tiny, latents, context), tiny.ours["clip"](tokens)
    ours.set_loras(loras, merge=False)
    assert _digests(tiny) == before, "un-merged mode must leave the weights as they are"
    assert_close(_unet_out(tiny, latents, context), merged_unet, "un-merged U-Net")
    assert_close(tiny.ours["clip"](tokens), merged_te, "un-merged text encoder")
    ours.set_loras([], merge=False)
    assert torch.equal(_unet_out(tiny, latents, context), plain), "parametrizations left behind"


def test_set_loras_files_are_written_as_tags_and_broken_tagged_files_skipped(tmp_path, caplog) -> None:
    """A PNG made with set_loras / --lora names the files as A1111 would: as prompt tags, so a replay (ours,
    or A1111's with the file in its Lora folder) applies them; a tag naming a file that cannot be used is
    logged and skipped, as A1111 does, and the image is made without it."""
    models = random_models(TINY, seed=5)
    pipe = Pipeline(models)
    save_file(_tiny_kohya(models, seed=14), str(tmp_path / "ink.safetensors"))
    pipe.set_loras([(tmp_path / "ink.safetensors", (1.0, 0.5))])
    made = pipe.txt2img("a cat", width=64, height=64, steps=2, seed=4)[0]
    text = made.info["parameters"]
    assert text.splitlines()[0] == "a cat <lora:ink:1:0.5>"
    pipe.set_loras([])
    pipe.lora_dir = tmp_path
    replayed = pipe.run(GenerationParams.from_text(text))[0]
    assert np.array_equal(np.asarray(replayed), np.asarray(made))
    save_file({"something.else": torch.zeros(2)}, str(tmp_path / "broken.safetensors"))
    with caplog.at_level(logging.WARNING, logger="sd"):
        image = pipe.txt2img("a cat <lora:broken:1>", width=64, height=64, steps=2, seed=4)[0]
    assert "<lora:broken:1>" in caplog.text and "the tag is ignored" in caplog.text
    assert "Lora hashes" not in image.info["parameters"]
