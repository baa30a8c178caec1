"""sd.keymap: the LDM <-> diffusers weight-name maps and config translation.

The SD1.5 oracle (reference JSON) was derived by tracing tensor values through diffusers' own converters,
so equality with it pins the full-size map; the small configs check that the rules generalise, against
diffusers' models, diffusers' converters (by value) and our own modules.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sd.config import SD15, TINY, CLIPConfig, ModelConfig, ScheduleConfig, UNetConfig, VAEConfig
from sd.keymap import (
    LDM_SCHEDULE_BUFFERS,
    OPTIONAL_LDM_KEYS,
    config_from_diffusers,
    diffusers_configs,
    diffusers_key_map,
    normalize_diffusers_key,
    normalize_text_encoder_key,
    normalize_vae_key,
    split_ldm_key,
    vae_reshape_keys,
)

REFERENCE_DIR = Path(
    os.environ.get("SD_REFERENCE_DIR", Path(__file__).resolve().parents[2] / "shared" / "reference")
)
COMPONENTS = ("unet", "vae", "text_encoder")

# Exercises what SD1.5 and TINY do not: attention at the last level only and not at level 0, a level with
# no channel change (no skip conv), a narrowing level (skip conv in the decoder path only), 2 transformer
# blocks per attention, 3 VAE levels, 3-channel latents.
VARIANT = ModelConfig(
    clip=CLIPConfig(vocab_size=100, max_length=8, width=16, layers=1, heads=2, mlp_width=32),
    vae=VAEConfig(
        base_channels=8, channel_mult=(1, 1, 2), num_res_blocks=2, norm_groups=4, latent_channels=3
    ),
    unet=UNetConfig(
        in_channels=3,
        out_channels=3,
        model_channels=8,
        channel_mult=(1, 1, 2, 1),
        num_res_blocks=2,
        attention_levels=(1, 3),
        num_heads=2,
        transformer_depth=2,
        context_dim=16,
        norm_groups=4,
    ),
    schedule=ScheduleConfig(num_train_timesteps=500, beta_start=0.001, beta_end=0.02),
)
SMALL_CONFIGS = {"tiny": TINY, "variant": VARIANT}


def _reference(name: str) -> dict:
    path = REFERENCE_DIR / name
    if not path.exists():
        pytest.skip(f"reference data not found: {path}")
    return json.loads(path.read_text())


# --- SD1.5 against the oracle -----------------------------------------------------------------------------


def test_sd15_map_equals_oracle() -> None:
    oracle = _reference("sd15-ldm-to-diffusers-keymap.json")
    ours = diffusers_key_map(SD15)
    assert set(ours) == set(COMPONENTS)
    for component in COMPONENTS:
        expected = {k: v["ldm"] for k, v in oracle[component].items()}
        assert ours[component] == expected, component
        assert len(ours[component]) == oracle["counts"][component]
    marked = {k for k, v in oracle["vae"].items() if v.get("reshape")}
    assert vae_reshape_keys(SD15) == marked
    assert not any(v.get("reshape") for c in ("unet", "text_encoder") for v in oracle[c].values())


def test_sd15_map_covers_checkpoint_one_to_one() -> None:
    manifest = _reference("sd15-ldm-checkpoint.json")
    checkpoint = set(manifest["keys"])
    mapped = [ldm for component in COMPONENTS for ldm in diffusers_key_map(SD15)[component].values()]
    assert len(mapped) == len(set(mapped)), "two diffusers keys map to one LDM key"
    assert set(manifest["optional_keys"]) == set(OPTIONAL_LDM_KEYS)
    assert set(manifest["schedule_buffers"]["keys"]) == set(LDM_SCHEDULE_BUFFERS)
    assert set(mapped) - OPTIONAL_LDM_KEYS == checkpoint - OPTIONAL_LDM_KEYS - set(LDM_SCHEDULE_BUFFERS)


def test_split_ldm_key_assigns_every_checkpoint_key() -> None:
    manifest = _reference("sd15-ldm-checkpoint.json")
    counts: dict[str, int] = {}
    for key in manifest["keys"]:
        split = split_ldm_key(key)
        if key in LDM_SCHEDULE_BUFFERS:
            assert split is None, key
            continue
        assert split is not None, key
        counts[split[0]] = counts.get(split[0], 0) + 1
    by_prefix = manifest["key_counts_by_prefix"]
    assert counts["clip"] == by_prefix["cond_stage_model.transformer."]
    assert counts["diffusion"] == by_prefix["model.diffusion_model."]
    assert counts["encoder"] + counts["decoder"] == by_prefix["first_stage_model."]
    assert split_ldm_key("first_stage_model.quant_conv.weight") == ("encoder", "quant_conv.weight")
    assert split_ldm_key("first_stage_model.post_quant_conv.bias") == ("decoder", "post_quant_conv.bias")
    assert split_ldm_key("first_stage_model.decoder.up.3.upsample.conv.weight") == (
        "decoder",
        "decoder.up.3.upsample.conv.weight",
    )
    assert split_ldm_key("model.diffusion_model.out.2.bias") == ("diffusion", "out.2.bias")
    assert split_ldm_key("model_ema.decay") is None


def test_sd15_configs_equal_reference() -> None:
    reference = _reference("sd15-diffusers-configs.json")
    ours = diffusers_configs(SD15)
    assert set(ours) == set(COMPONENTS)
    for component in COMPONENTS:
        assert ours[component] == reference[component], component
    # The official folder's own files read back to SD15, scheduler included.
    assert (
        config_from_diffusers(**{c: reference[c] for c in COMPONENTS}, scheduler=reference["scheduler"])
        == SD15
    )
    assert (
        config_from_diffusers(**{c: reference[c] for c in COMPONENTS}, scheduler=reference["scheduler_ddim"])
        == SD15
    )


@pytest.mark.parametrize("config", [SD15, TINY, VARIANT], ids=["sd15", "tiny", "variant"])
def test_config_round_trip(config: ModelConfig) -> None:
    configs = diffusers_configs(config)
    # Through JSON, as read from a folder's config.json files (lists, not tuples).
    configs = json.loads(json.dumps(configs))
    schedule = config.schedule
    scheduler = {
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": schedule.num_train_timesteps,
        "beta_start": schedule.beta_start,
        "beta_end": schedule.beta_end,
    }
    assert config_from_diffusers(**configs, scheduler=scheduler) == config


# --- small configs against diffusers and our modules ------------------------------------------------------


def _diffusers_models(config: ModelConfig) -> dict[str, torch.nn.Module]:
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    configs = diffusers_configs(config)
    with torch.device("meta"):  # key names and shapes only
        return {
            "unet": diffusers.UNet2DConditionModel(**configs["unet"]),
            "vae": diffusers.AutoencoderKL(**configs["vae"]),
            "text_encoder": transformers.CLIPTextModel(
                transformers.CLIPTextConfig(**configs["text_encoder"])
            ),
        }


def _diffusers_shapes(models: dict[str, torch.nn.Module]) -> dict[str, dict[str, tuple[int, ...]]]:
    return {
        c: {normalize_diffusers_key(c, k): tuple(v.shape) for k, v in m.state_dict().items()}
        for c, m in models.items()
    }


@pytest.mark.parametrize("config", SMALL_CONFIGS.values(), ids=SMALL_CONFIGS.keys())
def test_map_matches_diffusers_models(config: ModelConfig) -> None:
    shapes = _diffusers_shapes(_diffusers_models(config))
    key_map = diffusers_key_map(config)
    for component in COMPONENTS:
        # position_ids: a non-persistent buffer in transformers >= 4.31, but a key of the original file.
        assert set(shapes[component]) == set(key_map[component]) - {"text_model.embeddings.position_ids"}
    reshaped = vae_reshape_keys(config)
    assert reshaped <= set(shapes["vae"])
    assert all(len(shapes["vae"][k]) == 2 for k in reshaped)


@pytest.mark.parametrize("config", SMALL_CONFIGS.values(), ids=SMALL_CONFIGS.keys())
def test_map_matches_diffusers_converters_by_value(config: ModelConfig) -> None:
    """diffusers' single-file converters, given unique values in LDM layout, put each tensor at our key."""
    pytest.importorskip("diffusers")
    from diffusers.loaders import single_file_utils as sfu

    key_map = diffusers_key_map(config)
    reshaped = vae_reshape_keys(config)
    shapes = _diffusers_shapes(_diffusers_models(config))
    ldm: dict[str, torch.Tensor] = {}
    start = 0
    for component in COMPONENTS:
        for d_key, ldm_key in key_map[component].items():
            shape = shapes[component].get(d_key, (1, 8))  # position_ids: no diffusers slot, any shape
            if d_key in reshaped:
                shape = (*shape, 1, 1)
            numel = int(torch.Size(shape).numel())
            ldm[ldm_key] = torch.arange(start, start + numel, dtype=torch.float64).reshape(shape)
            start += numel
    configs = diffusers_configs(config)
    converted = {
        "unet": sfu.convert_ldm_unet_checkpoint(ldm, configs["unet"]),
        "vae": sfu.convert_ldm_vae_checkpoint(ldm, configs["vae"]),
        "text_encoder": sfu.convert_ldm_clip_checkpoint(ldm),
    }
    for component in COMPONENTS:
        got = {normalize_diffusers_key(component, k): v for k, v in converted[component].items()}
        # diffusers drops position_ids when the installed CLIPTextModel has no slot for it
        optional = {"text_model.embeddings.position_ids"}
        assert set(got) - optional == set(key_map[component]) - optional, component
        for d_key, tensor in got.items():
            source = ldm[key_map[component][d_key]]
            assert tuple(tensor.shape) == shapes[component].get(d_key, tuple(source.shape)), d_key
            assert torch.equal(tensor.flatten(), source.flatten()), d_key


@pytest.mark.parametrize("config", SMALL_CONFIGS.values(), ids=SMALL_CONFIGS.keys())
def test_map_matches_our_modules(config: ModelConfig) -> None:
    models = pytest.importorskip("sd.models")
    ours = {
        name: {k: tuple(v.shape) for k, v in module.state_dict().items()}
        for name, module in models.build_models(config, device="meta").items()
    }
    shapes = _diffusers_shapes(_diffusers_models(config))
    reshaped = vae_reshape_keys(config)
    covered: dict[str, set[str]] = {name: set() for name in ours}
    for component in COMPONENTS:
        for d_key, ldm_key in diffusers_key_map(config)[component].items():
            split = split_ldm_key(ldm_key)
            assert split is not None, ldm_key
            name, key = split
            if ldm_key in OPTIONAL_LDM_KEYS and key not in ours[name]:
                continue
            assert key in ours[name], (name, key)
            expected = (*shapes[component][d_key], *((1, 1) if d_key in reshaped else ()))
            assert ours[name][key] == expected, (name, key)
            covered[name].add(key)
    for name, keys in ours.items():  # one-to-one: nothing of ours is left without a diffusers source
        assert set(keys) == covered[name], name


# --- key normalisation ------------------------------------------------------------------------------------


def test_key_normalisation() -> None:
    assert (
        normalize_text_encoder_key("encoder.layers.0.mlp.fc1.weight")
        == "text_model.encoder.layers.0.mlp.fc1.weight"
    )
    assert (
        normalize_text_encoder_key("text_model.final_layer_norm.bias") == "text_model.final_layer_norm.bias"
    )
    assert (
        normalize_vae_key("decoder.mid_block.attentions.0.query.weight")
        == "decoder.mid_block.attentions.0.to_q.weight"
    )
    assert normalize_vae_key("encoder.mid_block.attentions.0.proj_attn.bias") == (
        "encoder.mid_block.attentions.0.to_out.0.bias"
    )
    assert (
        normalize_vae_key("encoder.mid_block.attentions.0.to_k.weight")
        == "encoder.mid_block.attentions.0.to_k.weight"
    )
    assert (
        normalize_vae_key("decoder.up_blocks.0.resnets.0.conv1.weight")
        == "decoder.up_blocks.0.resnets.0.conv1.weight"
    )
    assert (
        normalize_diffusers_key("text_encoder", "embeddings.position_ids")
        == "text_model.embeddings.position_ids"
    )
    assert normalize_diffusers_key("unet", "conv_in.weight") == "conv_in.weight"


# --- refusals ---------------------------------------------------------------------------------------------


def _sd15_dicts() -> dict[str, dict]:
    return json.loads(json.dumps(diffusers_configs(SD15)))


def _patched(component: str, **changes: object) -> dict[str, dict]:
    configs = _sd15_dicts()
    configs[component].update(changes)
    return configs


SD2 = _patched(
    "unet",
    use_linear_projection=True,
    attention_head_dim=[5, 10, 20, 20],
    cross_attention_dim=1024,
    upcast_attention=True,
)
SD2["text_encoder"].update(hidden_size=1024, num_attention_heads=16, num_hidden_layers=23, hidden_act="gelu")
SDXL = _patched(
    "unet",
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    use_linear_projection=True,
    transformer_layers_per_block=[1, 2, 10],
    block_out_channels=[320, 640, 1280],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    cross_attention_dim=2048,
)

REFUSALS = {
    "sd2": (SD2, "use_linear_projection"),
    "sdxl": (SDXL, "addition_embed_type"),
    # (in_channels=9, the inpainting U-Net, is read: tests/test_inpaint.py)
    "instruct-pix2pix": (_patched("unet", in_channels=8), "in_channels=8"),
    "lcm": (_patched("unet", time_cond_proj_dim=256), "time_cond_proj_dim"),
    "per-level-heads": (_patched("unet", attention_head_dim=[5, 10, 20, 20]), "attention_head_dim"),
    "per-level-layers": (_patched("unet", layers_per_block=[2, 2, 2, 1]), "layers_per_block"),
    "asymmetric": (_patched("unet", up_block_types=["CrossAttnUpBlock2D"] * 4), "mirror"),
    "mid-no-attention": (_patched("unet", mid_block_type="UNetMidBlock2D"), "mid_block_type"),
    "odd-channels": (_patched("unet", block_out_channels=[320, 480, 1280, 1280]), "multiples"),
    "context-width": (_patched("unet", cross_attention_dim=1024), "cross_attention_dim"),
    "vae-no-quant-conv": (_patched("vae", use_quant_conv=False), "use_quant_conv"),
    "vae-shift": (_patched("vae", shift_factor=0.0609), "shift_factor"),
    "vae-latent-mismatch": (_patched("vae", latent_channels=16), "in_channels=4"),
    "gelu-clip": (_patched("text_encoder", hidden_act="gelu"), "quick_gelu"),
    "projection-clip": (
        _patched("text_encoder", architectures=["CLIPTextModelWithProjection"]),
        "architectures",
    ),
}


@pytest.mark.parametrize(("configs", "needle"), REFUSALS.values(), ids=REFUSALS.keys())
def test_refuses_unsupported_architectures(configs: dict[str, dict], needle: str) -> None:
    with pytest.raises(ValueError, match=r"^unsupported .*") as info:
        config_from_diffusers(**configs)
    message = str(info.value)
    assert "\n" not in message
    assert needle in message


@pytest.mark.parametrize(
    ("scheduler", "needle"),
    [
        ({"prediction_type": "sample"}, "epsilon and v_prediction"),
        ({"beta_schedule": "linear"}, "beta_schedule"),
        ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
    ],
)
def test_refuses_unsupported_schedules(scheduler: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        config_from_diffusers(**_sd15_dicts(), scheduler=scheduler)


def test_reads_the_prediction_type() -> None:
    assert config_from_diffusers(**_sd15_dicts()).schedule.prediction_type == "epsilon"
    scheduler = {"prediction_type": "v_prediction", "beta_end": 0.02}
    schedule = config_from_diffusers(**_sd15_dicts(), scheduler=scheduler).schedule
    assert (schedule.prediction_type, schedule.beta_end) == ("v_prediction", 0.02)


def test_accepts_harmless_variations() -> None:
    configs = _sd15_dicts()
    # Legacy/explicit spellings of SD1.5's own values, and fields that do not change fp32 inference.
    configs["unet"].update(
        attention_head_dim=[8, 8, 8, 8],
        only_cross_attention=[False] * 4,
        transformer_layers_per_block=1,
        num_attention_heads=None,
        mid_block_type="UNetMidBlock2DCrossAttn",
        upcast_attention=True,
        dropout=0.0,
        _diffusers_version="0.6.0",
    )
    configs["vae"].update(force_upcast=False, shift_factor=None, mid_block_add_attention=True)
    for key in ("architectures", "model_type", "torch_dtype", "projection_dim"):
        configs["text_encoder"].pop(key)
    assert config_from_diffusers(**configs) == SD15
    # The trained size is kept, as the default output size (96 latents: SD2's 768 px); not architecture.
    configs["unet"]["sample_size"] = 96
    config = config_from_diffusers(**configs)
    assert config.unet.sample_size == 96
    assert replace(config.unet, sample_size=64) == SD15.unet
    assert diffusers_configs(config)["vae"]["sample_size"] == 768
