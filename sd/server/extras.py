"""A1111's Extras API (/sdapi/v1/extra-single-image, /extra-batch-images): the upscale of sd.upscalers
with its built-in upscalers. Face restoration (GFPGAN, CodeFormer) needs models sd does not have: asking
for it is a 400, not an unrestored image. The answer's PNGs keep the input's text chunks (its generation
`parameters`) and add A1111's `postprocessing` one."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from PIL import Image, PngImagePlugin

from ..upscalers import ExtrasUpscale, postprocessing_text
from .parse import BadRequestError, decode_image

UPSCALE_FIELDS = ("resize_mode", "upscaling_resize", "upscaling_resize_w", "upscaling_resize_h",
                  "upscaling_crop", "upscaler_1", "upscaler_2", "extras_upscaler_2_visibility")  # fmt: skip
FACE_RESTORERS = {"gfpgan_visibility": "GFPGAN", "codeformer_visibility": "CodeFormer"}


def _settings(body: dict[str, Any]) -> ExtrasUpscale:
    for field, name in FACE_RESTORERS.items():
        if (body.get(field) or 0) > 0:
            raise BadRequestError(f"{field}: face restoration with {name} needs its model, which sd does "
                                  "not have; send 0")  # fmt: skip
    given = {field: body[field] for field in UPSCALE_FIELDS if body.get(field) is not None}
    settings = ExtrasUpscale(**given)
    try:
        settings.check()
    except ValueError as error:
        raise BadRequestError(str(error)) from None
    return settings


def _upscaled(settings: ExtrasUpscale, image: Image.Image) -> tuple[Image.Image, str]:
    chunks = {key: value for key, value in image.info.items() if isinstance(value, str)}
    out, info = settings.apply(image.convert("RGB") if image.mode not in ("RGB", "RGBA") else image)
    text = postprocessing_text(info)
    out.info = {**chunks, **({"postprocessing": text} if text else {})}
    return out, text


def _png_base64(image: Image.Image) -> str:
    """A1111's encode_pil_to_base64: a PNG with every text item of image.info as a chunk."""
    info = PngImagePlugin.PngInfo()
    for key, value in image.info.items():
        if isinstance(key, str) and isinstance(value, str):
            info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _html(text: str) -> str:
    """A1111's plaintext_to_html."""
    return "<p>" + "<br>\n".join(html.escape(line) for line in text.split("\n")) + "</p>"


def extra_single_image(body: dict[str, Any]) -> dict[str, Any]:
    settings = _settings(body)
    out, text = _upscaled(settings, decode_image(body.get("image"), "image"))
    return {"html_info": _html(text), "image": _png_base64(out)}


def extra_batch_images(body: dict[str, Any]) -> dict[str, Any]:
    settings = _settings(body)
    files = body.get("imageList") or []
    if not files:
        raise BadRequestError("imageList must hold at least one {data, name} image")
    outputs, text = [], ""
    for index, item in enumerate(files):
        data = item.get("data") if isinstance(item, dict) else None
        out, text = _upscaled(settings, decode_image(data, f"imageList[{index}].data"))
        outputs.append(_png_base64(out))
    return {"html_info": _html(text), "images": outputs}


__all__ = ["extra_batch_images", "extra_single_image"]
