"""The peers the benchmark races: diffusers/transformers (eager PyTorch) and OpenVINO.

Everything is built offline from the same original-layout (LDM) `.safetensors` file our loader reads:
diffusers' modules are created on the meta device and receive the file's tensors through diffusers' own
single-file converters (no random init of a billion parameters, no second copy), and OpenVINO converts
those diffusers modules. Nothing here touches a hub.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from sd.config import SD15, ModelConfig
from sd.keymap import TEXT_ENCODER_PREFIX, UNET_PREFIX, VAE_PREFIX, diffusers_configs

REFERENCE_DIR = Path(
    os.environ.get("SD_REFERENCE_DIR", Path(__file__).resolve().parents[2] / "shared" / "reference")
)


def reference_file(name: str) -> Path:
    path = REFERENCE_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: set SD_REFERENCE_DIR to the shared reference folder")
    return path


def peer_configs(config: ModelConfig) -> dict[str, dict[str, Any]]:
    """diffusers/transformers config dicts ("unet", "vae", "text_encoder", "scheduler", tokenizer files).

    SD1.5 uses the reference folder's hand-checked dicts; other sizes (TINY) are derived from `config`.
    """
    if config == SD15:
        return json.loads(reference_file("sd15-diffusers-configs.json").read_text())
    derived = diffusers_configs(config)
    reference = json.loads(reference_file("sd15-diffusers-configs.json").read_text())
    keep = ("scheduler", "tokenizer_config", "special_tokens_map", "model_index")
    return {**derived, **{k: reference[k] for k in keep}}


def _public(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def read_state(source: Path | dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors whose key starts with one of `prefixes`, from an LDM-layout file (only those are read)
    or from an LDM state dict already in memory."""
    if isinstance(source, dict):
        return {k: v for k, v in source.items() if k.startswith(prefixes)}
    with safe_open(str(source), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefixes)}  # noqa: SIM118


def _assign(module: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    # Cast while assigning, one tensor at a time, so a bf16 copy never needs a whole fp32 copy beside it.
    for key in list(state):
        state[key] = state[key].to(dtype)
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def _diffusers_model(kind: str, path: Path | dict, dconf: dict, dtype: torch.dtype) -> nn.Module:
    """diffusers' U-Net ("unet") or AutoencoderKL ("vae") built on meta, holding the file's weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    model_class, convert, prefix = {
        "unet": (UNet2DConditionModel, convert_ldm_unet_checkpoint, UNET_PREFIX),
        "vae": (AutoencoderKL, convert_ldm_vae_checkpoint, VAE_PREFIX),
    }[kind]
    cfg = _public(dconf[kind])
    with torch.device("meta"):
        model = model_class(**cfg)
    return _assign(model, convert(read_state(path, (prefix,)), cfg), dtype)


def diffusers_unet(path: Path | dict, dconf: dict, dtype: torch.dtype = torch.float32) -> nn.Module:
    """diffusers' UNet2DConditionModel holding the file's (or LDM state dict's) U-Net."""
    return _diffusers_model("unet", path, dconf, dtype)


def diffusers_vae(path: Path, dconf: dict, dtype: torch.dtype = torch.float32) -> nn.Module:
    """diffusers' AutoencoderKL holding the file's VAE."""
    return _diffusers_model("vae", path, dconf, dtype)


def transformers_text_encoder(path: Path, dconf: dict, dtype: torch.dtype = torch.float32) -> nn.Module:
    """transformers' CLIPTextModel holding the file's text encoder."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = {k: v for k, v in dconf["text_encoder"].items() if k not in ("architectures", "torch_dtype")}
    # Built for real (not on meta): it is small, and its non-persistent buffers then exist.
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfg))
    # transformers 5 dropped the `text_model.` level that the converter (and real SD1.5 files) keep.
    state = {
        k.removeprefix("text_model."): v
        for k, v in convert_ldm_clip_checkpoint(read_state(path, (TEXT_ENCODER_PREFIX,))).items()
        if not k.endswith("position_ids")
    }
    text_encoder.load_state_dict(state, strict=True)
    return text_encoder.to(dtype).eval().requires_grad_(False)


def hf_tokenizer() -> Any:
    """transformers' CLIPTokenizer from the reference vocab/merges files."""
    from transformers import CLIPTokenizer

    vocab = json.loads(reference_file("clip-vocab.json").read_text(encoding="utf-8"))
    lines = reference_file("clip-merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    merges = [tuple(line.split(" ")) for line in lines if line]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def dpmpp_2m_scheduler() -> Any:
    from diffusers import DPMSolverMultistepScheduler

    # SD1.5's scheduler_config.json; "dpmpp_2m" is DPMSolverMultistepScheduler.from_config of it.
    return DPMSolverMultistepScheduler.from_config(peer_configs(SD15)["scheduler"])


def diffusers_pipeline(path: Path, dconf: dict, dtype: torch.dtype = torch.float32) -> Any:
    """StableDiffusionPipeline on the file's weights with DPM++ 2M, progress bar off, no safety checker."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=diffusers_vae(path, dconf, dtype),
        text_encoder=transformers_text_encoder(path, dconf, dtype),
        tokenizer=hf_tokenizer(),
        unet=diffusers_unet(path, dconf, dtype),
        scheduler=dpmpp_2m_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_config_folder(folder: Path, dconf: dict) -> Path:
    """A diffusers folder holding only configs and tokenizer files, for
    `StableDiffusionPipeline.from_single_file(file, config=folder, local_files_only=True)`."""
    files = {
        "model_index.json": dconf["model_index"],
        "unet/config.json": dconf["unet"],
        "vae/config.json": dconf["vae"],
        "text_encoder/config.json": dconf["text_encoder"],
        "scheduler/scheduler_config.json": dconf["scheduler"],
        "tokenizer/tokenizer_config.json": dconf["tokenizer_config"],
        "tokenizer/special_tokens_map.json": dconf["special_tokens_map"],
    }
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(content, indent=1))
    shutil.copyfile(reference_file("clip-vocab.json"), folder / "tokenizer" / "vocab.json")
    shutil.copyfile(reference_file("clip-merges.txt"), folder / "tokenizer" / "merges.txt")
    return folder


# ---------------------------------------------------------------------------------------------------------
# OpenVINO: diffusers' modules converted once to IR on disk, compiled per input shape and precision
# ---------------------------------------------------------------------------------------------------------


def openvino_version() -> str | None:
    """OpenVINO's version, or None when it is not importable (its columns are then skipped)."""
    try:
        import openvino
    except ImportError:
        return None
    return openvino.get_version()


class UNetForExport(nn.Module):
    """diffusers' U-Net with plain tensor inputs and output (what a converter can trace)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, latents: torch.Tensor, context: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.unet(latents, timestep, encoder_hidden_states=context, return_dict=False)[0]


class VAEDecodeForExport(nn.Module):
    """Scaled latents -> image, as our Decoder (diffusers' pipeline divides by the scaling factor first)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]


class VAEEncodeForExport(nn.Module):
    """Image -> the latent distribution's mean."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(image, return_dict=False)[0].mean


class TextEncoderForExport(nn.Module):
    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(ids, return_dict=False)[0]


def export_openvino(module: nn.Module, example: tuple[torch.Tensor, ...], xml: Path) -> Path:
    """Convert an fp32 torch module to OpenVINO IR at `xml` (weights kept fp32: the precision is chosen
    when compiling). Written to disk so the torch module can be freed and each compile reads the file."""
    import openvino as ov

    with torch.no_grad():
        model = ov.convert_model(module, example_input=example)
    ov.save_model(model, str(xml), compress_to_fp16=False)
    return xml


class OpenVINORunner:
    """One compiled model for fixed input shapes: `runner(*arrays)` -> first output (numpy)."""

    def __init__(self, xml: Path, shapes: list[tuple[int, ...]], precision: str, threads: int):
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(xml))
        # Static shapes: what OpenVINO's own Stable Diffusion recipes do for the best CPU kernels.
        model.reshape(
            {port.any_name: ov.PartialShape(list(s)) for port, s in zip(model.inputs, shapes, strict=True)}
        )
        config = {
            "INFERENCE_PRECISION_HINT": precision,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": threads,
        }
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        self.request.infer(list(arrays), share_inputs=True)
        return self.request.get_output_tensor(0).data
