"""Images in and out: reading any common file as RGB, tensors <-> PIL, PNG files with parameters."""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from .infotext import from_novelai

# Transparent pixels are flattened onto white, as A1111's img2img does by default; dropping the alpha
# channel instead would expose whatever colour the encoder left under it (often black).
BACKGROUND = (255, 255, 255)
PARAMETERS_KEY = "parameters"  # the PNG text chunk A1111-style tools read


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (RGBA, LA, P, L, 16-bit, 32-bit, float, CMYK) -> 8-bit RGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit grey: PIL's own convert clips at 255 and turns most images white.
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        if image.mode == "F" and values.max() <= 1.0:
            top = 1.0
        grey = np.clip(np.round(values / top * 255.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(grey, mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        image = Image.alpha_composite(flat, rgba)
    return image.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as upright 8-bit RGB; one-line ValueError when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image not found: {path}")
    return _open_rgb(path, f"image {path}")


def image_from_bytes(data: bytes, label: str = "image") -> Image.Image:
    """Encoded image bytes (PNG, JPEG, WebP, ...) as upright 8-bit RGB; one-line ValueError if not one."""
    return _open_rgb(io.BytesIO(data), label)


def _open_rgb(source: Path | BinaryIO, label: str) -> Image.Image:
    try:
        with Image.open(source) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except UnidentifiedImageError:
        raise ValueError(f"cannot read {label}: not an image format PIL knows") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read {label}: {error}") from None


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (1, 3, H, W) float32 in [-1, 1] (diffusers' preprocess: x / 255 * 2 - 1)."""
    array = np.asarray(to_rgb(image), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2.0 - 1.0


def tensor_to_uint8(images: torch.Tensor, truncate: bool = False) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, rounded like diffusers, or (`truncate`) A1111's
    way: clamp((x + 1) / 2, 0, 1), times 255, cast (floor)."""
    if truncate:
        images = ((images.float() + 1.0) / 2.0).clamp(0, 1)
        return (255.0 * images.permute(0, 2, 3, 1).cpu().numpy()).astype(np.uint8)
    images = (images.float() / 2 + 0.5).clamp(0, 1)
    return (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def save_png(image: Image.Image, path: str | Path | BinaryIO, parameters: str | None = None) -> None:
    """Write a PNG (to a path or a binary file), with the generation parameters in its `parameters` text
    chunk."""
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text(PARAMETERS_KEY, parameters)
    image.save(path, format="PNG", pnginfo=info)


def read_png_parameters(path: str | Path | BinaryIO) -> str:
    """The `parameters` text of a PNG written by us or A1111-style tools (a NovelAI PNG's settings as A1111
    converts them)."""
    try:
        with Image.open(path) as image:
            chunks = {
                **getattr(image, "text", {}),
                **{k: v for k, v in image.info.items() if isinstance(v, str)},
            }
            text = chunks.get(PARAMETERS_KEY) or from_novelai(chunks, image.width, image.height)
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot read PNG {path}: {error}") from None
    if not text:
        raise ValueError(f"{path} has no generation parameters ('{PARAMETERS_KEY}' text chunk)")
    return text
