"""ControlNet files as people download them, read into `ControlNet` modules.

* the original layout (`control_v11p_sd15_canny.pth`, `.safetensors`, ComfyUI's fp16 copies): keys under
  `control_model.`; v1.0 files (`control_sd15_*.pth`) also carry a whole SD model, which is not used (as in
  A1111's extension and ComfyUI, the base model is the pipeline's own);
* the same keys without the prefix (`zero_convs.0.0.weight`, ...);
* diffusers' `ControlNetModel`: a folder (config.json + weights) or its weights file
  (`controlnet_cond_embedding.*`, `controlnet_down_blocks.*`, `down_blocks.*`), renamed by sd.keymap.

The architecture follows the file: the U-Net is the base model's (its width, heads and context size),
checked against the file's shapes; the hint encoder's widths and the input channels come from the file.
`.pth`/`.ckpt` files are read with torch.load(weights_only=True) only (sd.weights).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace
from pathlib import Path

import torch

from ..config import UNetConfig
from ..keymap import CONTROLNET_PREFIX, controlnet_key_map
from ..weights import CheckpointError, read_tensor_file
from .model import ControlNet, ControlNetConfig

HINT = "input_hint_block."
DIFFUSERS_HINT = "controlnet_cond_embedding."
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class ControlNetFileError(CheckpointError):
    """A file that is not a ControlNet we can use, with the one line that says why."""


def load_controlnet(path: str | Path, unet: UNetConfig, dtype: torch.dtype | None = None) -> ControlNet:
    """The ControlNet in `path` (a file or a diffusers folder) for a base model whose U-Net is `unet`, in
    `dtype` (None: float32). ControlNetFileError (one line) for anything else."""
    path = Path(path)
    if not path.exists():
        raise ControlNetFileError(f"ControlNet not found: {path}")
    options: dict = {}
    if path.is_dir():
        weights = next((path / name for name in DIFFUSERS_WEIGHTS if (path / name).is_file()), None)
        if weights is None:
            raise ControlNetFileError(f"{path}: no {' or '.join(DIFFUSERS_WEIGHTS)} in this folder")
        options = _diffusers_options(path / "config.json")
        tensors, _ = read_tensor_file(weights, "ControlNet")
    else:
        tensors, _ = read_tensor_file(path, "ControlNet")
        # the YAML beside it, else the name: A1111's extension pools for shuffle models
        options = _yaml_options(path.with_suffix(".yaml")) or {
            "global_average_pooling": "shuffle" in path.stem.lower()
        }
    state = original_state(tensors, unet, str(path))
    hint_outs = [state[f"{HINT}{i}.weight"].shape[0] for i in range(0, 2 * _hint_convs(state), 2)]
    config = ControlNetConfig(
        unet=replace(unet, in_channels=state["input_blocks.0.0.weight"].shape[1]),
        hint_channels=state[f"{HINT}0.weight"].shape[1],
        hint_widths=tuple(hint_outs[0:-1:2]),
        **options,
    )
    with torch.device("meta"):
        model = ControlNet(config)
    expected = model.state_dict()
    wrong = [k for k, v in expected.items() if k not in state or tuple(state[k].shape) != tuple(v.shape)]
    if wrong or len(state) != len(expected):
        extra = sorted(set(state) - set(expected))
        detail = f"{wrong[0]}" if wrong else f"unexpected {extra[0]}"
        raise ControlNetFileError(
            f"{path}: a ControlNet for another base model (first difference: {detail}); SD1.x ones only"
        )
    dtype = dtype or torch.float32
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    model.name = path.name if path.is_dir() else f"{path.stem} [{legacy_hash(path)}]"  # as A1111 lists it
    return model.eval().requires_grad_(False)


def legacy_hash(path: str | Path) -> str:
    """A1111's old short hash, which its ControlNet extension shows in brackets ("control_v11p_sd15_canny
    [d14c016b]"): the sha256 of the 64 KiB at 1 MiB, 8 hex digits."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def original_state(tensors: dict[str, torch.Tensor], unet: UNetConfig, name: str) -> dict[str, torch.Tensor]:
    """The ControlNet's tensors under our (the original's, unprefixed) names, whatever the file's layout."""
    keys = list(tensors)
    if any(k.startswith(CONTROLNET_PREFIX) for k in keys):
        return {k[len(CONTROLNET_PREFIX) :]: v for k, v in tensors.items() if k.startswith(CONTROLNET_PREFIX)}
    if any(k.startswith(HINT) for k in keys):
        return dict(tensors)
    if any(k.startswith(DIFFUSERS_HINT) for k in keys):
        convs = 2 + sum(1 for k in keys if re.fullmatch(rf"{DIFFUSERS_HINT}blocks\.\d+\.weight", k))
        renames = controlnet_key_map(unet, convs)
        missing = next((k for k in keys if k not in renames), None)
        if missing is not None:
            raise ControlNetFileError(
                f"{name}: a diffusers ControlNet for another base model (key {missing})"
            )
        return {renames[k][len(CONTROLNET_PREFIX) :]: v for k, v in tensors.items()}
    raise ControlNetFileError(f"{name}: not a ControlNet file ({_what(keys)})")


def _what(keys: list[str]) -> str:
    """What a file that is not a ControlNet seems to be, for the error line."""
    if any("lora_controlnet" in k or k.startswith("lora_") for k in keys):
        return "a LoRA-style file (Control-LoRA or a LoRA), not a full ControlNet"
    if any(k.startswith(("body.", "adapter.")) for k in keys):
        return "a T2I-Adapter, which is not a ControlNet"
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "a Stable Diffusion checkpoint"
    shown = ", ".join(sorted(keys)[:3]) or "no tensors"
    return f"no control_model.*, input_hint_block.* or controlnet_cond_embedding.* keys; keys {shown}"


def _hint_convs(state: dict[str, torch.Tensor]) -> int:
    return sum(1 for k in state if re.fullmatch(rf"{re.escape(HINT)}\d+\.weight", k))


def _diffusers_options(config_path: Path) -> dict:
    """ControlNetConfig fields from a diffusers config.json (global_pool_conditions)."""
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise ControlNetFileError(f"{config_path}: unreadable config ({error})") from None
    if config.get("controlnet_conditioning_channel_order", "rgb") != "rgb":
        raise ControlNetFileError(f"{config_path}: a BGR-input ControlNet is not supported yet")
    return {"global_average_pooling": bool(config.get("global_pool_conditions", False))}


def _yaml_options(yaml_path: Path) -> dict:
    """From the model's YAML beside it (A1111's extension reads the same file): v1.1 shuffle's
    `global_average_pooling: True`."""
    if not yaml_path.is_file():
        return {}
    match = re.search(r"^\s*global_average_pooling:\s*(\w+)", yaml_path.read_text(errors="replace"), re.M)
    return {"global_average_pooling": bool(match and match.group(1).lower() == "true")}
