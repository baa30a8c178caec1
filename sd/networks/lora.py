"""LoRA / LyCORIS files read onto our module names.

A file is a flat dict of tensors, each key a module name plus a suffix naming the tensor's role:

    kohya-ss     lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight / .lora_up.weight / .alpha
                 (diffusers block names, or the original ones: lora_unet_input_blocks_1_1_proj_in...),
                 lora_te_text_model_encoder_layers_0_self_attn_q_proj...; LyCORIS adds .lora_mid.weight,
                 .hada_w1_a ... (LoHa), .lokr_w1 ... (LoKr), .dora_scale (DoRA)
    peft         unet.down_blocks.0.attentions.0.proj_in.lora_A.weight / .lora_B.weight (alpha: the
                 "lora_adapter_metadata" JSON in the safetensors header, else scale 1)
    old diffusers unet....attn1.processor.to_q_lora.down.weight, text_encoder....mlp.fc1.lora_linear_layer...

Module names go through `sd.keymap.lora_module_names`; the math is `sd.networks.deltas`. Pickles (.pt,
.ckpt) are opened only with torch.load(weights_only=True): a file that needs code to load is refused.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..keymap import (
    LORA_FAMILY_WIDTHS,
    LORA_KOHYA_PREFIXES,
    LORA_OTHER_FAMILY_PREFIXES,
    LORA_PEFT_PREFIXES,
    lora_module_names,
)
from ..weights import CheckpointError, read_tensor_file
from .deltas import kind_of

log = logging.getLogger("sd")

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")

# Tensor suffix -> role (sd.networks.deltas). Matched longest first, so ".lora_linear_layer.down.weight"
# wins over the old attention-processor ".down.weight".
_ROLES: dict[str, str] = {
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora_mid.weight": "mid",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
    ".down.weight": "down",
    ".up.weight": "up",
    ".alpha": "alpha",
    ".scale": "scale",
    ".dora_scale": "dora_scale",
    **{f".hada_{n}": f"hada_{n}" for n in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f".lokr_{n}": f"lokr_{n}" for n in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t1", "t2")},
}
_SUFFIXES = sorted(_ROLES, key=len, reverse=True)
_PEFT_METADATA_KEY = "lora_adapter_metadata"


@dataclass(frozen=True)
class ModuleNetwork:
    """The tensors one file holds for one of our modules (roles as in sd.networks.deltas)."""

    component: str  # "diffusion" or "clip"
    module: str  # our module path, e.g. "input_blocks.1.1.proj_in"
    tensors: dict[str, torch.Tensor]

    @property
    def kind(self) -> str:
        return kind_of(self.tensors) or "?"


@dataclass
class LoraFile:
    """One LoRA file, read and mapped onto our modules."""

    path: Path
    modules: list[ModuleNetwork]
    metadata: dict[str, str] = field(default_factory=dict)
    # (resolved path, size, mtime): the file as read, so a changed file is read again
    stamp: tuple[str, int, int] = ("", 0, 0)
    used_keys: int = 0
    skipped_keys: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def alias(self) -> str:
        """A1111's alias: the training run's output name when the file records one."""
        return self.metadata.get("ss_output_name") or self.name


def _split(key: str) -> tuple[str, str] | None:
    for suffix in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], _ROLES[suffix]
    return None


def read_tensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of a LoRA file; ValueError (one line) when it cannot be read."""
    path = Path(path)
    if path.suffix.lower() not in (".safetensors", ".pt", ".ckpt", ".bin", ".pth"):
        raise ValueError(f"{path}: not a LoRA file (expected {', '.join(LORA_SUFFIXES)})")
    try:
        return read_tensor_file(path, "LoRA")
    except CheckpointError as error:
        raise ValueError(str(error)) from None


def _peft_alphas(metadata: Mapping[str, str]) -> dict[str, Any]:
    """diffusers' saved LoraConfig fields ("unet.lora_alpha", "text_encoder.alpha_pattern", ...)."""
    raw = metadata.get(_PEFT_METADATA_KEY)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _peft_alpha(config: Mapping[str, Any], name: str) -> float | None:
    """The alpha diffusers' metadata gives the peft module `name` ("unet.down_blocks...to_q")."""
    prefix, _, path = name.partition(".")
    pattern = config.get(f"{prefix}.alpha_pattern") or {}
    for key, value in pattern.items() if isinstance(pattern, dict) else ():
        if path == key or path.endswith("." + key):
            return float(value)
    alpha = config.get(f"{prefix}.lora_alpha")
    return float(alpha) if alpha is not None else None


def _foreign_family(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], config: ModelConfig
) -> str | None:
    """What a file is when it is a LoRA for another model family (SD2, SDXL), by names and shapes."""
    for prefix, what in LORA_OTHER_FAMILY_PREFIXES:
        if any(k.startswith(prefix) for k in tensors):
            return what
    base = metadata.get("ss_base_model_version", "")
    if base.startswith("sdxl"):
        return f"an SDXL LoRA (ss_base_model_version {base})"
    if base.startswith("sd_v2") or metadata.get("ss_v2") == "True":
        return f"an SD2.x LoRA (ss_base_model_version {base or 'sd_v2'})"
    for key, t in tensors.items():
        module_role = _split(key)
        if module_role is None or module_role[1] not in ("down", "lokr_w2_b") or t.dim() < 2:
            continue
        module = module_role[0]
        width = t.shape[1]
        attn2_kv = any(s in module for s in ("attn2_to_k", "attn2_to_v", "attn2.to_k", "attn2.to_v"))
        text_encoder = module.startswith(("lora_te", "text_encoder.")) and (
            "q_proj" in module or "to_q" in module
        )
        ours = config.unet.context_dim if attn2_kv else config.clip.width
        # (an SD1.x file on a model of another size fails on its shapes, when merged)
        if (attn2_kv or text_encoder) and width != ours and LORA_FAMILY_WIDTHS.get(width, "SD1.x") != "SD1.x":
            where = "cross-attention" if attn2_kv else "text-encoder"
            return f"an {LORA_FAMILY_WIDTHS[width]} LoRA ({width}-wide {where} input, this model's is {ours})"
    return None


@lru_cache(maxsize=4)
def _names(config: ModelConfig) -> dict[str, tuple[str, str]]:
    return lora_module_names(config)


def map_tensors(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], config: ModelConfig, where: str
) -> tuple[list[ModuleNetwork], int, list[str]]:
    """(modules, keys used, keys skipped) of a file's tensors on a model of `config`.

    ValueError (one line) for a LoRA of another model family, or a file none of whose keys name a module.
    """
    foreign = _foreign_family(tensors, metadata, config)
    if foreign is not None:
        raise ValueError(f"{where}: {foreign}; this model is SD1.x")
    names = _names(config)
    peft_config = _peft_alphas(metadata)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    skipped = []
    for key, tensor in tensors.items():
        split = _split(key)
        if split is None or split[0] not in names:
            skipped.append(key)
            continue
        grouped.setdefault(split[0], {})[split[1]] = tensor
    modules = []
    used = 0
    for name, parts in grouped.items():
        if kind_of(parts) is None:  # e.g. an alpha without its matrices, or an IA3 / GLoRA module
            skipped.extend(f"{name}.{role}" for role in parts)
            continue
        if "alpha" not in parts and "scale" not in parts and name.startswith(tuple(LORA_PEFT_PREFIXES)):
            alpha = _peft_alpha(peft_config, name)
            if alpha is not None:
                parts["alpha"] = torch.tensor(alpha)
        component, module = names[name]
        modules.append(ModuleNetwork(component, module, parts))
        used += len(parts)
    if not modules:
        lora_like = [k for k in tensors if _split(k) is not None]
        shown = ", ".join(sorted(tensors)[:2]) or "none"
        if not lora_like:
            raise ValueError(f"{where}: not a LoRA file: none of its {len(tensors)} keys is a LoRA tensor "
                             f"(keys: {shown}, ...)")  # fmt: skip
        prefixes = ", ".join([*LORA_KOHYA_PREFIXES, *LORA_PEFT_PREFIXES])
        raise ValueError(f"{where}: no key names a module of this SD1.x U-Net or text encoder "
                         f"({len(tensors)} keys, e.g. {shown}; expected {prefixes}...)")  # fmt: skip
    if len({(m.component, m.module) for m in modules}) != len(modules):
        # the same layer under two namings (diffusers and original block names): A1111 would apply both
        log.warning("%s: some layers appear under two names; both are applied", where)
    return modules, used, skipped


def load_lora(path: str | os.PathLike[str], config: ModelConfig) -> LoraFile:
    """Read a LoRA / LyCORIS file for a model of `config`; ValueError (one line) for one that cannot be
    used. A file that only partly matches says, as a warning, how many keys it used and skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    stat = path.stat()
    stamp = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    tensors, metadata = read_tensors(path)
    modules, used, skipped = map_tensors(tensors, metadata, config, str(path))
    if skipped:
        log.warning("%s: used %d of %d keys, skipped %d (e.g. %s)", path, used, len(tensors), len(skipped),
                    ", ".join(sorted(skipped)[:3]))  # fmt: skip
    return LoraFile(path, modules, metadata, stamp, used, skipped)
