"""Checkpoint reading/writing (sd.weights): round trips, formats, EMA, dtypes, and one-line errors.

All models are TINY with random weights; SD1.5-sized checks use shapes only (meta tensors, the reference
key list, or a sparse file whose tensor data is never read).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sd import weights as W
from sd.config import SD15, TINY
from sd.keymap import diffusers_configs, diffusers_key_map, vae_reshape_keys
from sd.testing import ldm_state_dict, random_models
from sd.weights import (
    SUPPORTED,
    CheckpointError,
    checkpoint_layout,
    describe,
    format_description,
    load_models,
    save_checkpoint,
    schedule_buffers,
)

REFERENCE = Path(
    os.environ.get("SD_REFERENCE_DIR", Path(__file__).resolve().parents[2] / "shared" / "reference")
)
UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"


def reference(name: str) -> dict:
    path = REFERENCE / name
    if not path.is_file():
        pytest.skip(f"reference data not found: {path}")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return random_models(TINY, seed=3)


@pytest.fixture(scope="module")
def ldm(models) -> dict[str, torch.Tensor]:
    """The TINY models as an original-layout state dict (weights only, like many real files)."""
    return {k: v.clone() for k, v in ldm_state_dict(models).items()}


def assert_same_weights(a: dict[str, torch.nn.Module], b: dict[str, torch.nn.Module], dtype=None) -> None:
    assert a.keys() == b.keys()
    for name in a:
        sa, sb = a[name].state_dict(), b[name].state_dict()
        assert sa.keys() == sb.keys(), name
        for k in sa:
            want = sa[k] if dtype is None else sa[k].to(dtype)
            assert sb[k].dtype == want.dtype, (name, k)
            assert torch.equal(sb[k], want), (name, k)


def error_of(path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        load_models(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------------------
# SD1.5 layout (shapes only)
# ---------------------------------------------------------------------------------------------------------


def test_schedule_buffers_match_reference():
    ref = reference("sd15-ldm-schedule-buffers.json")
    buffers = schedule_buffers(SD15.schedule)
    assert list(buffers) == list(ref["values"]) or set(buffers) == set(ref["values"])
    for name, values in ref["values"].items():
        assert buffers[name].dtype == torch.float32
        assert torch.equal(buffers[name], torch.tensor(values, dtype=torch.float32)), name


def test_saved_sd15_key_set_is_the_real_one():
    ref = reference("sd15-ldm-checkpoint.json")["keys"]
    layout = checkpoint_layout(SD15)
    assert set(layout) == set(ref)
    for key, (shape, dtype) in layout.items():
        assert list(shape) == ref[key]["shape"], key
        assert str(dtype).removeprefix("torch.") == ref[key]["dtype"], key
    half = checkpoint_layout(SD15, torch.float16)
    assert half[W.POSITION_IDS][1] == torch.int64
    assert half["betas"][1] == half[UNET_IN][1] == torch.float16


def write_sparse_safetensors(path: Path, shapes: dict[str, tuple[list[int], str]], metadata=None) -> None:
    """A header describing full-size tensors over a sparse (never written) data section."""
    names = {"float32": "F32", "int64": "I64", "float16": "F16"}
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key, (shape, dtype) in shapes.items():
        n = int(np.prod(shape)) * (8 if dtype == "int64" else 4 if dtype == "float32" else 2)
        header[key] = {"dtype": names[dtype], "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)


def test_describe_full_size_sd15_reads_header_only(tmp_path):
    ref = reference("sd15-ldm-checkpoint.json")
    path = tmp_path / "v1-5.safetensors"
    write_sparse_safetensors(path, {k: (v["shape"], v["dtype"]) for k, v in ref["keys"].items()})
    info = describe(path)
    assert info.usable and info.family == "SD1.x" and info.reason is None
    assert info.format == "safetensors" and info.tensors == 1143
    assert info.dtypes == {"float32": 1142, "int64": 1}
    counts = ref["param_counts"]
    assert info.components == {
        "U-Net": counts["unet (model.diffusion_model.*)"],
        "VAE": counts["vae (first_stage_model.*)"],
        "text encoder": counts["text_encoder (cond_stage_model.transformer.*)"],
    }
    text = format_description(info)
    assert "SD1.x (usable)" in text and "859,520,964" in text and "EMA weights: no" in text


# ---------------------------------------------------------------------------------------------------------
# Round trips, dtypes, EMA
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_save_load_round_trip_is_bit_exact(models, tmp_path, suffix):
    path = tmp_path / f"tiny{suffix}"
    save_checkpoint(models, path, TINY)
    loaded = load_models(path)  # the config travels with the file
    assert_same_weights(models, loaded)
    for module in loaded.values():
        assert not module.training
        assert all(not p.requires_grad and not p.is_meta for p in module.parameters())
    info = describe(path)
    assert (
        info.usable and info.config == "custom-size SD1.x (from file metadata): 512 px images, predicts noise"
    )


def test_some_components_or_none_of_the_weights(models, ldm, tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(models, path, TINY)
    decoder = load_models(path, components=["decoder"])
    assert list(decoder) == ["decoder"]
    assert_same_weights({"decoder": models["decoder"]}, decoder)
    # device="meta": the file is checked as for a real load, and no weight is read.
    weightless = load_models(path, device="meta")
    assert list(weightless) == ["clip", "encoder", "decoder", "diffusion"]
    assert all(p.is_meta for module in weightless.values() for p in module.parameters())
    assert weightless["diffusion"].config == models["diffusion"].config
    broken = {k: v for k, v in ldm.items() if k != UNET_IN}
    save_file(broken, tmp_path / "broken.safetensors")
    missing = re.escape(f"missing 1 keys ({UNET_IN})")
    with pytest.raises(CheckpointError, match=missing):
        load_models(tmp_path / "broken.safetensors", device="meta", config=TINY)
    with pytest.raises(ValueError, match="unknown components"):
        load_models(path, components=["unet"])


def test_native_size_and_prediction_type_travel_with_the_file(models, tmp_path):
    from dataclasses import replace

    from sd.models import config_of

    config = replace(
        TINY,
        unet=replace(TINY.unet, sample_size=8),
        schedule=replace(TINY.schedule, prediction_type="v_prediction"),
    )
    path = tmp_path / "v.safetensors"
    save_checkpoint(models, path, config)
    assert config_of(load_models(path)) == config
    assert describe(path).config.endswith(": 64 px images, predicts v")


def test_saved_safetensors_is_standard(models, tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(models, path, TINY)
    tensors = load_file(path)  # the reference reader agrees with our streaming writer
    assert set(tensors) == set(checkpoint_layout(TINY))
    assert torch.equal(tensors[W.POSITION_IDS], torch.arange(77)[None])
    for key, value in ldm_state_dict(models).items():
        assert torch.equal(tensors[key], value), key


def test_plain_torch_save_ckpt_loads(models, ldm, tmp_path):
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": ldm, "global_step": 470000, "epoch": 3}, path)
    assert_same_weights(models, load_models(path, config=TINY))
    flat = tmp_path / "flat.ckpt"
    torch.save(ldm, flat)  # no "state_dict" level
    assert_same_weights(models, load_models(flat, config=TINY))


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_loaded_model_does_not_keep_the_file_mapped(models, ldm, tmp_path, suffix):
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs /proc/self/maps")
    path = tmp_path / f"mapped{suffix}"
    if suffix == ".ckpt":
        torch.save({"state_dict": ldm}, path)
    else:
        save_file(ldm, path)
    loaded = load_models(path, config=TINY)
    assert str(path) not in Path("/proc/self/maps").read_text()
    assert_same_weights(models, loaded)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_fp16_file_loads_as_fp32_and_bf16(models, tmp_path, suffix):
    path = tmp_path / f"half{suffix}"
    save_checkpoint(models, path, TINY, dtype=torch.float16)
    assert describe(path).dtypes == {"float16": len(checkpoint_layout(TINY)) - 1, "int64": 1}
    half = {n: {k: v.half() for k, v in m.state_dict().items()} for n, m in models.items()}
    for dtype in (None, torch.float32, torch.bfloat16, torch.float16):
        loaded = load_models(path, dtype=dtype)
        for name, module in loaded.items():
            for k, v in module.state_dict().items():
                want = half[name][k].to(dtype or torch.float32)
                assert v.dtype == want.dtype and torch.equal(v, want), (name, k)


def test_bf16_file_loads_as_fp32(models, tmp_path):
    path = tmp_path / "bf16.safetensors"
    save_checkpoint(models, path, TINY, dtype=torch.bfloat16)
    loaded = load_models(path)
    assert_same_weights(
        {n: m.bfloat16() for n, m in random_models(TINY, seed=3).items()}, loaded, torch.float32
    )


def ema_state(ldm: dict[str, torch.Tensor], complete: bool = True) -> dict[str, torch.Tensor]:
    state = dict(ldm)
    unet = [k for k in ldm if k.startswith("model.diffusion_model.")]
    for k in unet if complete else unet[:-1]:
        state["model_ema." + k.removeprefix("model.").replace(".", "")] = ldm[k] + 1.0
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    state["logvar"] = torch.zeros(1000)
    state.update(schedule_buffers(TINY.schedule))
    state[W.POSITION_IDS] = torch.arange(77, dtype=torch.float32)[None]  # float copy: ignored
    state["first_stage_model.loss.logvar"] = torch.zeros(())  # VAE training leftover: ignored
    return state


def test_ema_weights_win_for_the_unet(ldm, tmp_path):
    assert "model_ema.diffusion_modelinput_blocks00weight" in ema_state(ldm)  # the LitEma naming
    for suffix in (".ckpt", ".safetensors"):
        path = tmp_path / f"ema{suffix}"
        if suffix == ".ckpt":
            torch.save({"state_dict": ema_state(ldm)}, path)
        else:
            save_file(ema_state(ldm), path)
        loaded = load_models(path, config=TINY)
        unet = loaded["diffusion"].state_dict()
        for k, v in unet.items():
            assert torch.equal(v, ldm["model.diffusion_model." + k] + 1.0), k
        clip = loaded["clip"].state_dict()  # EMA covers the U-Net only
        assert torch.equal(
            clip["text_model.final_layer_norm.weight"],
            ldm[W.TEXT_ENCODER_PREFIX + "text_model.final_layer_norm.weight"],
        )
        plain = load_models(path, config=TINY, use_ema=False)["diffusion"].state_dict()
        assert all(torch.equal(v, ldm["model.diffusion_model." + k]) for k, v in plain.items())


def test_incomplete_ema_is_ignored(ldm, tmp_path):
    path = tmp_path / "partial-ema.safetensors"
    save_file(ema_state(ldm, complete=False), path)
    unet = load_models(path, config=TINY)["diffusion"].state_dict()
    assert all(torch.equal(v, ldm["model.diffusion_model." + k]) for k, v in unet.items())
    info = describe(path)
    assert info.ema and not info.ema_used


def test_tolerated_variants_of_the_original_layout(models, ldm, tmp_path):
    state = {}
    for k, v in ldm.items():
        # transformers-3-era CLIP keys without the "text_model." level
        k = k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")
        # VAE attention stored as linear weights (files converted from diffusers)
        if ".mid.attn_1." in k and v.ndim == 4:
            v = v[:, :, 0, 0]
        state[k] = v
    path = tmp_path / "variants.safetensors"
    save_file(state, path)
    assert_same_weights(models, load_models(path, config=TINY))


# ---------------------------------------------------------------------------------------------------------
# Pickle safety
# ---------------------------------------------------------------------------------------------------------

CALLS: list[str] = []


def fake_lightning_module() -> type:
    """A stand-in for pytorch_lightning's ModelCheckpoint whose code records any call."""

    class ModelCheckpoint:
        def __init__(self):
            self.monitor = None

        def __setstate__(self, state):
            CALLS.append("setstate")
            self.__dict__.update(state)

    names = [
        "pytorch_lightning",
        "pytorch_lightning.callbacks",
        "pytorch_lightning.callbacks.model_checkpoint",
    ]
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    ModelCheckpoint.__module__ = names[-1]
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    sys.modules[names[-1]].ModelCheckpoint = ModelCheckpoint
    return ModelCheckpoint


def remove_fake_lightning() -> None:
    for name in [n for n in sys.modules if n == "pytorch_lightning" or n.startswith("pytorch_lightning.")]:
        del sys.modules[name]


def test_lightning_leftovers_load_as_inert_placeholders(models, ldm, tmp_path):
    path = tmp_path / "lightning.ckpt"
    cls = fake_lightning_module()
    try:
        callback = cls()
        callback.best_model_score = np.float64(0.25)
        checkpoint = {
            "epoch": 5,
            "global_step": 470000,
            "pytorch-lightning_version": "1.4.2",
            "callbacks": {cls: {"best_model_score": np.float64(0.5), "dirpath": "/logs"}},
            "instance": callback,
            "dtype": np.dtype("float32"),
            "array": np.arange(3),
            "state_dict": ldm,
        }
        torch.save(checkpoint, path)
    finally:
        remove_fake_lightning()
    CALLS.clear()

    assert_same_weights(models, load_models(path, config=TINY))
    assert describe(path, config=TINY).usable

    raw = W._torch_load(str(path))
    (key,) = raw["callbacks"]
    assert issubclass(key, W._Placeholder) and key is not cls
    assert (
        f"{key.__module__}.{key.__qualname__}"
        == "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
    )
    assert isinstance(raw["instance"], W._Placeholder) and isinstance(raw["instance"].state, dict)
    assert isinstance(raw["callbacks"][key]["best_model_score"], W._Placeholder)
    assert not CALLS  # the pickled class's code never ran
    assert "pytorch_lightning" not in sys.modules  # and was never imported
    leftover = [g for g in torch.serialization.get_safe_globals() if "pytorch_lightning" in repr(g)]
    assert not leftover  # placeholders are not left allowlisted


class _Exec:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


class _System:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize(
    ("payload", "protocol", "needs"),
    [(_Exec, 2, "builtins.exec"), (_System, 2, "system"), (_Exec, 4, "builtins.exec")],
)
def test_malicious_pickle_is_refused_without_running(ldm, tmp_path, payload, protocol, needs):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": ldm, "x": payload(marker)}, path, pickle_protocol=protocol)
    message = error_of(path, config=TINY)
    assert "refusing to unpickle" in message and needs in message
    info = describe(path)
    assert not info.usable and "refusing to unpickle" in info.reason and info.family == "unsafe pickle"
    assert not marker.exists()


def test_pickle_global_scanner_sees_stack_global():
    data = pickle.dumps(_Exec(Path("/nonexistent")), protocol=4)
    assert ("builtins", "exec") in W._pickle_globals(data)


# ---------------------------------------------------------------------------------------------------------
# Files that are not (loadable) models: one specific line each
# ---------------------------------------------------------------------------------------------------------


def test_not_a_model_at_all(ldm, tmp_path):
    cases: dict[str, tuple[bytes | None, str]] = {
        "random.ckpt": (np.random.default_rng(0).bytes(4096), "not a recognised model file"),
        "config.json": (json.dumps({"_class_name": "UNet2DConditionModel"}).encode(), "JSON"),
        "photo.png": (b"\x89PNG\r\n\x1a\n" + bytes(100), "PNG image"),
        "photo.safetensors": (b"\xff\xd8\xff\xe0" + bytes(100), "JPEG image"),
        "empty.safetensors": (b"", "empty file"),
        "notes.txt": (b"hello world\n", "text file"),
    }
    for name, (data, phrase) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        message = error_of(path)
        assert phrase in message and SUPPORTED in message, (name, message)
        assert describe(path).family == "not a model"

    other_zip = tmp_path / "other.ckpt"
    with zipfile.ZipFile(other_zip, "w") as z:
        z.writestr("readme.txt", "hi")
        z.writestr("image.png", b"\x89PNG")
    assert "zip archive of other files (readme.txt" in error_of(other_zip)

    assert "no such file or directory" in error_of(tmp_path / "missing.safetensors")
    empty_dir = tmp_path / "folder"
    empty_dir.mkdir()
    assert "not a diffusers folder" in error_of(empty_dir)


def test_truncated_and_legacy_files(ldm, tmp_path):
    ckpt = tmp_path / "full.ckpt"
    torch.save({"state_dict": ldm}, ckpt)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    assert "truncated or corrupt zip archive" in error_of(cut)
    assert describe(cut).family == "unreadable"

    st = tmp_path / "full.safetensors"
    save_file(ldm, st)
    cut_st = tmp_path / "cut.safetensors"
    cut_st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    assert "truncated safetensors file" in error_of(cut_st)
    header_only = tmp_path / "header.safetensors"
    header_only.write_bytes(st.read_bytes()[:100])
    assert "truncated safetensors file" in error_of(header_only)

    legacy = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(2)}}, legacy, _use_new_zipfile_serialization=False)
    assert "legacy (pre-1.6, non-zip) PyTorch file" in error_of(legacy)

    bare = tmp_path / "bare.pkl"
    bare.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    assert "bare pickle" in error_of(bare)

    not_dict = tmp_path / "list.ckpt"
    torch.save([torch.zeros(1)], not_dict)
    assert "not a state dict" in error_of(not_dict)


def t(*shape: int) -> torch.Tensor:
    return torch.zeros(shape)


FAMILIES = {
    "SD2.x": (
        {
            UNET_IN: t(8, 4, 3, 3),
            "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": t(6, 2),
            "first_stage_model.encoder.conv_in.weight": t(2, 3, 3, 3),
        },
        "SD2.x checkpoint (OpenCLIP text encoder",
    ),
    "SD2.x inpainting": (
        {
            UNET_IN: t(8, 9, 3, 3),
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": t(8, 1024),
        },
        "SD2.x inpainting checkpoint (1024-dim cross-attention",
    ),
    "SDXL": (
        {
            "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": t(4),
            "model.diffusion_model.label_emb.0.0.weight": t(4, 4),
        },
        "SDXL checkpoint",
    ),
    # (SD1.x inpainting, 9 channels, is loaded: tests/test_inpaint.py)
    "SD1.x InstructPix2Pix": (
        {UNET_IN: t(8, 8, 3, 3), "cond_stage_model.transformer.text_model.final_layer_norm.weight": t(4)},
        "SD1.x InstructPix2Pix checkpoint (U-Net input_blocks.0.0.weight takes 8 input channels, not 4)",
    ),
    "LoRA": (
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": t(4, 8),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": t(),
        },
        "a LoRA (key lora_unet_",
    ),
    "LoRA (peft)": (
        {
            "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": t(4, 8),
            "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": t(8, 4),
        },
        "a LoRA (key unet.down_blocks",
    ),
    "VAE": (
        {
            "encoder.conv_in.weight": t(4, 3, 3, 3),
            "decoder.conv_out.weight": t(3, 4, 3, 3),
            "quant_conv.weight": t(8, 8, 1, 1),
            "model_ema.decay": t(),
        },
        "a standalone VAE (encoder.*/decoder.* keys without the first_stage_model. prefix, original layout)",
    ),
    "VAE (prefixed)": (
        {
            "first_stage_model.encoder.conv_in.weight": t(4, 3, 3, 3),
            "first_stage_model.decoder.conv_out.weight": t(3, 4, 3, 3),
        },
        "a standalone VAE (only first_stage_model.* keys)",
    ),
    "VAE (diffusers)": (
        {
            "encoder.down_blocks.0.resnets.0.conv1.weight": t(4, 4, 3, 3),
            "decoder.up_blocks.0.resnets.0.conv1.weight": t(4, 4, 3, 3),
        },
        "a standalone VAE (encoder.*/decoder.* keys without the first_stage_model. prefix, diffusers layout)",
    ),
    "diffusers U-Net": (
        {
            "conv_in.weight": t(8, 4, 3, 3),
            "down_blocks.0.resnets.0.conv1.weight": t(8, 8, 3, 3),
            "time_embedding.linear_1.weight": t(8, 8),
        },
        "a diffusers U-Net file (down_blocks.*/mid_block.* keys), a single diffusers component",
    ),
    "CLIP text encoder": (
        {
            "text_model.embeddings.token_embedding.weight": t(10, 4),
            "text_model.encoder.layers.0.mlp.fc1.weight": t(8, 4),
        },
        "a CLIP text encoder file",
    ),
    "textual inversion": ({"emb_params": t(2, 768)}, "a textual inversion embedding (key emb_params)"),
    "ControlNet": ({"control_model.input_hint_block.0.weight": t(4, 3, 3, 3)}, "a ControlNet"),
    "unknown": (
        {"fc.weight": t(2, 2), "fc.bias": t(2)},
        "no Stable Diffusion weights recognised (keys fc.bias, fc.weight)",
    ),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_other_model_families_are_recognised(tmp_path, name):
    state, phrase = FAMILIES[name]
    family = name.split(" (")[0]
    for suffix in (".safetensors", ".ckpt"):
        path = tmp_path / f"model{suffix}"
        if suffix == ".ckpt":
            torch.save({"state_dict": state}, path)
        else:
            save_file(state, path)
        message = error_of(path)
        assert phrase in message and message.endswith(SUPPORTED), message
        info = describe(path)
        assert info.family == family and not info.usable and info.reason == message


def test_key_errors_list_first_keys_and_counts(ldm, tmp_path):
    path = tmp_path / "bad.safetensors"

    state = dict(ldm)
    removed = sorted(state)[:5]
    for k in removed:
        del state[k]
    state.update({f"junk.{i}": t(1) for i in range(4)})
    save_file(state, path)
    message = error_of(path, config=TINY)
    assert "missing 5 keys" in message and removed[0] in message
    assert "unexpected 4 keys (junk.0, junk.1, junk.2, ...)" in message

    no_vae = {k: v for k, v in ldm.items() if not k.startswith("first_stage_model.")}
    save_file(no_vae, path)
    message = error_of(path, config=TINY)
    assert "the file has no VAE encoder (first_stage_model.encoder.*) and no VAE decoder" in message

    state = dict(ldm)
    key = "model.diffusion_model.out.2.weight"
    state[key] = torch.zeros(5, *state[key].shape[1:])
    save_file(state, path)
    message = error_of(path, config=TINY)
    assert (
        f"1 shape mismatches for the custom-size SD1.x layout: {key} expected [4, 32, 3, 3] got [5, 32, 3, 3]"
        in message
    )

    # a TINY file without stored config, loaded as SD1.5: shapes differ, the hint says why
    save_file(ldm, path)
    message = error_of(path)
    assert "SD1.5" in message and "no config is stored with the file" in message


def test_error_is_one_line():
    assert str(CheckpointError("a\nb\n  c")) == "a b c"
    assert isinstance(CheckpointError("x"), ValueError)


def test_save_checks_models_against_config(models, tmp_path):
    with pytest.raises(ValueError, match="does not match the config"):
        save_checkpoint(models, tmp_path / "x.safetensors", SD15)
    with pytest.raises(ValueError, match="exactly the components"):
        save_checkpoint({"clip": models["clip"]}, tmp_path / "x.safetensors", TINY)
    assert not (tmp_path / "x.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------
# diffusers folders
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def diffusers_models(ldm):
    """diffusers/transformers reference modules holding the same TINY weights."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    configs = diffusers_configs(TINY)
    built = {
        "unet": diffusers.UNet2DConditionModel.from_config(configs["unet"]),
        "vae": diffusers.AutoencoderKL.from_config(configs["vae"]),
        "text_encoder": transformers.CLIPTextModel(transformers.CLIPTextConfig(**configs["text_encoder"])),
    }
    keymap = diffusers_key_map(TINY)
    reshape = vae_reshape_keys(TINY)
    for name, module in built.items():
        own = module.state_dict()
        state = {}
        for d_key, l_key in keymap[name].items():
            target = d_key if d_key in own else d_key.removeprefix("text_model.")
            if target not in own:
                continue  # position_ids: no slot in transformers >= 4.31
            value = ldm[l_key]
            state[target] = value[:, :, 0, 0] if d_key in reshape else value
        module.load_state_dict(state, strict=True)
    return built


def write_diffusers_folder(
    root: Path, diffusers_models, *, text_model_level=False, vae_conv=False, variant=None
) -> Path:
    root.mkdir()
    index = {
        "_class_name": "StableDiffusionPipeline",
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    for name, module in diffusers_models.items():
        module.save_pretrained(root / name, variant=variant)
    if text_model_level or vae_conv:
        for name in ("text_encoder", "vae"):
            (file,) = (root / name).glob("*.safetensors")
            state = load_file(file)
            if name == "text_encoder" and text_model_level:  # the transformers-4 layout of real SD1.5 folders
                state = {"text_model." + k: v for k, v in state.items()}
                state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
            if name == "vae" and vae_conv:  # old diffusers saved the attention as 1x1 convs
                reshape = vae_reshape_keys(TINY)
                state = {k: v[:, :, None, None] if k in reshape else v for k, v in state.items()}
            save_file(state, file)
    return root


@pytest.mark.parametrize(
    "layout",
    [{}, {"text_model_level": True}, {"vae_conv": True}, {"variant": "fp16"}],
    ids=["transformers5", "text_model-level", "vae-conv", "fp16-variant-name"],
)
def test_diffusers_folder_matches_original_format(models, diffusers_models, tmp_path, layout):
    folder = write_diffusers_folder(tmp_path / "pipe", diffusers_models, **layout)
    loaded = load_models(folder)
    assert_same_weights(models, loaded)
    info = describe(folder)
    assert info.usable and info.family == "SD1.x" and info.format.startswith("diffusers folder")
    assert (
        info.config == "custom-size SD1.x (from diffusers config.json files): 512 px images, predicts noise"
    )


def test_diffusers_folder_bin_weights(models, diffusers_models, tmp_path):
    folder = write_diffusers_folder(tmp_path / "pipe", diffusers_models)
    for name in ("unet", "vae", "text_encoder"):
        (file,) = (folder / name).glob("*.safetensors")
        torch.save(load_file(file), file.with_suffix(".bin"))
        file.unlink()
    assert_same_weights(models, load_models(folder))
    assert describe(folder).format == "diffusers folder (bin)"


def test_diffusers_folder_errors(diffusers_models, tmp_path):
    folder = write_diffusers_folder(tmp_path / "pipe", diffusers_models)
    (file,) = (folder / "unet").glob("*.safetensors")
    assert "a single diffusers component folder" in error_of(folder / "unet")
    assert "a diffusers U-Net file" in error_of(file)
    assert "JSON file (a diffusers config" in error_of(folder / "unet" / "config.json")

    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "cross_attention_dim": 1024}))
    message = error_of(folder)
    assert "this is an SD2.x diffusers folder" in message and describe(folder).family == "SD2.x"
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "in_channels": 8}))
    assert "in_channels=8" in error_of(folder)  # (9, the inpainting U-Net, loads: tests/test_inpaint.py)
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "act_fn": "gelu"}))
    assert "unsupported U-Net config" in error_of(folder)

    (folder / "unet" / "config.json").write_text(json.dumps(config))
    state = load_file(file)
    state["extra.weight"] = t(1)
    save_file(state, file)
    assert "unexpected 1 keys (unet/extra.weight)" in error_of(folder)
    file.unlink()
    assert "no weights in unet/" in error_of(folder)


def test_released_mapping_pages_refault_with_the_same_bytes(tmp_path):
    """Dropping copied pages from torch.load's mapping must never change what a later read sees."""
    path = tmp_path / "pages.ckpt"
    original = {"a": torch.randn(5000), "b": torch.randn(3, 7), "c": torch.arange(10)}
    torch.save({"state_dict": original}, path)
    source = W._open(path)
    if sys.platform.startswith("linux"):
        assert source.entries["a"].release.__self__.ranges  # the mapping was found
    for key, entry in source.entries.items():
        tensor, owned = entry.read()
        assert not owned
        copy = tensor.clone()
        entry.release(tensor)
        assert torch.equal(tensor, copy) and torch.equal(copy, original[key])


def test_diffusers_weight_file_choice(tmp_path):
    def choose(*names: str) -> list[str]:
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        for name in names:
            (folder / name).write_bytes(b"")
        return [p.name for p in W._weight_files(folder)]

    plain, half = "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"
    assert choose(plain, half, "diffusion_pytorch_model.bin", "config.json") == [plain]
    assert choose(half, "diffusion_pytorch_model.bin") == ["diffusion_pytorch_model.bin"]
    assert choose(half, "diffusion_pytorch_model.fp16.bin") == [half]
    assert choose("model.non_ema.safetensors", "model.fp16.bin") == ["model.fp16.bin"]
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert choose(*shards, "model.safetensors.index.json", "model.fp16.safetensors") == shards


def test_unaligned_safetensors_data_is_read_correctly(tmp_path):
    """Other writers need not align tensor data; such tensors are read into their own buffers."""
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(4).half()}
    header, blobs, offset = {}, [], 0
    for key, value in tensors.items():
        blob = value.numpy().tobytes()
        header[key] = {
            "dtype": {torch.float32: "F32", torch.int64: "I64", torch.float16: "F16"}[value.dtype],
            "shape": list(value.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header).encode() + b" "
    if (8 + len(raw)) % 2 == 0:
        raw += b" "  # make the data start odd: no tensor is aligned
    path = tmp_path / "odd.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))
    for key, entry in W._open(path).entries.items():
        value, owned = entry.read()
        assert owned and torch.equal(value, tensors[key])


def test_a_models_own_noise_schedule_travels_with_it(tmp_path):
    """A checkpoint trained on another schedule (the built-in shapes model's) is sampled on that schedule."""
    from dataclasses import replace

    from sd.config import ScheduleConfig
    from sd.pipeline import Pipeline

    config = replace(TINY, schedule=ScheduleConfig(beta_end=0.02))
    path = tmp_path / "other-schedule.safetensors"
    W.save_checkpoint(random_models(config), path, config)
    stored = load_file(path)["alphas_cumprod"]
    models = W.load_models(path)
    assert models["diffusion"].schedule == config.schedule
    pipe = Pipeline(models)
    assert pipe.config.schedule == config.schedule
    assert stored[-1].item() == pytest.approx(2.3e-4, rel=0.01)  # vs SD's 4.7e-3
    assert Pipeline(random_models(TINY)).config.schedule == ScheduleConfig()
