"""ControlNet: a copy of the U-Net's encoder steered by a hint image (sd.controlnet.model), read from the
files people download (sd.controlnet.files), applied during sampling (sd.controlnet.apply)."""

from .a1111 import A1111ControlRun
from .apply import CONTROL_MODES, RESIZE_MODES, ControlRun, ControlUnit, hint_tensor, unit_infotext
from .files import ControlNetFileError, legacy_hash, load_controlnet
from .model import ControlNet, ControlNetConfig

__all__ = [
    "CONTROL_MODES",
    "RESIZE_MODES",
    "A1111ControlRun",
    "ControlNet",
    "ControlNetConfig",
    "ControlNetFileError",
    "ControlRun",
    "ControlUnit",
    "hint_tensor",
    "legacy_hash",
    "load_controlnet",
    "unit_infotext",
]
