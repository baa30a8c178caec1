"""sd: Stable Diffusion v1.5 from scratch in PyTorch.

import sd
models = sd.load_models("v1-5-pruned-emaonly.safetensors")    # clip, encoder, decoder, diffusion
pipe = sd.Pipeline(models)
image = pipe.txt2img("a lighthouse at dusk", seed=42)[0]
"""

from .config import SD15, TINY, CLIPConfig, ModelConfig, ScheduleConfig, UNetConfig, VAEConfig
from .models import build_models
from .pipeline import Pipeline, generate
from .samplers import SAMPLERS, get_sampler
from .tokenizer import CLIPTokenizer
from .weights import CheckpointError, describe, load_models, save_checkpoint

__all__ = [
    "SAMPLERS",
    "SD15",
    "TINY",
    "CLIPConfig",
    "CLIPTokenizer",
    "CheckpointError",
    "ModelConfig",
    "Pipeline",
    "ScheduleConfig",
    "UNetConfig",
    "VAEConfig",
    "build_models",
    "describe",
    "generate",
    "get_sampler",
    "load_models",
    "save_checkpoint",
]
