"""A1111's image upscalers that need no model (v1.10.1 modules/upscaler.py, UpscalerNone / Lanczos /
Nearest), used by the hires fix and by the Extras tab's upscale (scripts/postprocessing_upscale.py).

    Upscaler.upscale(img, s)   the target is (w·s, h·s) rounded down to a multiple of 8; one resize with the
                               upscaler's filter to int(w·s) x int(h·s) (none when s != 1 and the image
                               is already that large), then a Lanczos resize to the target if it differs
    resize_image(0, ...)       the hires fix: "None" is one Lanczos resize; the others `upscale` by
                               max(W / w, H / h) when that is above 1, then Lanczos to W x H if needed
    Extras                     upscale by a factor or to W x H (scale max(W / w, H / h), then the result
                               pasted centred on a black W x H canvas when cropping), optionally blended
                               with a second upscaler's result (Image.blend at its visibility)
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from .infotext import quote

# PIL's filter of each built-in upscaler ("None": the image as it is; A1111 resizes it with Lanczos)
IMAGE_UPSCALERS: dict[str, Image.Resampling | None] = {
    "None": None,
    "Lanczos": Image.Resampling.LANCZOS,
    "Nearest": Image.Resampling.NEAREST,
}
# A1111's model upscalers: named in the error, not run here (they need their own networks)
MODEL_UPSCALERS = ("ESRGAN_4x", "R-ESRGAN 4x+", "R-ESRGAN 4x+ Anime6B", "R-ESRGAN General 4xV3",
                   "R-ESRGAN General WDN 4xV3", "R-ESRGAN AnimeVideo", "R-ESRGAN 2x+", "LDSR", "BSRGAN",
                   "ScuNET GAN", "ScuNET PSNR", "SwinIR 4x", "DAT x2", "DAT x3", "DAT x4")  # fmt: skip
LANCZOS = Image.Resampling.LANCZOS


def why_not(name: str) -> str:
    """Why an upscaler name that is not a built-in one cannot run."""
    if name.strip().lower() in {m.lower() for m in MODEL_UPSCALERS}:
        return "needs its model, which is not supported"
    return "is not a built-in upscaler"


def image_upscaler_label(name: str | None) -> str:
    """The built-in upscaler called `name` in any case (None: "None"); ValueError (one line) otherwise."""
    by_lower = {label.lower(): label for label in IMAGE_UPSCALERS}
    found = by_lower.get((name or "None").strip().lower())
    if found is not None:
        return found
    raise ValueError(f"upscaler {name!r} {why_not(name)}; one of: {', '.join(IMAGE_UPSCALERS)}")


def upscale_by(image: Image.Image, upscaler: str, scale: float) -> Image.Image:
    """A1111's Upscaler.upscale(image, scale) for a built-in upscaler ("None" only does the final resize)."""
    resample = IMAGE_UPSCALERS[image_upscaler_label(upscaler)]
    dest = (int((image.width * scale) // 8 * 8), int((image.height * scale) // 8 * 8))
    # The loop of do_upscale calls: one resize already reaches the target (int(w * s) >= it); a scale of
    # 1 resizes once anyway, to the same size.
    large_enough = image.width >= dest[0] and image.height >= dest[1] and scale != 1
    if resample is not None and not large_enough:
        image = image.resize((int(image.width * scale), int(image.height * scale)), resample=resample)
    if image.size != dest:
        image = image.resize(dest, resample=LANCZOS)
    return image


def resize_with(image: Image.Image, upscaler: str, width: int, height: int) -> Image.Image:
    """A1111's images.resize_image(0, image, width, height, upscaler), as the hires fix calls it."""
    label = image_upscaler_label(upscaler)
    if label == "None" or image.mode == "L":
        return image.resize((width, height), resample=LANCZOS)
    scale = max(width / image.width, height / image.height)
    if scale > 1.0:
        image = upscale_by(image, label, scale)
    if image.size != (width, height):
        image = image.resize((width, height), resample=LANCZOS)
    return image


@dataclass(frozen=True)
class ExtrasUpscale:
    """The Extras tab's upscale, with A1111's API names and defaults (ExtrasBaseRequest)."""

    resize_mode: int = 0  # 0: by `upscaling_resize`, 1: to upscaling_resize_w x _h
    upscaling_resize: float = 2.0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str | None = "None"
    upscaler_2: str | None = "None"
    extras_upscaler_2_visibility: float = 0.0

    def check(self) -> None:
        """ValueError (one line) for what A1111 would refuse or cannot mean."""
        image_upscaler_label(self.upscaler_1)
        image_upscaler_label(self.upscaler_2)
        if self.resize_mode not in (0, 1):
            raise ValueError(f"resize_mode must be 0 (scale by) or 1 (scale to), got {self.resize_mode}")
        if self.resize_mode == 0 and not 1 <= self.upscaling_resize <= 8:
            raise ValueError(f"upscaling_resize must be in [1, 8], got {self.upscaling_resize}")
        if self.resize_mode == 1 and not (
            0 < self.upscaling_resize_w <= 8192 and 0 < self.upscaling_resize_h <= 8192
        ):  # fmt: skip
            raise ValueError("upscaling_resize_w and _h must be in 1..8192, got "
                             f"{self.upscaling_resize_w} x {self.upscaling_resize_h}")  # fmt: skip
        if not 0 <= self.extras_upscaler_2_visibility <= 1:
            raise ValueError(f"extras_upscaler_2_visibility must be in [0, 1], got "
                             f"{self.extras_upscaler_2_visibility}")  # fmt: skip

    def _one(self, image: Image.Image, upscaler: str, info: dict[str, object]) -> Image.Image:
        """ScriptPostprocessingUpscale.upscale: one upscaler's result."""
        if self.resize_mode == 1:
            width, height = self.upscaling_resize_w, self.upscaling_resize_h
            scale = max(width / image.width, height / image.height)
            info["Postprocess upscale to"] = f"{width}x{height}"
        else:
            scale = self.upscaling_resize
            info["Postprocess upscale by"] = scale
        image = upscale_by(image, upscaler, scale)
        if self.resize_mode == 1 and self.upscaling_crop:
            canvas = Image.new("RGB", (width, height))
            canvas.paste(image, box=(width // 2 - image.width // 2, height // 2 - image.height // 2))
            image = canvas
            info["Postprocess crop to"] = f"{image.width}x{image.height}"
        return image

    def apply(self, image: Image.Image) -> tuple[Image.Image, dict[str, object]]:
        """The upscaled image and A1111's postprocessing infotext items; "None" as upscaler 1: unchanged."""
        self.check()
        first, second = image_upscaler_label(self.upscaler_1), image_upscaler_label(self.upscaler_2)
        info: dict[str, object] = {}
        if first == "None":
            return image, info
        source = image
        image = self._one(source, first, info)
        info["Postprocess upscaler"] = first
        if second != "None" and self.extras_upscaler_2_visibility > 0:
            other = self._one(source, second, info)
            info["Postprocess upscaler 2"] = second
            if other.mode != image.mode:
                other = other.convert(image.mode)
            image = Image.blend(image, other, self.extras_upscaler_2_visibility)
        return image, info


def postprocessing_text(info: dict[str, object]) -> str:
    """A1111's `postprocessing` infotext: `key: value, ...`, values quoted as in generation infotexts."""
    return ", ".join(f"{key}: {quote(value)}" for key, value in info.items() if value is not None)


__all__ = [
    "IMAGE_UPSCALERS",
    "MODEL_UPSCALERS",
    "ExtrasUpscale",
    "image_upscaler_label",
    "postprocessing_text",
    "resize_with",
    "upscale_by",
    "why_not",
]
