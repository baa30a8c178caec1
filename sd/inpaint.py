"""Inpainting and outpainting on the image side: masks, A1111's mask blur, "masked content" fill, the
"only masked" crop and paste-back, the final composite, and outpainting's canvas.

Everything here works on PIL images and small arrays; the latent side (blending, the 9-channel U-Net's
extra input) is `sd.inpaint_sampling`. The steps follow A1111 v1.10.1's
`StableDiffusionProcessingImg2Img.init` (modules/processing.py) and modules/masking.py:

    mask -> L (an RGBA mask: its alpha, thresholded) -> invert? -> Gaussian blur (x, then y)
         -> "only masked": bounding box + padding, grown to the output's aspect, cropped and resized
            "whole picture": resized to the output size
    image -> resized / cropped the same way -> "fill": masked area painted from blurred surroundings
    result -> pasted back where the crop came from -> composited under the original (outside the mask
              the input's own pixels, exactly)

White (255) means repaint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

log = logging.getLogger("sd")

# A1111's "Masked content" names, by their inpainting_fill number.
FILL_MODES = ("fill", "original", "latent noise", "latent nothing")
FILL, ORIGINAL, LATENT_NOISE, LATENT_NOTHING = range(4)
# A1111's UI defaults (its API dataclass differs: fill 0, only masked, padding 0).
DEFAULT_MASK_BLUR = 4
DEFAULT_FILL = ORIGINAL
DEFAULT_PADDING = 32

MaskInput = "Image.Image | np.ndarray | torch.Tensor | str | Path"


def fill_mode(value: int | str) -> int:
    """A1111's inpainting_fill number (0..3) from the number or its name ("latent noise", ...)."""
    if isinstance(value, str) and not value.strip().isdigit():
        name = value.strip().lower().replace("_", " ")
        if name not in FILL_MODES:
            raise ValueError(
                f"unknown masked content {value!r}: use one of {', '.join(FILL_MODES)} (or 0..3)"
            )
        return FILL_MODES.index(name)
    number = int(value)
    if not 0 <= number < len(FILL_MODES):
        raise ValueError(f"inpainting_fill must be 0..3 ({', '.join(FILL_MODES)}), got {number}")
    return number


@dataclass(frozen=True)
class InpaintSettings:
    """A1111's img2img mask controls (its API field names), as a run's parameters carry them."""

    mask_blur_x: int = DEFAULT_MASK_BLUR
    mask_blur_y: int = DEFAULT_MASK_BLUR
    inpainting_fill: int = DEFAULT_FILL
    inpaint_full_res: bool = False  # "Only masked"
    inpaint_full_res_padding: int = DEFAULT_PADDING
    inpainting_mask_invert: bool = False  # "Inpaint not masked"
    # A1111's inpainting_mask_weight ("Inpainting conditioning mask strength"), 9-channel models only.
    mask_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.mask_blur_x < 0 or self.mask_blur_y < 0:
            raise ValueError(f"mask blur must be >= 0, got {self.mask_blur_x}, {self.mask_blur_y}")
        if self.inpaint_full_res_padding < 0:
            raise ValueError(f"masked area padding must be >= 0, got {self.inpaint_full_res_padding}")
        if not 0 <= self.mask_weight <= 1:
            raise ValueError(f"inpainting mask weight must be in [0, 1], got {self.mask_weight}")
        fill_mode(self.inpainting_fill)

    def infotext(self, nine_channel: bool) -> list[tuple[str, object]]:
        """The keys A1111 adds to the infotext for these settings (only where it writes them)."""
        blur = self.mask_blur_x if self.mask_blur_x == self.mask_blur_y else None
        written = {LATENT_NOISE: "latent noise", LATENT_NOTHING: "latent nothing", FILL: "fill"}
        return [
            ("Conditional mask weight", f"{self.mask_weight:g}" if nine_channel else None),
            ("Mask mode", "Inpaint not masked" if self.inpainting_mask_invert else None),
            ("Mask blur", blur if (self.mask_blur_x or self.mask_blur_y) else None),
            ("Mask blur x", self.mask_blur_x if blur is None else None),  # ours: A1111 writes none then
            ("Mask blur y", self.mask_blur_y if blur is None else None),
            ("Inpaint area", "Only masked" if self.inpaint_full_res else None),
            ("Masked area padding", self.inpaint_full_res_padding if self.inpaint_full_res else None),
            ("Masked content", written.get(self.inpainting_fill)),
        ]

    @classmethod
    def from_infotext(cls, settings: dict[str, str]) -> InpaintSettings | None:
        """The settings an infotext records, None when it records no inpainting. Absent keys take the
        values A1111's paste fields restore (Mask mode "Inpaint masked", Masked content "original",
        "Whole picture", padding 32); Mask blur absent means 0, as A1111 writes it only when > 0."""
        keys = (
            "Mask blur",
            "Mask blur x",
            "Mask mode",
            "Inpaint area",
            "Masked area padding",
            "Masked content",
        )
        if not any(k in settings for k in keys):
            return None
        blur = int(settings.get("Mask blur", 0))
        return cls(
            mask_blur_x=int(settings.get("Mask blur x", blur)),
            mask_blur_y=int(settings.get("Mask blur y", blur)),
            inpainting_fill=fill_mode(settings.get("Masked content", "original")),
            inpaint_full_res=settings.get("Inpaint area", "Whole picture").strip() == "Only masked",
            inpaint_full_res_padding=int(settings.get("Masked area padding", DEFAULT_PADDING)),
            inpainting_mask_invert=settings.get("Mask mode", "Inpaint masked").strip()
            == "Inpaint not masked",
            mask_weight=float(settings.get("Conditional mask weight", 1.0)),
        )


INFOTEXT_KEYS = frozenset({
    "Mask blur", "Mask blur x", "Mask blur y", "Mask mode", "Inpaint area", "Masked area padding",
    "Masked content", "Conditional mask weight",
})  # fmt: skip


# --- masks ------------------------------------------------------------------------------------------------


def load_mask(mask: Image.Image | np.ndarray | torch.Tensor | str | Path) -> Image.Image:
    """A mask as an 8-bit L image, white = repaint: from a file, a PIL image, or an array (bool, 0..1 floats
    or 0..255 integers; H x W, H x W x C or 1 x H x W). An RGBA mask with any transparency is read as A1111
    reads one: its alpha channel is the mask, thresholded at 128 (`create_binary_mask`); other modes are
    converted to grey."""
    if isinstance(mask, (str, Path)):
        path = Path(mask)
        if not path.is_file():
            raise ValueError(f"mask not found: {path}")
        with Image.open(path) as opened:
            opened.load()
            mask = ImageOps.exif_transpose(opened)
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    if isinstance(mask, np.ndarray):
        array = np.squeeze(mask)
        if array.ndim == 3:  # H x W x C (or C x H x W): the first channel, as a grey mask is
            array = array[..., 0] if array.shape[-1] <= 4 else array[0]
        if array.ndim != 2:
            raise ValueError(f"a mask array must be H x W (or H x W x C), got shape {mask.shape}")
        if array.dtype == bool:
            array = array.astype(np.uint8) * 255
        elif np.issubdtype(array.dtype, np.floating):
            array = np.round(np.clip(array, 0, 1) * 255).astype(np.uint8)
        else:
            array = np.clip(array, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L")
    if not isinstance(mask, Image.Image):
        raise TypeError(f"a mask is a PIL image, an array or a file path, not {type(mask).__name__}")
    if mask.mode == "P":
        mask = mask.convert("RGBA")
    if mask.mode in ("RGBA", "LA") and mask.getextrema()[-1] != (255, 255):
        return mask.getchannel("A").point(lambda v: 255 if v > 128 else 0)
    if mask.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        from .images import to_rgb

        return to_rgb(mask).convert("L")
    return mask.convert("L")


def mask_from_alpha(image: Image.Image) -> Image.Image | None:
    """The repaint mask of an image with transparent areas (transparent = repaint, the "erase to inpaint"
    convention); None for an opaque image."""
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode not in ("RGBA", "LA", "PA") or image.getextrema()[-1] == (255, 255):
        return None
    return ImageOps.invert(image.getchannel("A"))


def gaussian_kernel(sigma: float) -> np.ndarray:
    """The 1-D kernel A1111 blurs masks with: size 2 * int(2.5 sigma + 0.5) + 1 (v1.10.1; before 1.6 it
    was 4 sigma), OpenCV's getGaussianKernel weights."""
    size = 2 * int(2.5 * sigma + 0.5) + 1
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    kernel = np.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def blur_mask(mask: Image.Image, blur_x: int, blur_y: int) -> Image.Image:
    """A1111's mask blur: a Gaussian in x (sigma `blur_x`), then in y, borders mirrored as OpenCV's
    default (BORDER_REFLECT_101). Computed in float and rounded; OpenCV's 8-bit fixed-point path can
    differ by one level."""
    from scipy.ndimage import correlate1d

    array = np.asarray(mask, dtype=np.uint8)
    for axis, sigma in ((1, blur_x), (0, blur_y)):
        if sigma > 0:  # rounded to 8 bits after each pass, as A1111 goes back to an image in between
            blurred = correlate1d(array.astype(np.float64), gaussian_kernel(sigma), axis=axis, mode="mirror")
            array = np.clip(np.round(blurred), 0, 255).astype(np.uint8)
    return Image.fromarray(array, mode="L")


# --- A1111's geometry ---------------------------------------------------------------------------------------


def crop_region(mask: Image.Image, padding: int) -> tuple[int, int, int, int] | None:
    """The box (x1, y1, x2, y2) around the mask's non-zero pixels, `padding` wider on each side within
    the image (A1111's get_crop_region_v2); None for an empty mask."""
    box = mask.getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    width, height = mask.size
    return max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, width), min(y2 + padding, height)


def expand_crop_region(
    box: tuple[int, int, int, int], width: int, height: int, image_width: int, image_height: int
) -> tuple[int, int, int, int]:
    """Grow `box` to the aspect of the `width` x `height` it will be processed at, shifted to stay inside
    the image (A1111's expand_crop_region, its integer steps)."""
    x1, y1, x2, y2 = box
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _grow_span(y1, y2, int((x2 - x1) / (width / height) - (y2 - y1)), image_height)
    else:
        x1, x2 = _grow_span(x1, x2, int((y2 - y1) * (width / height) - (x2 - x1)), image_width)
    return x1, y1, x2, y2


def _grow_span(start: int, end: int, grow: int, limit: int) -> tuple[int, int]:
    """[start, end) widened by `grow` (half each side), shifted back inside [0, limit), then clipped."""
    start, end = start - grow // 2, end + grow - grow // 2
    if end >= limit:
        start, end = start - (end - limit), limit
    if start < 0:
        start, end = 0, end - start
    return start, min(end, limit)


def resize_image(mode: int, image: Image.Image, width: int, height: int) -> Image.Image:
    """A1111's resize modes with Lanczos (its img2img upscaler setting left at None): 0 stretch, 1 crop to
    fill, 2 fit and fill the borders with stretched edge rows/columns."""
    if mode == 0:
        return image.resize((width, height), Image.Resampling.LANCZOS)
    ratio, src_ratio = width / height, image.width / image.height
    if mode == 1:
        src_w = width if ratio > src_ratio else image.width * height // image.height
        src_h = height if ratio <= src_ratio else image.height * width // image.width
    else:
        src_w = width if ratio < src_ratio else image.width * height // image.height
        src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), Image.Resampling.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if mode == 2 and ratio < src_ratio:
        fill = height // 2 - src_h // 2
        if fill > 0:
            out.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
            out.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)),
                      box=(0, fill + src_h))  # fmt: skip
    elif mode == 2 and ratio > src_ratio:
        fill = width // 2 - src_w // 2
        if fill > 0:
            out.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
            out.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)),
                      box=(fill + src_w, 0))  # fmt: skip
    return out


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill" masked content: the masked area painted with ever finer blurs of what surrounds it
    (masking.fill: radii 256, 64, 16, 4, 2, 0 composited 1, 1, 2, 4, 2, 1 times)."""
    out = Image.new("RGBA", image.size)
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return out.convert("RGB")


def overlay_of(image: Image.Image, mask_for_overlay: Image.Image) -> Image.Image:
    """The original as an RGBA layer, transparent where it is repainted (A1111's overlay image)."""
    if mask_for_overlay.size != image.size:
        mask_for_overlay = resize_image(0, mask_for_overlay, *image.size).convert("L")
    layer = Image.new("RGBa", image.size)
    layer.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask_for_overlay.convert("L")))
    return layer.convert("RGBA")


def apply_overlay(
    image: Image.Image, paste_to: tuple[int, int, int, int] | None, overlay: Image.Image | None
) -> Image.Image:
    """The result pasted back where its crop came from (`paste_to` = x, y, w, h) and composited under the
    original's overlay: where the mask is 0 the pixels are the input's exactly (A1111's apply_overlay)."""
    if overlay is None:
        return image
    if paste_to is not None:
        x, y, w, h = paste_to
        base = Image.new("RGBA", overlay.size)
        base.paste(resize_image(1, image, w, h), (x, y))
        image = base
    image = image.convert("RGBA")
    image.alpha_composite(overlay)
    return image.convert("RGB")


# --- one run's images -------------------------------------------------------------------------------------


@dataclass
class PreparedImages:
    """What an inpainting run works on, at the processing size: the init `image` (filled as asked), the
    repaint `mask` (blurred; L), and how to put the result back (`overlay`, `paste_to`)."""

    image: Image.Image
    mask: Image.Image | None  # None: an empty mask under "only masked" (plain img2img, as A1111)
    overlay: Image.Image | None
    paste_to: tuple[int, int, int, int] | None


def prepare(
    image: Image.Image, mask: Image.Image, width: int, height: int, settings: InpaintSettings
) -> PreparedImages:
    """A1111's img2img init for a mask: invert, blur, "only masked" crop or "whole picture" resize, the
    overlay, "fill". `image` is RGB, `mask` L, both at the input's size."""
    if mask.size != image.size:
        log.warning("the mask is %dx%d and the image %dx%d: the mask is resized to the image",
                    *mask.size, *image.size)  # fmt: skip
        mask = mask.resize(image.size, Image.Resampling.LANCZOS)
    if settings.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
    if settings.mask_blur_x > 0 or settings.mask_blur_y > 0:
        mask = blur_mask(mask, settings.mask_blur_x, settings.mask_blur_y)
    paste_to = None
    box = None
    if settings.inpaint_full_res:
        box = crop_region(mask, settings.inpaint_full_res_padding)
        if box is None:
            log.warning(
                'Unable to perform "only masked" inpainting: the mask is blank; a plain img2img it is'
            )
            return PreparedImages(resize_image(0, image, width, height), None, None, None)
        box = expand_crop_region(box, width, height, *mask.size)
        x1, y1, x2, y2 = box
        mask_for_overlay = mask
        mask = resize_image(2, mask.crop(box), width, height).convert("L")
        paste_to = (x1, y1, x2 - x1, y2 - y1)
        base = image
    else:
        mask = resize_image(0, mask, width, height)
        doubled = np.clip(np.asarray(mask, dtype=np.float32) * 2, 0, 255).astype(np.uint8)
        mask_for_overlay = Image.fromarray(doubled, mode="L")
        base = image = resize_image(0, image, width, height)
    overlay = overlay_of(base, mask_for_overlay)
    if box is not None:
        image = resize_image(2, image.crop(box), width, height)
    if settings.inpainting_fill == FILL:
        image = fill_masked(image, mask)
    return PreparedImages(image, mask, overlay, paste_to)


# --- outpainting --------------------------------------------------------------------------------------------


@dataclass
class Outpainting:
    """An outpainting canvas: the image placed on a larger one (a multiple of `multiple` on each side), the
    mask of what is new, and the box of the requested result within the canvas."""

    canvas: Image.Image
    mask: Image.Image
    box: tuple[int, int, int, int]


def outpaint_canvas(
    image: Image.Image, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0, overlap: int = 0,
    multiple: int = 8,
) -> Outpainting:  # fmt: skip
    """Place `image` on a canvas `left`/`right`/`top`/`bottom` pixels larger; the new area (and `overlap`
    pixels into the image on the extended sides, so the seam is blended there, as A1111's outpainting
    script does with twice the mask blur) is masked. Sides that are not a multiple of `multiple` grow
    further on an extended side (else right / bottom) and are cropped off again (`box`)."""
    sides = {"left": left, "right": right, "top": top, "bottom": bottom}
    if any(v < 0 for v in sides.values()):
        raise ValueError(f"outpainting sizes must be >= 0, got {sides}")
    if not any(sides.values()):
        raise ValueError("outpainting needs at least one side to extend (left, right, top or bottom)")
    want_w, want_h = image.width + left + right, image.height + top + bottom
    extra_w, extra_h = -want_w % multiple, -want_h % multiple
    # the rounding goes to an extended side, so the image itself is never at the canvas edge needlessly
    pad_l, pad_r = (left + extra_w, right) if left and not right else (left, right + extra_w)
    pad_t, pad_b = (top + extra_h, bottom) if top and not bottom else (top, bottom + extra_h)
    canvas_size = (image.width + pad_l + pad_r, image.height + pad_t + pad_b)
    canvas = Image.new("RGB", canvas_size, (127, 127, 127))
    canvas.paste(image.convert("RGB"), (pad_l, pad_t))
    mask = Image.new("L", canvas_size, 255)
    keep = (
        pad_l + (overlap if pad_l else 0),
        pad_t + (overlap if pad_t else 0),
        pad_l + image.width - (overlap if pad_r else 0),
        pad_t + image.height - (overlap if pad_b else 0),
    )
    if keep[2] > keep[0] and keep[3] > keep[1]:
        mask.paste(0, keep)
    box = (pad_l - left, pad_t - top, pad_l - left + want_w, pad_t - top + want_h)
    return Outpainting(canvas, mask, box)


__all__ = [
    "FILL_MODES",
    "InpaintSettings",
    "Outpainting",
    "PreparedImages",
    "apply_overlay",
    "blur_mask",
    "crop_region",
    "expand_crop_region",
    "fill_masked",
    "fill_mode",
    "load_mask",
    "mask_from_alpha",
    "outpaint_canvas",
    "prepare",
    "resize_image",
]
