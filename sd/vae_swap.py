"""The VAE swap: standalone VAE files (`vae-ft-mse-840000-ema-pruned.safetensors` and friends) read and
put in place of the checkpoint's own VAE weights, which come back bit for bit.

Two layouts are met: the original one (the checkpoint's `first_stage_model.*` keys without that prefix,
sometimes with it or with `vae.`; `.ckpt`/`.pt` files wrap it in `state_dict` and may carry `loss.*` and
EMA counters, which A1111 drops) and diffusers' `AutoencoderKL` (a `vae/` folder with config.json, or
its weights file alone). Both become the state dicts of our encoder and decoder modules; the names come
from sd.keymap, as for whole checkpoints. Files are read with safetensors or torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .checkpoints import file_sha256
from .config import ModelConfig
from .decoder import Decoder
from .encoder import Encoder
from .keymap import VAE_PREFIX, diffusers_key_map, normalize_vae_key, split_ldm_key, vae_reshape_keys
from .weights import read_tensor_file

VAE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")
# A1111's sd_vae option values that name no file.
VAE_AUTOMATIC, VAE_NONE = "Automatic", "None"
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_DROPPED_PREFIXES = ("loss.", "model_ema.")  # discriminator and EMA counters: not weights of the VAE
_OTHER_MODELS = {  # key prefix -> what a file holding it is
    "model.diffusion_model.": "a full checkpoint (it has a U-Net)",
    "cond_stage_model.": "a full checkpoint (it has a text encoder)",
    "lora_": "a LoRA",
    "unet.": "a LoRA or diffusers U-Net",
}


class VAEFileError(ValueError):
    """A file that is no usable SD1.x VAE (one line, naming the file)."""


def vae_files(folder: str | os.PathLike[str] | None) -> list[Path]:
    """VAE files in `folder` and below (A1111's models/VAE), sorted; diffusers VAE folders count as one."""
    if folder is None or not Path(folder).is_dir():
        return []
    found = []
    for path in sorted(Path(folder).rglob("*")):
        suffix = path.suffix.lower()
        is_file = path.is_file() and suffix in VAE_SUFFIXES and path.name not in _DIFFUSERS_WEIGHTS
        is_folder = path.is_dir() and (path / "config.json").is_file() and bool(_diffusers_weights(path))
        if is_file or is_folder:
            found.append(path)
    return found


def find_vae(folder: str | os.PathLike[str] | None, name: str) -> Path | None:
    """The VAE A1111's `sd_vae` value (or a PNG's `VAE`) names: a path, or a file in `folder` by file name,
    relative path or stem."""
    direct = Path(name).expanduser()
    if direct.exists():
        return direct
    for path in vae_files(folder):
        relative = path.relative_to(folder).as_posix() if folder is not None else path.name
        if name in (path.name, relative, path.stem, relative.rsplit(".", 1)[0]):
            return path
    return None


def vae_name(path: str | os.PathLike[str]) -> str:
    """A1111's `VAE` infotext value: the file's name (os.path.basename of the loaded file)."""
    return Path(path).name


def vae_hash(path: str | os.PathLike[str]) -> str | None:
    """A1111's `VAE hash`: the first 10 hex digits of the file's sha256 (of the weights file for a folder)."""
    path = Path(path)
    if path.is_dir():
        weights = _diffusers_weights(path)
        path = weights[0] if weights else path
    digest = file_sha256(path) if path.is_file() else None
    return digest[:10] if digest else None


def _diffusers_weights(folder: Path) -> list[Path]:
    return [folder / n for n in _DIFFUSERS_WEIGHTS if (folder / n).is_file()]


def _read(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a VAE file (safetensors, or a weights-only torch pickle)."""
    if path.is_dir():
        if (path / "vae" / "config.json").is_file():  # a whole diffusers pipeline folder: its VAE
            path = path / "vae"
        weights = _diffusers_weights(path)
        if not weights:
            raise VAEFileError(f"{path}: a folder without a diffusers VAE (config.json and "
                               f"{_DIFFUSERS_WEIGHTS[0]})")  # fmt: skip
        _check_diffusers_config(path / "config.json")
        path = weights[0]
    try:
        return read_tensor_file(path, "VAE")[0]
    except ValueError as error:  # CheckpointError: unreadable, or a pickle that needs code
        raise VAEFileError(str(error)) from None


def _check_diffusers_config(path: Path) -> None:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise VAEFileError(f"{path}: unreadable config ({error})") from None
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL" or config.get("latent_channels", 4) != 4:
        raise VAEFileError(f"{path}: a {config.get('_class_name')} with {config.get('latent_channels')} "
                           "latent channels, not an SD1.x AutoencoderKL")  # fmt: skip
    if abs(float(config.get("scaling_factor", 0.18215)) - 0.18215) > 1e-6:
        raise VAEFileError(f"{path}: scaling_factor {config['scaling_factor']} is not SD1.x's 0.18215 "
                           "(an SDXL VAE?)")  # fmt: skip


def _ldm_keys(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The file's tensors under full original checkpoint keys (first_stage_model.*)."""
    diffusers = any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in tensors)
    keymap = diffusers_key_map(config)["vae"] if diffusers else {}
    reshape = vae_reshape_keys(config)
    out = {}
    for key, tensor in tensors.items():
        key = key.removeprefix(VAE_PREFIX).removeprefix("vae.")
        if key.startswith(_DROPPED_PREFIXES):
            continue
        if diffusers:
            norm = normalize_vae_key(key)
            mapped = keymap.get(norm)
            if mapped is None:
                raise VAEFileError(f"unexpected key {key!r} for a diffusers AutoencoderKL")
            if norm in reshape and tensor.dim() == 2:  # diffusers' linear attention -> our 1x1 conv
                tensor = tensor[:, :, None, None]
            out[mapped] = tensor
        else:
            out[VAE_PREFIX + key] = tensor
    return out


def _expected(config: ModelConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    """Per VAE component: module key -> shape, from modules built on the meta device."""
    with torch.device("meta"):
        modules = {"encoder": Encoder(config.vae), "decoder": Decoder(config.vae)}
    return {c: {k: tuple(v.shape) for k, v in m.state_dict().items()} for c, m in modules.items()}


def read_vae(path: str | os.PathLike[str], config: ModelConfig) -> dict[str, dict[str, torch.Tensor]]:
    """{"encoder": state dict, "decoder": state dict} of a VAE file for a model of `config`;
    VAEFileError (one line) for anything else."""
    path = Path(path).expanduser()
    expected = _expected(config)
    if not path.exists():
        raise VAEFileError(f"{path}: no such VAE file")
    tensors = _read(path)
    for prefix, what in _OTHER_MODELS.items():
        if any(k.startswith(prefix) for k in tensors):
            raise VAEFileError(f"{path}: this is {what}, not a VAE file")
    try:
        ldm = _ldm_keys(tensors, config)
    except VAEFileError as error:
        raise VAEFileError(f"{path}: {error}") from None
    states: dict[str, dict[str, torch.Tensor]] = {"encoder": {}, "decoder": {}}
    unexpected = []
    for key, tensor in ldm.items():
        split = split_ldm_key(key)
        if split is None or split[0] not in states or split[1] not in expected[split[0]]:
            unexpected.append(key.removeprefix(VAE_PREFIX))
            continue
        component, module_key = split
        want = tuple(expected[component][module_key])
        if tuple(tensor.shape) != want:
            if ".mid.attn_1." in module_key and want == (*tensor.shape, 1, 1):
                tensor = tensor.reshape(want)  # converted from diffusers: linear attention weights
            else:
                raise VAEFileError(f"{path}: {key.removeprefix(VAE_PREFIX)} has shape {list(tensor.shape)}, "
                                   f"expected {list(want)} (a VAE for another model?)")  # fmt: skip
        states[component][module_key] = tensor
    missing = [k for c in states for k in expected[c] if k not in states[c]]
    if not states["encoder"] and not states["decoder"]:
        shown = ", ".join(sorted(tensors)[:3])
        raise VAEFileError(f"{path}: no VAE weights recognised (keys {shown}, ...)")
    if missing or unexpected:
        parts = [f"missing {len(missing)} keys ({', '.join(missing[:2])})"] if missing else []
        parts += [f"unexpected {len(unexpected)} keys ({', '.join(unexpected[:2])})"] if unexpected else []
        raise VAEFileError(f"{path}: does not match the SD1.x VAE layout: {'; '.join(parts)}")
    return states


class VAESwap:
    """Puts a VAE file's weights into a pipeline's encoder and decoder, keeping the checkpoint's own.

    Torch modules get the weights copied in (their dtype and layout kept); backend modules that convert
    their weights (OpenVINO) are given them through `rebind(weights_id, prepare)`, which re-converts once
    per VAE (cached on disk under that id)."""

    def __init__(self, models: Mapping[str, nn.Module]):
        self.models = models
        self._originals: dict[str, dict[str, torch.Tensor]] = {}

    def apply(self, states: dict[str, dict[str, torch.Tensor]] | None, weights_id: str | None) -> None:
        """Use `states` (read_vae's), or the checkpoint's own VAE for None."""
        for name in ("encoder", "decoder"):
            module = self.models[name]
            state = states[name] if states is not None else None
            if hasattr(module, "rebind"):  # a converted backend module: it reloads and converts
                if state is None:
                    module.rebind(None, None)
                else:
                    module.rebind(f"vae {weights_id}", lambda m, s=state: m.load_state_dict(s, strict=True))
                continue
            if state is None:
                if name in self._originals:
                    module.load_state_dict(self._originals.pop(name), strict=True)
                continue
            if name not in self._originals:
                own = module.state_dict()
                self._originals[name] = {k: v.detach().to("cpu", copy=True) for k, v in own.items()}
            module.load_state_dict(state, strict=True)


__all__ = [
    "VAE_AUTOMATIC",
    "VAE_NONE",
    "VAE_SUFFIXES",
    "VAEFileError",
    "VAESwap",
    "find_vae",
    "read_vae",
    "vae_files",
    "vae_hash",
    "vae_name",
]
