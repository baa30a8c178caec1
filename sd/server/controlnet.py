"""A1111's ControlNet extension as its API clients use it (sd-webui-controlnet v1.1.455): units in
`alwayson_scripts: {"controlnet": {"args": [...]}}`, its models folder (A1111's models/ControlNet), its
/controlnet/* listings, and the infotext it writes. The units run A1111's way (sd.controlnet.a1111).

A unit's image is the hint itself: only the "none" preprocessor is here (a unit asking for another gets
a 400 that says to send the preprocessed map). Fields that cannot change the image (pixel_perfect,
processor_res and the thresholds of "none", low_vram, ...) are read and listed as ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..controlnet import CONTROL_MODES, RESIZE_MODES, legacy_hash

SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
RESIZE_ALIASES = {
    "inner fit (scale to fit)": "Crop and Resize", "scale to fit (inner fit)": "Crop and Resize",
    "outer fit (shrink to fit)": "Resize and Fill", "envelope (outer fit)": "Resize and Fill",
}  # fmt: skip
NO_PREPROCESSOR = ("none", "None")
# unit fields that cannot change the image with the "none" preprocessor
HARMLESS = (
    "pixel_perfect", "processor_res", "threshold_a", "threshold_b", "low_vram", "guess_mode",
    "save_detected_map", "inpaint_crop_input_image", "union_control_type", "is_ui", "input_mode",
    "batch_images", "output_dir", "loopback",
)  # fmt: skip
# unit fields that would change the image in ways not made here: refused when set
UNSUPPORTED = ("advanced_weighting", "effective_region_mask", "ipadapter_input")


class UnitError(ValueError):
    """A unit the server cannot run, with its one line."""


@dataclass(frozen=True)
class ControlSpec:
    """A checked unit: its model file and the ControlUnit fields; `infotext` is the extension's value."""

    path: Path
    image: Image.Image
    weight: float
    mode: str
    resize_mode: str
    start: float
    end: float
    save_map: bool
    infotext: str


def model_files(folder: Path | None) -> list[Path]:
    if folder is None or not folder.is_dir():
        return []
    return [p for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix.lower() in SUFFIXES]


def model_list(folder: Path | None) -> list[str]:
    """/controlnet/model_list: "stem [hash]" per file."""
    return [f"{p.stem} [{legacy_hash(p)}]" for p in model_files(folder)]


def find_model(name: str, folder: Path | None) -> Path:
    """A unit's model, as the extension finds it: "stem [hash]" exactly, else the stem (any case), else
    the shortest stem containing the name (a wrong hash in brackets finds nothing)."""
    files = model_files(folder)
    exact = next((p for p in files if f"{p.stem} [{legacy_hash(p)}]" == name), None)
    stem = name.lower()
    found = exact or next((p for p in files if p.stem.lower() == stem), None)
    containing = sorted((p for p in files if stem in p.stem.lower()), key=lambda p: len(p.stem))
    if found or containing:
        return found or containing[0]
    where = folder if folder is not None else "no ControlNet folder"
    raise UnitError(f"ControlNet model {name!r} not found in {where} (GET /controlnet/model_list lists them)")


def _enum(value: Any, names: tuple[str, ...], field: str, aliases: dict[str, str] | None = None) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return names[value]  # older clients send the index
    if isinstance(value, str):
        for name in names:
            if value.lower() == name.lower():
                return name
        if aliases and value.lower() in aliases:
            return aliases[value.lower()]
    raise UnitError(f"ControlNet {field} {value!r}: one of {', '.join(names)}")


def _number(unit: dict, field: str, default: float, low: float, high: float) -> float:
    value = unit.get(field, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise UnitError(f"ControlNet {field} must be a number in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def parse_units(
    scripts: Any, decode_image, init_image: Image.Image | None, folder: Path | None
) -> tuple[list[ControlSpec], list[str]]:
    """(the enabled units, the fields read that cannot change the image) of `alwayson_scripts`.
    `decode_image(text, field)` turns a base64 image into a PIL image (a 400 when it cannot)."""
    if not scripts:
        return [], []
    if not isinstance(scripts, dict):
        raise UnitError('alwayson_scripts must be an object of script name -> {"args": [...]}')
    specs: list[ControlSpec] = []
    ignored: list[str] = []
    for name, script in scripts.items():
        args = script.get("args", []) if isinstance(script, dict) else script
        if name.lower() != "controlnet":
            if args:
                raise UnitError(
                    f"alwayson_scripts: the script {name!r} is not available here (only ControlNet)"
                )
            continue
        if not isinstance(args, list):
            raise UnitError("alwayson_scripts.controlnet.args must be a list of units")
        for index, unit in enumerate(args[:3]):  # the extension's control_net_unit_count, 3
            if not isinstance(unit, dict):
                raise UnitError(f"ControlNet unit {index} must be an object")
            if not unit.get("enabled", False):
                continue
            specs.append(_unit(unit, len(specs), decode_image, init_image, folder))
            ignored += [f"controlnet.{index}.{k}" for k in HARMLESS if k in unit]
    return specs, ignored


def _unit(
    unit: dict, index: int, decode_image, init_image: Image.Image | None, folder: Path | None
) -> ControlSpec:
    module = unit.get("module", "none")
    if module not in NO_PREPROCESSOR:
        raise UnitError(f"ControlNet preprocessor {module!r} is not available here: send the preprocessed "
                        "map as the unit's image with module \"none\"")  # fmt: skip
    for field in UNSUPPORTED:
        if unit.get(field) is not None:
            raise UnitError(f"ControlNet {field} is not supported yet; leave it out")
    if unit.get("mask") is not None or unit.get("mask_image") is not None:
        raise UnitError("a ControlNet unit's mask is not supported yet; leave it out")
    if unit.get("hr_option", "Both") not in ("Both", 0):
        raise UnitError(f'ControlNet hr_option {unit["hr_option"]!r} is not supported yet; use "Both"')
    image = unit.get("image", unit.get("input_image"))
    if isinstance(image, dict):
        image = image.get("image")
    if image is None:
        if init_image is None:
            raise UnitError(f"ControlNet unit {index} has no image (and this is txt2img)")
        hint = init_image  # img2img: the extension falls back on the init image
    elif isinstance(image, str):
        hint = decode_image(image, f"controlnet unit {index} image")
    else:
        raise UnitError(f"ControlNet unit {index} image must be a base64 image")
    model_name = unit.get("model", "None")
    if not isinstance(model_name, str) or model_name in ("", "None"):
        raise UnitError(f"ControlNet unit {index} names no model")
    path = find_model(model_name, folder)
    weight = _number(unit, "weight", 1.0, 0.0, 2.0)
    start = _number(unit, "guidance_start", 0.0, 0.0, 1.0)
    end = _number(unit, "guidance_end", unit.get("guidance", 1.0) or 1.0, 0.0, 1.0)
    if start > end:
        raise UnitError(f"ControlNet guidance_start {start} is after guidance_end {end}")
    if start == end:
        raise UnitError("ControlNet guidance_start and guidance_end are equal: the unit would never act")
    mode = _enum(unit.get("control_mode", "Balanced"), CONTROL_MODES, "control_mode")
    resize = _enum(unit.get("resize_mode", "Crop and Resize"), RESIZE_MODES, "resize_mode", RESIZE_ALIASES)
    fields = [
        ("Module", module), ("Model", model_name), ("Weight", weight), ("Resize Mode", resize),
        ("Processor Res", _res(unit.get("processor_res"))), ("Threshold A", _thresh(unit.get("threshold_a"))),
        ("Threshold B", _thresh(unit.get("threshold_b"))), ("Guidance Start", start), ("Guidance End", end),
        ("Pixel Perfect", bool(unit.get("pixel_perfect", False))), ("Control Mode", mode),
    ]  # fmt: skip
    infotext = ", ".join(f"{k}: {v}" for k, v in fields)
    save = bool(unit.get("save_detected_map", True))
    return ControlSpec(path, hint, weight, mode, resize, start, end, save, infotext)


def _res(value: Any) -> int:
    """processor_res as the extension records it for "none": its slider's default 512 when out of range."""
    return int(value) if isinstance(value, (int, float)) and 64 <= value <= 2048 else 512


def _thresh(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and 0 <= value <= 1 else 0.5


__all__ = ["ControlSpec", "UnitError", "find_model", "model_list", "parse_units"]
