"""Weight-name maps between the original CompVis/LDM checkpoint layout and the diffusers layout.

Our modules use the original LDM names, so an original checkpoint loads by stripping a prefix
(``LDM_COMPONENT_PREFIXES``). A diffusers folder needs renaming: ``diffusers_key_map`` builds, from a
``ModelConfig``, the table diffusers key -> original LDM key for each diffusers component. The renames
are data (the ``*_PARAMS`` tables below); the only code is the block-index arithmetic of the two layouts.

The same module also translates architectures: ``diffusers_configs`` writes the config dicts diffusers /
transformers use for a ``ModelConfig``, and ``config_from_diffusers`` reads them back, refusing
architectures our code does not implement.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from sd.config import PREDICTION_TYPES, CLIPConfig, ModelConfig, ScheduleConfig, UNetConfig, VAEConfig

# ---------------------------------------------------------------------------------------------------------
# Prefixes
# ---------------------------------------------------------------------------------------------------------

# diffusers component -> prefix of its tensors in the original single-file checkpoint.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."

# Our component -> (LDM key prefix, our module key prefix) pairs: an LDM key belongs to the first component
# whose prefix it starts with, and our module key is the LDM key with the first prefix swapped for the second.
LDM_COMPONENT_PREFIXES: dict[str, tuple[tuple[str, str], ...]] = {
    "clip": ((TEXT_ENCODER_PREFIX, ""),),
    "encoder": ((VAE_PREFIX + "encoder.", "encoder."), (VAE_PREFIX + "quant_conv.", "quant_conv.")),
    "decoder": ((VAE_PREFIX + "decoder.", "decoder."), (VAE_PREFIX + "post_quant_conv.", "post_quant_conv.")),
    "diffusion": ((UNET_PREFIX, ""),),
}

# Keys of the original file that are not weights of any component.
# position_ids: a [1, 77] arange buffer; files saved with transformers < 4.31 carry it, newer ones do not, and
# some merges store garbage in it, so a loader should regenerate it rather than require or trust it.
OPTIONAL_LDM_KEYS: frozenset[str] = frozenset({TEXT_ENCODER_PREFIX + "text_model.embeddings.position_ids"})
# LatentDiffusion.register_schedule buffers (recomputable from ScheduleConfig).
LDM_SCHEDULE_BUFFERS: tuple[str, ...] = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)
# Training leftovers met in SD1.x-family files that a loader should skip (EMA copies/counters, logvar).
LDM_IGNORED_PREFIXES: tuple[str, ...] = ("model_ema.",)
LDM_IGNORED_KEYS: frozenset[str] = frozenset({"logvar"})


def split_ldm_key(key: str) -> tuple[str, str] | None:
    """Original checkpoint key -> (our component, key in its state_dict); None when no component owns it."""
    for component, pairs in LDM_COMPONENT_PREFIXES.items():
        for ldm_prefix, our_prefix in pairs:
            if key.startswith(ldm_prefix):
                return component, our_prefix + key[len(ldm_prefix) :]
    return None


def ldm_key(component: str, key: str) -> str:
    """Inverse of split_ldm_key: (our component, key in its state_dict) -> original checkpoint key."""
    for ldm_prefix, our_prefix in LDM_COMPONENT_PREFIXES[component]:
        if key.startswith(our_prefix):
            return ldm_prefix + key[len(our_prefix) :]
    raise KeyError(f"{component} has no original-checkpoint name for {key!r}")


# ---------------------------------------------------------------------------------------------------------
# Rename tables: (diffusers module name, LDM module name, parameter suffixes). "" as a module name means the
# prefix itself is the module; "" as a suffix means the module name is the whole key (a buffer).
# ---------------------------------------------------------------------------------------------------------

Table = tuple[tuple[str, str, tuple[str, ...]], ...]

_WB = ("weight", "bias")
_W = ("weight",)
_BUFFER = ("",)


def _same(names: Iterable[str], params: tuple[str, ...] = _WB) -> Table:
    """Table entries whose name is identical in both layouts."""
    return tuple((n, n, params) for n in names)


# U-Net ResBlock (openaimodel.ResBlock <-> diffusers ResnetBlock2D).
UNET_RESNET_PARAMS: Table = (
    ("norm1", "in_layers.0", _WB),
    ("conv1", "in_layers.2", _WB),
    ("time_emb_proj", "emb_layers.1", _WB),
    ("norm2", "out_layers.0", _WB),
    ("conv2", "out_layers.3", _WB),
)
UNET_RESNET_SKIP_PARAMS: Table = (("conv_shortcut", "skip_connection", _WB),)  # only when channels change
# SpatialTransformer <-> Transformer2DModel (SD1: conv 1x1 proj_in/proj_out, identical names).
UNET_SPATIAL_TRANSFORMER_PARAMS: Table = _same(("norm", "proj_in", "proj_out"))
# BasicTransformerBlock: same names in both layouts; q/k/v projections have no bias.
UNET_TRANSFORMER_BLOCK_PARAMS: Table = (
    *_same(("norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2")),
    *_same((f"{attn}.to_{p}" for attn in ("attn1", "attn2") for p in "qkv"), _W),
    *_same(("attn1.to_out.0", "attn2.to_out.0")),
)
UNET_DOWNSAMPLE_PARAMS: Table = (("conv", "op", _WB),)  # down_blocks.N.downsamplers.0.conv <-> ...op
UNET_UPSAMPLE_PARAMS: Table = _same(("conv",))  # up_blocks.N.upsamplers.0.conv <-> ...conv
UNET_STEM_PARAMS: Table = (
    ("conv_in", "input_blocks.0.0", _WB),
    ("time_embedding.linear_1", "time_embed.0", _WB),
    ("time_embedding.linear_2", "time_embed.2", _WB),
    ("conv_norm_out", "out.0", _WB),
    ("conv_out", "out.2", _WB),
)

# VAE ResnetBlock (ldm model.ResnetBlock <-> diffusers ResnetBlock2D without time embedding).
VAE_RESNET_PARAMS: Table = _same(("norm1", "conv1", "norm2", "conv2"))
VAE_RESNET_SKIP_PARAMS: Table = (("conv_shortcut", "nin_shortcut", _WB),)
# Mid-block AttnBlock: LDM uses 1x1 convs [C, C, 1, 1] for q/k/v/proj_out, diffusers nn.Linear [C, C].
VAE_ATTENTION_PARAMS: Table = (
    ("group_norm", "norm", _WB),
    ("to_q", "q", _WB),
    ("to_k", "k", _WB),
    ("to_v", "v", _WB),
    ("to_out.0", "proj_out", _WB),
)
VAE_ATTENTION_RESHAPED = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")  # diffusers names
# VAE attention names saved by diffusers < 0.14 (found in old SD1.x folders; diffusers renames them on load).
VAE_LEGACY_ATTENTION_NAMES: dict[str, str] = {
    "query": "to_q",
    "key": "to_k",
    "value": "to_v",
    "proj_attn": "to_out.0",
}
VAE_ENCODER_STEM_PARAMS: Table = (
    ("conv_in", "conv_in", _WB),
    ("conv_norm_out", "norm_out", _WB),
    ("conv_out", "conv_out", _WB),
)
VAE_DECODER_STEM_PARAMS: Table = VAE_ENCODER_STEM_PARAMS
VAE_QUANT_PARAMS: Table = _same(("quant_conv", "post_quant_conv"))
VAE_DOWNSAMPLE_PARAMS: Table = (("conv", "downsample.conv", _WB),)
VAE_UPSAMPLE_PARAMS: Table = (("conv", "upsample.conv", _WB),)

# CLIP text transformer: the LDM file stores a transformers-4 CLIPTextModel, so names are identical.
CLIP_STEM_PARAMS: Table = (
    *_same(("embeddings.token_embedding", "embeddings.position_embedding"), _W),
    *_same(("embeddings.position_ids",), _BUFFER),
    *_same(("final_layer_norm",)),
)
CLIP_LAYER_PARAMS: Table = _same(
    (
        "layer_norm1",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "layer_norm2",
        "mlp.fc1",
        "mlp.fc2",
    )
)
TEXT_MODEL_LEVEL = "text_model."  # transformers >= 5 CLIPTextModel has no such level; SD1.5 folders do


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _expand(table: Table, diffusers_prefix: str, ldm_prefix: str) -> Iterator[tuple[str, str]]:
    for d_name, l_name, params in table:
        for p in params:
            yield _join(diffusers_prefix, d_name, p), _join(ldm_prefix, l_name, p)


# ---------------------------------------------------------------------------------------------------------
# Layouts: which table sits at which (diffusers prefix, LDM prefix), derived from the config
# ---------------------------------------------------------------------------------------------------------

Placement = tuple[Table, str, str]


def _unet_skip_convs(cfg: UNetConfig) -> tuple[list[bool], list[bool]]:
    """Whether each input-block / output-block ResBlock needs a skip conv (its in and out channels differ).

    Follows openaimodel.UNetModel's channel bookkeeping: every input block pushes its output width on a
    stack that the output blocks pop and concatenate.
    """
    n = cfg.num_res_blocks
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    ch = cfg.model_channels
    stack = [ch]  # conv_in
    down_skip = []
    for level, out in enumerate(widths):
        for _ in range(n):
            down_skip.append(ch != out)
            ch = out
            stack.append(ch)
        if level != len(widths) - 1:
            stack.append(ch)  # downsample keeps the width
    up_skip = []
    for out in reversed(widths):
        for _ in range(n + 1):
            up_skip.append(ch + stack.pop() != out)
            ch = out
    return down_skip, up_skip


def _unet_layout(cfg: UNetConfig) -> Iterator[Placement]:
    n = cfg.num_res_blocks
    levels = len(cfg.channel_mult)
    down_skip, up_skip = _unet_skip_convs(cfg)
    transformer = [
        (UNET_SPATIAL_TRANSFORMER_PARAMS, "", ""),
        *(
            (UNET_TRANSFORMER_BLOCK_PARAMS, f"transformer_blocks.{d}", f"transformer_blocks.{d}")
            for d in range(cfg.transformer_depth)
        ),
    ]

    def attention(d_prefix: str, l_prefix: str) -> Iterator[Placement]:
        for table, d_sub, l_sub in transformer:
            yield table, _join(d_prefix, d_sub), _join(l_prefix, l_sub)

    def resnet(d_prefix: str, l_prefix: str, skip: bool) -> Iterator[Placement]:
        yield UNET_RESNET_PARAMS, d_prefix, l_prefix
        if skip:
            yield UNET_RESNET_SKIP_PARAMS, d_prefix, l_prefix

    yield UNET_STEM_PARAMS, "", ""
    # Encoder path: input_blocks.0 is conv_in; each level then has n (ResBlock[, SpatialTransformer]) blocks
    # and, except the last level, one Downsample block: n + 1 input blocks per level.
    for level in range(levels):
        has_attn = level in cfg.attention_levels
        for j in range(n):
            idx = 1 + level * (n + 1) + j
            yield from resnet(
                f"down_blocks.{level}.resnets.{j}", f"input_blocks.{idx}.0", down_skip[level * n + j]
            )
            if has_attn:
                yield from attention(f"down_blocks.{level}.attentions.{j}", f"input_blocks.{idx}.1")
        if level != levels - 1:
            yield (
                UNET_DOWNSAMPLE_PARAMS,
                f"down_blocks.{level}.downsamplers.0",
                f"input_blocks.{(level + 1) * (n + 1)}.0",
            )
    # Middle: ResBlock, SpatialTransformer, ResBlock (always with attention in SD1).
    yield from resnet("mid_block.resnets.0", "middle_block.0", False)
    yield from attention("mid_block.attentions.0", "middle_block.1")
    yield from resnet("mid_block.resnets.1", "middle_block.2", False)
    # Decoder path: up_blocks.i is level levels-1-i, n + 1 output blocks each; the Upsample is the last
    # module of the level's last output block, after the optional SpatialTransformer.
    for i in range(levels):
        has_attn = (levels - 1 - i) in cfg.attention_levels
        for j in range(n + 1):
            idx = i * (n + 1) + j
            yield from resnet(
                f"up_blocks.{i}.resnets.{j}", f"output_blocks.{idx}.0", up_skip[i * (n + 1) + j]
            )
            if has_attn:
                yield from attention(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{idx}.1")
        if i != levels - 1:
            slot = 2 if has_attn else 1
            yield (
                UNET_UPSAMPLE_PARAMS,
                f"up_blocks.{i}.upsamplers.0",
                f"output_blocks.{i * (n + 1) + n}.{slot}",
            )


def _vae_layout(cfg: VAEConfig) -> Iterator[Placement]:
    n = cfg.num_res_blocks
    levels = len(cfg.channel_mult)
    widths = [cfg.base_channels * m for m in cfg.channel_mult]

    def resnet(d_prefix: str, l_prefix: str, skip: bool) -> Iterator[Placement]:
        yield VAE_RESNET_PARAMS, d_prefix, l_prefix
        if skip:
            yield VAE_RESNET_SKIP_PARAMS, d_prefix, l_prefix

    def mid(side: str) -> Iterator[Placement]:
        yield from resnet(f"{side}.mid_block.resnets.0", f"{side}.mid.block_1", False)
        yield VAE_ATTENTION_PARAMS, f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1"
        yield from resnet(f"{side}.mid_block.resnets.1", f"{side}.mid.block_2", False)

    yield VAE_QUANT_PARAMS, "", ""
    # Encoder: down.i has n ResnetBlocks then (except the last level) a Downsample; same order in diffusers.
    yield VAE_ENCODER_STEM_PARAMS, "encoder", "encoder"
    ch = cfg.base_channels
    for level, out in enumerate(widths):
        for j in range(n):
            yield from resnet(
                f"encoder.down_blocks.{level}.resnets.{j}", f"encoder.down.{level}.block.{j}", ch != out
            )
            ch = out
        if level != levels - 1:
            yield (
                VAE_DOWNSAMPLE_PARAMS,
                f"encoder.down_blocks.{level}.downsamplers.0",
                f"encoder.down.{level}",
            )
    yield from mid("encoder")
    # Decoder: n + 1 ResnetBlocks per level; diffusers numbers up_blocks from the deepest level, LDM's up.i
    # is level i, so up_blocks.i <-> up.{levels-1-i}. The Upsample belongs to every level but level 0.
    yield VAE_DECODER_STEM_PARAMS, "decoder", "decoder"
    yield from mid("decoder")
    ch = widths[-1]
    for i in range(levels):
        level = levels - 1 - i
        for j in range(n + 1):
            out = widths[level]
            yield from resnet(
                f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}", ch != out
            )
            ch = out
        if level != 0:
            yield VAE_UPSAMPLE_PARAMS, f"decoder.up_blocks.{i}.upsamplers.0", f"decoder.up.{level}"


def _clip_layout(cfg: CLIPConfig) -> Iterator[Placement]:
    yield CLIP_STEM_PARAMS, "text_model", "text_model"
    for i in range(cfg.layers):
        yield CLIP_LAYER_PARAMS, f"text_model.encoder.layers.{i}", f"text_model.encoder.layers.{i}"


def _build(placements: Iterable[Placement], ldm_root: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for table, d_prefix, l_prefix in placements:
        for d_key, l_key in _expand(table, d_prefix, l_prefix):
            if d_key in out:  # a layout bug, not a user error
                raise AssertionError(f"duplicate diffusers key {d_key}")
            out[d_key] = ldm_root + l_key
    return out


def diffusers_key_map(config: ModelConfig) -> dict[str, dict[str, str]]:
    """Per diffusers component ("unet", "vae", "text_encoder"): diffusers key -> full original LDM key.

    Text-encoder keys are in the ``text_model.*`` form of real SD1.5 folders (see
    ``normalize_text_encoder_key``) and include the optional ``position_ids`` buffer.
    """
    return {
        "unet": _build(_unet_layout(config.unet), UNET_PREFIX),
        "vae": _build(_vae_layout(config.vae), VAE_PREFIX),
        "text_encoder": _build(_clip_layout(config.clip), TEXT_ENCODER_PREFIX),
    }


CONTROLNET_PREFIX = "control_model."
# ControlNet's own parts (cldm.ControlNet <-> diffusers ControlNetModel); its encoder is the U-Net's.
CONTROLNET_ENCODER_PARTS = ("time_embed.", "input_blocks.", "middle_block.")


def controlnet_key_map(unet: UNetConfig, hint_convs: int = 8) -> dict[str, str]:
    """diffusers ControlNetModel key -> original key (under `control_model.`) for a ControlNet copying
    `unet`, whose hint encoder has `hint_convs` convs (input_hint_block.0, .2, ..., the last one out)."""
    unet_keys = _build(_unet_layout(unet), CONTROLNET_PREFIX)
    parts = tuple(CONTROLNET_PREFIX + part for part in CONTROLNET_ENCODER_PARTS)
    encoder = {ours: theirs for ours, theirs in unet_keys.items() if theirs.startswith(parts)}
    input_blocks = len(unet.channel_mult) * (unet.num_res_blocks + 1)  # conv_in, then n + 1 per level but one
    table: Table = (
        ("controlnet_cond_embedding.conv_in", "input_hint_block.0", _WB),
        *((f"controlnet_cond_embedding.blocks.{k}", f"input_hint_block.{2 * k + 2}", _WB)
          for k in range(hint_convs - 2)),
        ("controlnet_cond_embedding.conv_out", f"input_hint_block.{2 * hint_convs - 2}", _WB),
        *((f"controlnet_down_blocks.{i}", f"zero_convs.{i}.0", _WB) for i in range(input_blocks)),
        ("controlnet_mid_block", "middle_block_out.0", _WB),
    )  # fmt: skip
    return {**encoder, **_build([(table, "", "")], CONTROLNET_PREFIX)}


def vae_reshape_keys(config: ModelConfig) -> frozenset[str]:
    """Diffusers VAE keys: linear [C, C] in diffusers, 1x1 conv [C, C, 1, 1] in LDM (same data order)."""
    del config  # one mid-block attention per side whatever the size; kept for symmetry with the other maps
    return frozenset(
        f"{side}.mid_block.attentions.0.{p}"
        for side in ("encoder", "decoder")
        for p in VAE_ATTENTION_RESHAPED
    )


def normalize_text_encoder_key(key: str) -> str:
    """Bring a CLIPTextModel key to the ``text_model.*`` form (transformers >= 5 has no such level)."""
    return key if key.startswith(TEXT_MODEL_LEVEL) else TEXT_MODEL_LEVEL + key


def normalize_vae_key(key: str) -> str:
    """Rename the pre-0.14 diffusers VAE attention names (query/key/value/proj_attn) to the current ones."""
    head, _, tail = key.rpartition(".")  # tail is weight/bias
    module_path, _, name = head.rpartition(".")
    if ".mid_block.attentions." in key and name in VAE_LEGACY_ATTENTION_NAMES:
        return f"{module_path}.{VAE_LEGACY_ATTENTION_NAMES[name]}.{tail}"
    return key


def normalize_diffusers_key(component: str, key: str) -> str:
    """Normalize a key read from a diffusers folder's ``component`` (unet / vae / text_encoder) weights."""
    if component == "text_encoder":
        return normalize_text_encoder_key(key)
    if component == "vae":
        return normalize_vae_key(key)
    return key


# ---------------------------------------------------------------------------------------------------------
# Config translation
# ---------------------------------------------------------------------------------------------------------

_UNET_ATTN_DOWN, _UNET_PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
_UNET_ATTN_UP, _UNET_PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"
_VAE_DOWN, _VAE_UP = "DownEncoderBlock2D", "UpDecoderBlock2D"

# UNet2DConditionModel options our U-Net hard-codes: field -> accepted values (first = what we write; a
# missing field means diffusers' default, which is always accepted). Fields not listed and not read below
# (dropout, upcast_attention, sample_size, ...) do not change fp32 inference.
_UNET_FIXED: dict[str, tuple[Any, ...]] = {
    "center_input_sample": (False,),
    "flip_sin_to_cos": (True,),
    "freq_shift": (0,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "only_cross_attention": (False,),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1,),
    "act_fn": ("silu",),
    "norm_eps": (1e-5,),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,),
    "dual_cross_attention": (False,),
    "use_linear_projection": (False,),
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "projection_class_embeddings_input_dim": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
}
# The fields written for SD1.5 (in the official config.json) that come from _UNET_FIXED.
_UNET_WRITTEN_FIXED = (
    "act_fn",
    "center_input_sample",
    "downsample_padding",
    "flip_sin_to_cos",
    "freq_shift",
    "mid_block_scale_factor",
    "norm_eps",
)
# Friendlier messages for the fields that identify a known unsupported model family.
_UNET_REFUSALS: dict[str, str] = {
    "addition_embed_type": "SDXL-style added conditioning (addition_embed_type) is not supported",
    "class_embed_type": "class-conditioned U-Nets (class_embed_type, e.g. the x4 upscaler) are not supported",
    "time_cond_proj_dim": "guidance-distilled (LCM-style time_cond_proj_dim) U-Nets are not supported",
    "use_linear_projection": "SD2-style linear proj_in/proj_out (use_linear_projection) is not supported",
}

_VAE_FIXED: dict[str, tuple[Any, ...]] = {
    "act_fn": ("silu",),
    "shift_factor": (None, 0.0),
    "latents_mean": (None,),
    "latents_std": (None,),
    "use_quant_conv": (True,),
    "use_post_quant_conv": (True,),
    "mid_block_add_attention": (True,),
}

# transformers CLIPTextConfig defaults for the fields we read (used when config.json omits one).
_CLIP_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "layer_norm_eps": 1e-5,
    "hidden_act": "quick_gelu",
}

_SCHEDULER_FIXED: dict[str, tuple[Any, ...]] = {
    "beta_schedule": ("scaled_linear",),
    "prediction_type": PREDICTION_TYPES,
    "trained_betas": (None,),
    "rescale_betas_zero_snr": (False,),
}


def diffusers_configs(config: ModelConfig) -> dict[str, dict[str, Any]]:
    """Config dicts for diffusers' UNet2DConditionModel / AutoencoderKL and transformers' CLIPTextConfig.

    Returns ``{"unet": ..., "vae": ..., "text_encoder": ...}``; for SD15 they equal the official
    config.json contents. Each dict can be passed as ``**kwargs`` to its class.
    """
    u, v, c = config.unet, config.vae, config.clip
    levels = range(len(u.channel_mult))
    unet: dict[str, Any] = {
        "_class_name": "UNet2DConditionModel",
        **{k: _UNET_FIXED[k][0] for k in _UNET_WRITTEN_FIXED},
        # diffusers' SD1 "attention_head_dim" is historically the number of heads (diffusers issue #2011).
        "attention_head_dim": u.num_heads,
        "block_out_channels": [u.model_channels * m for m in u.channel_mult],
        "cross_attention_dim": u.context_dim,
        "down_block_types": [
            _UNET_ATTN_DOWN if i in u.attention_levels else _UNET_PLAIN_DOWN for i in levels
        ],
        "in_channels": u.in_channels,
        "layers_per_block": u.num_res_blocks,
        "norm_num_groups": u.norm_groups,
        "out_channels": u.out_channels,
        "sample_size": u.sample_size,
        "up_block_types": [
            _UNET_ATTN_UP if i in u.attention_levels else _UNET_PLAIN_UP for i in reversed(levels)
        ],
    }
    if u.transformer_depth != 1:  # left out at its default, as in the official SD1.5 config.json
        unet["transformer_layers_per_block"] = u.transformer_depth
    vae: dict[str, Any] = {
        "_class_name": "AutoencoderKL",
        "act_fn": _VAE_FIXED["act_fn"][0],
        "block_out_channels": [v.base_channels * m for m in v.channel_mult],
        "down_block_types": [_VAE_DOWN] * len(v.channel_mult),
        "in_channels": v.in_channels,
        "latent_channels": v.latent_channels,
        "layers_per_block": v.num_res_blocks,
        "norm_num_groups": v.norm_groups,
        "out_channels": v.in_channels,
        "sample_size": u.sample_size * v.downscale,
        "scaling_factor": v.scaling_factor,
        "up_block_types": [_VAE_UP] * len(v.channel_mult),
    }
    text_encoder: dict[str, Any] = {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "attention_dropout": 0.0,
        # bos/eos 0/2 are what the official SD1.5 config says (not the tokenizer's 49406/49407);
        # transformers keys its legacy argmax pooling off eos_token_id == 2. Only the pooled output
        # depends on it, and SD uses none.
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": "quick_gelu",
        "hidden_size": c.width,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": c.mlp_width,
        "layer_norm_eps": c.layer_norm_eps,
        "max_position_embeddings": c.max_length,
        "num_attention_heads": c.heads,
        "num_hidden_layers": c.layers,
        "pad_token_id": 1,
        "projection_dim": c.width,
        "torch_dtype": "float32",
        "vocab_size": c.vocab_size,
    }
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder}


def _refuse(what: str, message: str) -> ValueError:
    return ValueError(f"unsupported {what} config: {message}")


def _same_value(a: Any, b: Any) -> bool:
    # Identity for None/bools so that False is not taken for 0 (or the other way round).
    if a is None or b is None or isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def _check_fixed(
    what: str, cfg: dict[str, Any], fixed: dict[str, tuple[Any, ...]], refusals: dict[str, str]
) -> None:
    # The fields that name a known model family go first, so SDXL is not reported as "SD2-style".
    for field in [*refusals, *(f for f in fixed if f not in refusals)]:
        if field not in cfg:
            continue
        value = cfg[field]
        if isinstance(value, list) and value and all(_same_value(x, value[0]) for x in value):
            value = value[0]  # per-block lists with one value everywhere (e.g. only_cross_attention)
        if not any(_same_value(value, a) for a in fixed[field]):
            raise _refuse(
                what, refusals.get(field, f"{field}={cfg[field]!r} (we implement {fixed[field][0]!r})")
            )


def _uniform(what: str, cfg: dict[str, Any], field: str, default: Any) -> Any:
    """A per-block field that we only support with one value for every block."""
    value = cfg.get(field, default)
    if isinstance(value, (list, tuple)):
        if not value or any(x != value[0] for x in value) or isinstance(value[0], (list, tuple)):
            raise _refuse(what, f"{field}={value!r} varies per block (we support one value for all blocks)")
        value = value[0]
    return value


def _channel_mult(what: str, block_out_channels: Sequence[int]) -> tuple[int, tuple[int, ...]]:
    base = block_out_channels[0]
    if any(c % base for c in block_out_channels):
        raise _refuse(what, f"block_out_channels={list(block_out_channels)} are not multiples of the first")
    return base, tuple(c // base for c in block_out_channels)


def _unet_from_diffusers(d: dict[str, Any]) -> UNetConfig:
    what = "U-Net"
    if d.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise _refuse(what, f"_class_name={d['_class_name']!r} (we implement UNet2DConditionModel)")
    _check_fixed(what, d, _UNET_FIXED, _UNET_REFUSALS)
    down = list(d.get("down_block_types", [_UNET_ATTN_DOWN] * 3 + [_UNET_PLAIN_DOWN]))
    up = list(d.get("up_block_types", [_UNET_PLAIN_UP] + [_UNET_ATTN_UP] * 3))
    block_out = list(d.get("block_out_channels", [320, 640, 1280, 1280]))
    if not (len(down) == len(up) == len(block_out)):
        raise _refuse(what, "down_block_types, up_block_types and block_out_channels differ in length")
    unknown = sorted({*down, *up} - {_UNET_ATTN_DOWN, _UNET_PLAIN_DOWN, _UNET_ATTN_UP, _UNET_PLAIN_UP})
    if unknown:
        raise _refuse(
            what, f"block types {unknown} (we implement {_UNET_ATTN_DOWN}/{_UNET_PLAIN_DOWN} and Up twins)"
        )
    attention_levels = tuple(i for i, t in enumerate(down) if t == _UNET_ATTN_DOWN)
    if [t == _UNET_ATTN_UP for t in reversed(up)] != [t == _UNET_ATTN_DOWN for t in down]:
        raise _refuse(what, f"up_block_types {up} do not mirror down_block_types {down}")
    model_channels, channel_mult = _channel_mult(what, block_out)
    cross = d.get("cross_attention_dim", 1280)
    if not isinstance(cross, int):
        raise _refuse(what, f"cross_attention_dim={cross!r} varies per block")
    return UNetConfig(
        in_channels=d.get("in_channels", 4),
        out_channels=d.get("out_channels", 4),
        model_channels=model_channels,
        channel_mult=channel_mult,
        num_res_blocks=_uniform(what, d, "layers_per_block", 2),
        attention_levels=attention_levels,
        num_heads=_uniform(what, d, "attention_head_dim", 8),
        transformer_depth=_uniform(what, d, "transformer_layers_per_block", 1),
        context_dim=cross,
        norm_groups=d.get("norm_num_groups", 32),
        # the default output size; a [height, width] pair (rare) keeps SD1's
        sample_size=d["sample_size"] if isinstance(d.get("sample_size"), int) else UNetConfig.sample_size,
    )


def _vae_from_diffusers(d: dict[str, Any]) -> VAEConfig:
    what = "VAE"
    if d.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise _refuse(what, f"_class_name={d['_class_name']!r} (we implement AutoencoderKL)")
    _check_fixed(what, d, _VAE_FIXED, {})
    block_out = list(d.get("block_out_channels", [64]))
    down = list(d.get("down_block_types", [_VAE_DOWN]))
    up = list(d.get("up_block_types", [_VAE_UP]))
    if down != [_VAE_DOWN] * len(block_out) or up != [_VAE_UP] * len(block_out):
        raise _refuse(what, f"block types {down}/{up} (we implement {_VAE_DOWN}/{_VAE_UP}, one per level)")
    in_channels, out_channels = d.get("in_channels", 3), d.get("out_channels", 3)
    if in_channels != out_channels:
        raise _refuse(what, f"in_channels={in_channels} != out_channels={out_channels}")
    base, mult = _channel_mult(what, block_out)
    return VAEConfig(
        in_channels=in_channels,
        latent_channels=d.get("latent_channels", 4),
        base_channels=base,
        channel_mult=mult,
        num_res_blocks=d.get("layers_per_block", 1),
        norm_groups=d.get("norm_num_groups", 32),
        scaling_factor=d.get("scaling_factor", 0.18215),
    )


def _clip_from_transformers(d: dict[str, Any]) -> CLIPConfig:
    what = "text encoder"
    architectures = d.get("architectures") or ["CLIPTextModel"]
    if (
        list(architectures) != ["CLIPTextModel"]
        or d.get("model_type", "clip_text_model") != "clip_text_model"
    ):
        raise _refuse(what, f"architectures={architectures!r} (we implement CLIPTextModel)")
    v = {k: d.get(k, default) for k, default in _CLIP_DEFAULTS.items()}
    if v["hidden_act"] != "quick_gelu":
        raise _refuse(
            what, f"hidden_act={v['hidden_act']!r} (we implement quick_gelu, the OpenAI CLIP of SD1)"
        )
    return CLIPConfig(
        vocab_size=v["vocab_size"],
        max_length=v["max_position_embeddings"],
        width=v["hidden_size"],
        layers=v["num_hidden_layers"],
        heads=v["num_attention_heads"],
        mlp_width=v["intermediate_size"],
        layer_norm_eps=v["layer_norm_eps"],
    )


def _schedule_from_diffusers(d: dict[str, Any]) -> ScheduleConfig:
    _check_fixed(
        "scheduler",
        d,
        _SCHEDULER_FIXED,
        {"prediction_type": "only epsilon and v_prediction models are supported"},
    )
    default = ScheduleConfig()
    return ScheduleConfig(
        num_train_timesteps=d.get("num_train_timesteps", default.num_train_timesteps),
        beta_start=d.get("beta_start", default.beta_start),
        beta_end=d.get("beta_end", default.beta_end),
        prediction_type=d.get("prediction_type", default.prediction_type),
    )


def config_from_diffusers(
    unet: dict[str, Any],
    vae: dict[str, Any],
    text_encoder: dict[str, Any],
    scheduler: dict[str, Any] | None = None,
) -> ModelConfig:
    """``ModelConfig`` for a diffusers folder's config.json dicts (inverse of ``diffusers_configs``).

    ``scheduler`` (optional) is scheduler/scheduler_config.json: its training schedule must be
    ``scaled_linear`` with epsilon or v prediction; when omitted the SD1 schedule is assumed.
    Raises ValueError with a one-line message for architectures our code does not implement.
    """
    u = _unet_from_diffusers(unet)
    v = _vae_from_diffusers(vae)
    c = _clip_from_transformers(text_encoder)
    # The inpainting U-Net takes latents, mask and masked-image latents (2 * latent + 1 channels).
    if u.in_channels not in (v.latent_channels, 2 * v.latent_channels + 1):
        raise _refuse(
            "U-Net",
            f"in_channels={u.in_channels} but the VAE latent has {v.latent_channels} channels "
            "(only plain and inpainting U-Nets are supported)",
        )
    if u.out_channels != v.latent_channels:
        raise _refuse(
            "U-Net", f"out_channels={u.out_channels} but the VAE latent has {v.latent_channels} channels"
        )
    if u.context_dim != c.width:
        raise _refuse("U-Net", f"cross_attention_dim={u.context_dim} but the text encoder width is {c.width}")
    schedule = ScheduleConfig() if scheduler is None else _schedule_from_diffusers(scheduler)
    return ModelConfig(clip=c, vae=v, unet=u, schedule=schedule)


# ---------------------------------------------------------------------------------------------------------
# LoRA module names: every name a LoRA file gives one of our modules
# ---------------------------------------------------------------------------------------------------------

# kohya-ss names are a module path with "." -> "_" after a prefix; peft / diffusers names keep the dots.
# kohya SD1.x files mostly use the diffusers module paths (sd-scripts trains on a copy of the diffusers
# U-Net); files extracted from LDM checkpoints use the original ones; both are registered.
LORA_KOHYA_PREFIXES: dict[str, str] = {"lora_unet_": "diffusion", "lora_te_": "clip", "lora_te1_": "clip"}
LORA_PEFT_PREFIXES: dict[str, str] = {"unet.": "diffusion", "text_encoder.": "clip"}
# Old diffusers attention-processor files: the tail of a module path -> what they call that module.
LORA_ATTN_PROCS_NAMES: tuple[tuple[str, str], ...] = (
    *((f"{a}.to_{p}", f"{a}.processor.to_{p}_lora") for a in ("attn1", "attn2") for p in "qkv"),
    ("attn1.to_out.0", "attn1.processor.to_out_lora"),
    ("attn2.to_out.0", "attn2.processor.to_out_lora"),
    *((f"self_attn.{p}_proj", f"self_attn.to_{p}_lora") for p in "qkv"),
    ("self_attn.out_proj", "self_attn.to_out_lora"),
)
# Names that only LoRAs of other model families carry: (name prefix, what the file is).
LORA_OTHER_FAMILY_PREFIXES: tuple[tuple[str, str], ...] = (
    ("lora_te2_", "an SDXL LoRA (it has a second text encoder, lora_te2_*)"),
    ("text_encoder_2.", "an SDXL LoRA (it has a second text encoder, text_encoder_2.*)"),
)
# Cross-attention context width (attn2.to_k input) and text-encoder width of each family.
LORA_FAMILY_WIDTHS: dict[int, str] = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}


def _attn_procs_name(path: str) -> str | None:
    for ours, theirs in LORA_ATTN_PROCS_NAMES:
        if path.endswith("." + ours):
            return path[: -len(ours)] + theirs
    return None


def lora_module_names(config: ModelConfig) -> dict[str, tuple[str, str]]:
    """LoRA module name -> (our component "diffusion" / "clip", our module path), for every module of
    the U-Net and text encoder that has a weight, in each naming a LoRA file may use."""
    out: dict[str, tuple[str, str]] = {}

    def add(name: str, target: tuple[str, str]) -> None:
        if out.setdefault(name, target) != target:  # a layout bug, not a user error
            raise AssertionError(f"LoRA name {name} means both {out[name]} and {target}")

    keys = diffusers_key_map(config)
    for d_key, l_key in keys["unet"].items():
        if not d_key.endswith(".weight"):
            continue
        d_path, ours = d_key.removesuffix(".weight"), l_key[len(UNET_PREFIX) :].removesuffix(".weight")
        target = ("diffusion", ours)
        for path in (d_path, ours):
            add("lora_unet_" + path.replace(".", "_"), target)
        add("unet." + d_path, target)
        if (old := _attn_procs_name(d_path)) is not None:
            add("unet." + old, target)
    for d_key, l_key in keys["text_encoder"].items():
        if not d_key.endswith(".weight"):
            continue
        ours = l_key[len(TEXT_ENCODER_PREFIX) :].removesuffix(".weight")
        target = ("clip", ours)
        for prefix in ("lora_te_", "lora_te1_"):
            add(prefix + ours.replace(".", "_"), target)
        # transformers >= 5 saves CLIPTextModel paths without the text_model level
        for path in (ours, ours.removeprefix(TEXT_MODEL_LEVEL)):
            add("text_encoder." + path, target)
            if (old := _attn_procs_name(path)) is not None:
                add("text_encoder." + old, target)
    return out
