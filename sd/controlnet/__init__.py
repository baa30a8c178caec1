"""ControlNet: a copy of the U-Net's encoder steered by a hint image (sd.controlnet.model), read from the
files people download (sd.controlnet.files), applied during sampling (sd.controlnet.apply)."""

from .apply import ControlRun, ControlUnit, hint_tensor
from .files import ControlNetFileError, load_controlnet
from .model import ControlNet, ControlNetConfig

__all__ = [
    "ControlNet",
    "ControlNetConfig",
    "ControlNetFileError",
    "ControlRun",
    "ControlUnit",
    "hint_tensor",
    "load_controlnet",
]
