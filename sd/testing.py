"""Deterministic random weights in the real checkpoint layout, for parity tests and benchmarks.

No real weights can be downloaded, so correctness is shown by giving our modules and the reference
implementation the same random tensors. Scales are chosen so activations stay O(1) through the deep
networks (a fan-in normal for matrices, perturbed ones/zeros for norms), and every tensor, norms
and biases included, is random so a wrong mapping cannot hide behind a default init.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import SD15, ModelConfig
from .keymap import ldm_key
from .models import build_models


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter of `module` in place with seeded random values."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        if param.ndim >= 2:
            fan_in = param[0].numel()
            std = 0.1 if "embedding" in name else fan_in**-0.5
            param.copy_(torch.randn(param.shape, generator=gen) * std)
        elif name.endswith("weight"):  # norm scales
            param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
        else:
            param.copy_(0.05 * torch.randn(param.shape, generator=gen))
    return module


def random_models(config: ModelConfig = SD15, seed: int = 0) -> dict[str, nn.Module]:
    """The four components with seeded random weights."""
    models = build_models(config)
    for i, model in enumerate(models.values()):
        randomize_(model, seed + i)
    return models


def ldm_state_dict(models: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Merge component state dicts into one original-layout (LDM) state dict."""
    state = {}
    for name, model in models.items():
        for key, value in model.state_dict().items():
            state[ldm_key(name, key)] = value.contiguous()  # channels-last weights: files want plain layout
    return state


# The layers diffusers' LCM-LoRA training script targets (peft target_modules), by kohya name ending: the
# same 278 U-Net layers as a kohya LoCon file, no text encoder.
_LCM_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out_0", "proj_in", "proj_out", "ff_net_0_proj", "ff_net_2", "conv1",
    "conv2", "conv_shortcut", "downsamplers_0_conv", "upsamplers_0_conv", "time_emb_proj",
)  # fmt: skip

_DIFFUSERS_BLOCKS = ("lora_unet_down_blocks", "lora_unet_mid_block", "lora_unet_up_blocks")


@torch.no_grad()
def lcm_lora_like(config: ModelConfig = SD15, rank: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random file in LCM-LoRA's shape (latent-consistency/lcm-lora-sdv1-5): kohya keys with diffusers
    block names, `lora_down`/`lora_up`/`alpha` in fp16 over the U-Net layers it targets (3x3 convs as
    genuine 3x3 LoRA). Values are small but non-zero, so the LoRA changes every layer it names."""
    from .keymap import lora_module_names

    shapes = {
        k: tuple(v.shape) for k, v in build_models(config, device="meta")["diffusion"].state_dict().items()
    }
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, (component, module) in lora_module_names(config).items():
        diffusers_style = name.startswith(
            ("lora_unet_down_blocks", "lora_unet_mid_block", "lora_unet_up_blocks")
        )
        if component != "diffusion" or not diffusers_style or not name.endswith(_LCM_LORA_TARGETS):
            continue
        out_ch, in_ch, *kernel = shapes[f"{module}.weight"]
        down = torch.randn(rank, in_ch, *kernel, generator=gen) * (in_ch * max(1, len(kernel))) ** -0.5
        up = torch.randn(out_ch, rank, *[1] * len(kernel), generator=gen) * 0.02
        state[f"{name}.lora_down.weight"] = down.half()
        state[f"{name}.lora_up.weight"] = up.half()
        state[f"{name}.alpha"] = torch.tensor(float(rank), dtype=torch.float16)
    return state
