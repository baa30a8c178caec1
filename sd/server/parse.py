"""A1111 request fields -> the GenerationParams of a job, every check before any model work.

The fields mean what A1111 v1.10.1 makes of them: `sampler_name` (or `sampler_index`) and `scheduler` are
its names; `override_settings` (per request) over the server's options (POST /sdapi/v1/options) give clip
skip, emphasis, RNG source, ENSD, eta and the schedule settings; `seed` -1 is a new seed. A field that
cannot change the image (`save_images`, `styles` we do not have, ...) is accepted and listed in the
answer's `ignored_fields`; one that would change it in a way we cannot make yet is refused (400).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image

from ..conditioning import check_emphasis
from ..config import SD15
from ..hires import upscaler_label
from ..images import image_from_bytes, read_png_parameters
from ..infotext import parse_infotext
from ..inpaint import InpaintSettings
from ..noise import check_source
from ..params import A1111_SAMPLER_NAMES, GenerationParams, a1111_sampler
from ..pipeline import (
    check_hires_settings,
    check_settings,
    check_size,
    check_uncond_skips,
    model_calls,
    new_seed,
)
from ..prompts import check_prompt
from ..samplers import ALIASES
from ..samplers.sigmas import SCHEDULE_TYPES, schedule_type
from .controlnet import ControlSpec, UnitError, parse_units

MAX_IMAGES = 16  # batch_size x n_iter per request
MAX_PROMPT_CHARS = 32768  # ~100 chunks of 75 tokens: far beyond any real prompt, and cheap to encode
MAX_STEPS = 10000
WAYS = ("a1111", "diffusers")
CLIP_SKIP_OPTION = "CLIP_stop_at_last_layers"  # A1111's name for clip skip
# A1111 options that change the image: name -> (type, default, GenerationParams field or None)
OPTIONS: dict[str, tuple[type | tuple[type, ...], Any, str | None]] = {
    CLIP_SKIP_OPTION: (int, 1, "clip_skip"),
    "emphasis": (str, "Original", "emphasis"),
    "pad_cond_uncond": (bool, False, "pad_conds"),
    "eta_noise_seed_delta": (int, 0, "ensd"),
    "randn_source": (str, "GPU", "rng"),
    "eta_ancestral": ((int, float), 1.0, "eta"),
    "eta_ddim": ((int, float), 0.0, "eta_ddim"),
    "s_churn": ((int, float), 0.0, "s_churn"),
    "s_tmin": ((int, float), 0.0, "s_tmin"),
    "s_tmax": ((int, float), 0.0, "s_tmax"),
    "s_noise": ((int, float), 1.0, "s_noise"),
    "sigma_min": ((int, float), 0.0, "sigma_min"),
    "sigma_max": ((int, float), 0.0, "sigma_max"),
    "rho": ((int, float), 0.0, "rho"),
    "always_discard_next_to_last_sigma": (bool, False, "discard_penultimate"),
    "use_downcasted_alpha_bar": (bool, False, "downcast_alphas"),
    "use_old_scheduling": (bool, False, "old_prompt_editing"),
    "initial_noise_multiplier": ((int, float), 1.0, "noise_multiplier"),
    "sgm_noise_multiplier": (bool, False, "sgm_noise"),
    "comma_padding_backtrack": (int, 20, None),  # the pipeline's, set per job (sd.server.service)
    "s_min_uncond": ((int, float), 0.0, "s_min_uncond"),  # NGMS (the request's s_min_uncond wins)
    "s_min_uncond_all": (bool, False, "s_min_uncond_all"),
    "skip_early_cond": ((int, float), 0.0, "skip_early_cond"),
    "tiling": (bool, False, "tiling"),  # both ways (the request's tiling wins)
    "sd_model_checkpoint": (str, None, None),  # switches the model (sd.server.service)
    "sd_vae": (str, "Automatic", None),  # swaps the VAE where the pipeline can (sd.server.service)
    "inpainting_mask_weight": ((int, float), 1.0, None),  # the 9-channel model's (InpaintSettings)
}
# Options that describe the server rather than the image: shown and stored, nothing to do.
HARMLESS_OPTIONS: dict[str, Any] = {
    "samples_format": "png",
    "samples_save": False,
    "save_images_add_number": True,
    "grid_save": False,
    "live_previews_enable": True,
    "show_progress_every_n_steps": 1,
    "live_preview_content": "Prompt",
    "sd_checkpoints_limit": 1,
    "face_restoration_model": None,
    "token_merging_ratio": 0.0,
}
# Request fields that would change the image in a way we cannot make yet: refused when set.
UNSUPPORTED_YET = {
    "latent_mask": "a separate latent mask",
    "restore_faces": "face restoration",
    "refiner_checkpoint": "a refiner",
    "disable_extra_networks": "disable_extra_networks",
    "firstpass_image": "a given hires first pass",
    "hr_checkpoint_name": "another checkpoint for the hires pass",
}
# Fields we read (beyond GenerationParams'): a field sent and not here is listed as ignored.
READ = frozenset({
    "prompt", "negative_prompt", "seed", "subseed", "subseed_strength", "seed_resize_from_h",
    "seed_resize_from_w", "sampler_name", "sampler_index", "scheduler", "batch_size", "n_iter", "steps",
    "cfg_scale", "width", "height", "eta", "s_churn", "s_tmax", "s_tmin", "s_noise", "override_settings",
    "override_settings_restore_afterwards", "way", "clip_skip", "force_task_id", "infotext", "script_args",
    "script_name", "alwayson_scripts", "s_min_uncond", "tiling", *UNSUPPORTED_YET,
})  # fmt: skip
# txt2img's hires fix (sd.hires), A1111's fields and defaults ("Use same ...": None)
HIRES_DEFAULTS: dict[str, Any] = {
    "enable_hr": False, "denoising_strength": 0.75, "hr_scale": 2.0, "hr_upscaler": None,
    "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0, "hr_sampler_name": None,
    "hr_scheduler": None, "hr_prompt": "", "hr_negative_prompt": "", "firstphase_width": 0,
    "firstphase_height": 0,
}  # fmt: skip
READ_TXT2IMG = READ | set(HIRES_DEFAULTS)
# img2img's inpainting (sd.inpaint), A1111's API fields and its API's defaults (not its UI's: whole
# picture, padding 32, "original"); read only with a mask, as A1111 does.
INPAINT_DEFAULTS: dict[str, Any] = {
    "mask_blur": None, "mask_blur_x": 4, "mask_blur_y": 4, "inpainting_fill": 0, "inpaint_full_res": True,
    "inpaint_full_res_padding": 0, "inpainting_mask_invert": 0, "mask_round": True,
}  # fmt: skip
READ_IMG2IMG = READ | {"init_images", "denoising_strength", "resize_mode", "initial_noise_multiplier"}
RESIZE_MODES = {0: "Just resize", 1: "Crop and resize"}
SCHEDULERS = {"automatic": False, "uniform": False, "karras": True}  # diffusers' way: A1111 name -> karras


class BadRequestError(ValueError):
    """A request we refuse, with the one line that says why (status 400, or `status`)."""

    def __init__(self, detail: str, status: int = 400):
        super().__init__(detail)
        self.status = status


@dataclass(frozen=True)
class Request:
    """A checked generation request: the parameters of its first batch, and how to run them."""

    params: GenerationParams  # the first batch's (sd.server.service numbers the others)
    batch_size: int
    n_iter: int
    eta: float  # diffusers' way only (A1111's way: params.eta)
    image: Image.Image | None = None  # img2img's input, resized as resize_mode says
    mask: Image.Image | None = None  # inpainting's (its controls: params.inpaint)
    ignored: tuple[str, ...] = ()
    send_images: bool = True
    task_id: str | None = None
    checkpoint: str | None = None  # override_settings' sd_model_checkpoint, for this job
    vae: str | None = None  # override_settings' sd_vae, for this job
    control: tuple[ControlSpec, ...] = ()  # ControlNet units of alwayson_scripts (sd.server.controlnet)
    restore: bool = True  # override_settings_restore_afterwards
    comma_backtrack: int | None = None


def typed(values: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    """values[name] if it is of `kind` (bool is not a number here), `default` when absent or null."""
    value = values.get(name)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kind):
        wanted = " or ".join(k.__name__ for k in kinds)
        raise BadRequestError(f"{name} must be {wanted}, got {json.dumps(value)[:80]}")
    if (isinstance(value, float) and value != value) or value in (float("inf"), float("-inf")):
        raise BadRequestError(f"{name} must be a finite number, got {value}")
    return value


def check_options(options: dict[str, Any], where: str = "") -> None:
    """400 for an option of the wrong type (options we do not know pass: A1111 ignores them)."""
    if not isinstance(options, dict):
        raise BadRequestError(f"{where or 'options'} must be a JSON object")
    for name, (kind, _, _) in OPTIONS.items():
        if name in options:
            typed(options, name, kind, None)
    if options.get("emphasis") is not None:
        try:
            check_emphasis(options["emphasis"])
        except ValueError as error:
            raise BadRequestError(str(error)) from None
    if options.get("randn_source") is not None:
        try:
            check_source(options["randn_source"].upper())
        except ValueError as error:
            raise BadRequestError(str(error)) from None
    if options.get(CLIP_SKIP_OPTION) is not None and options[CLIP_SKIP_OPTION] < 1:
        raise BadRequestError(f"{CLIP_SKIP_OPTION} must be at least 1, got {options[CLIP_SKIP_OPTION]}")


def decode_base64(data: str, label: str) -> bytes:
    """The bytes of base64 text or a data URL (data:image/png;base64,....)."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequestError(f"{label} is not valid base64") from None


def decode_image(data: Any, label: str) -> Image.Image:
    if not isinstance(data, str):
        raise BadRequestError(f"{label} must be a base64-encoded image")
    try:
        return image_from_bytes(decode_base64(data, label), label)
    except ValueError as error:
        raise BadRequestError(str(error)) from None


def png_info(image: str) -> dict[str, Any]:
    """A1111's /sdapi/v1/png-info: the image's infotext, and it parsed as A1111 parses it (WxH values
    split into key-1 and key-2, "Prompt" and "Negative prompt" keys)."""
    raw = decode_base64(image, "image")
    try:
        text = read_png_parameters(io.BytesIO(raw))
    except ValueError as error:
        if "no generation parameters" not in str(error):
            raise BadRequestError(
                str(error).replace("<_io.BytesIO object", "image").split(" at 0x")[0]
            ) from None
        return {"info": "", "items": {}, "parameters": {}}  # as A1111 answers an image without any
    prompt, negative, settings = parse_infotext(text)
    parameters: dict[str, Any] = {"Prompt": prompt, "Negative prompt": negative}
    for key, value in settings.items():
        size = re.fullmatch(r"(\d+)x(\d+)", value)
        parameters.update({f"{key}-1": size[1], f"{key}-2": size[2]} if size else {key: value})
    return {"info": text, "items": {"parameters": text}, "parameters": parameters}


def _resize(image: Image.Image, mode: int, width: int | None, height: int | None) -> Image.Image:
    """A1111's resize modes 0 (stretch to the size: the pipeline does it) and 1 (cover, then centre-crop)."""
    if mode != 1 or width is None or height is None:
        return image
    ratio = max(width / image.width, height / image.height)
    w, h = max(width, round(image.width * ratio)), max(height, round(image.height * ratio))
    resized = image.resize((w, h), Image.Resampling.LANCZOS)
    left, top = (w - width) // 2, (h - height) // 2
    return resized.crop((left, top, left + width, top + height))


def _from_infotext(body: dict[str, Any], text: str) -> dict[str, Any]:
    """A1111's `infotext` field: its settings fill the request's fields that were not given."""
    try:
        params = GenerationParams.from_text(text)
    except ValueError as error:
        raise BadRequestError(f"infotext: {error}") from None
    found = {
        "prompt": params.prompt, "negative_prompt": params.negative_prompt, "steps": params.steps,
        "cfg_scale": params.cfg_scale, "seed": params.seed, "width": params.width, "height": params.height,
        "sampler_name": params.sampler, "scheduler": params.schedule if params.a1111 else None,
        "clip_skip": params.clip_skip, "denoising_strength": params.strength,
    }  # fmt: skip
    if params.a1111 and params.subseed_strength:
        found.update(subseed=params.subseed, subseed_strength=params.subseed_strength)
    return {**{k: v for k, v in found.items() if v is not None}, **body}


def parse_request(
    body: dict[str, Any],
    img2img: bool,
    way: str = "a1111",
    options: dict[str, Any] | None = None,
    controlnet_dir: Path | None = None,
) -> Request:
    """Check every field before any work: a BadRequestError names the first problem.

    `body`: the fields the client sent (null ones count as absent); `way`: the server's default, which a
    request's own "way" overrides; `options`: the server's options that were set (POST /options);
    `controlnet_dir`: where the ControlNet units' models are (A1111's models/ControlNet)."""
    if not isinstance(body, dict):
        raise BadRequestError("the request body must be a JSON object")
    same_checkpoint = str(body.get("hr_checkpoint_name", "")).lower() in ("", "use same checkpoint")
    body = {
        k: v for k, v in body.items() if v is not None and not (k == "hr_checkpoint_name" and same_checkpoint)
    }
    if isinstance(body.get("infotext"), str) and body["infotext"].strip():
        body = _from_infotext(body, body["infotext"])
    get = lambda name, kind, default=None: typed(body, name, kind, default)  # noqa: E731
    way = get("way", str) or way
    if way not in WAYS:
        raise BadRequestError(f"way must be one of {', '.join(WAYS)}, got {way!r}")
    overrides = body.get("override_settings") or {}
    check_options(overrides, "override_settings")
    settings = {**(options or {}), **overrides}  # the request's own settings win (A1111)
    option = lambda name: typed(settings, name, OPTIONS[name][0], OPTIONS[name][1])  # noqa: E731
    for name in ("prompt", "negative_prompt"):
        if len(get(name, str, "")) > MAX_PROMPT_CHARS:
            raise BadRequestError(f"{name} is {len(body[name])} characters; at most {MAX_PROMPT_CHARS}", 413)
    seed = get("seed", int, -1)
    steps = get("steps", int, 50)  # A1111's API default (its web page's is 20)
    if steps > MAX_STEPS:
        raise BadRequestError(f"steps must be at most {MAX_STEPS}, got {steps}")
    params = GenerationParams(
        prompt=get("prompt", str, ""),
        negative_prompt=get("negative_prompt", str, ""),
        steps=steps,
        cfg_scale=float(get("cfg_scale", (int, float), 7.0)),
        seed=new_seed() if seed < 0 else seed,
        width=get("width", int),  # None: the model's own size (SD1.5: 512; img2img: the input's)
        height=get("height", int),
        strength=float(get("denoising_strength", (int, float), 0.75)) if img2img else None,
        clip_skip=typed(overrides, CLIP_SKIP_OPTION, int, get("clip_skip", int, option(CLIP_SKIP_OPTION))),
        emphasis=option("emphasis"),
        pad_conds=option("pad_cond_uncond"),
        tiling=get("tiling", bool, option("tiling")),
    )
    sampler_name = get("sampler_name", str) or get("sampler_index", str) or "Euler"  # A1111's API default
    eta = 0.0
    if way == "a1111":
        params = replace(params, **_a1111_fields(body, get, settings, sampler_name, img2img))
    else:
        sampler, karras = sampler_of(sampler_name, get("scheduler", str) or "automatic")
        params = replace(params, sampler=sampler, karras=karras)
        # A1111 clients send eta (1.0) whatever the sampler, and A1111 applies it only where it means
        # something: here that is DDIM alone.
        eta = float(get("eta", (int, float), 0.0)) if ALIASES.get(sampler, sampler) == "ddim" else 0.0
    if not img2img and get("enable_hr", bool, False):
        hires = lambda name, kind: get(name, kind, HIRES_DEFAULTS[name])  # noqa: E731
        params = replace(params, **_hires_fields(hires, params.a1111))
    for name, feature in UNSUPPORTED_YET.items():  # a wrong image that looks like success is worse
        if body.get(name):
            raise BadRequestError(f"{name}: {feature} is not supported yet; leave it out (or false)")
    if get("script_name", str):
        raise BadRequestError(f"Script '{body['script_name']}' not found", 422)  # A1111's answer
    resize_mode = get("resize_mode", int, 0) if img2img else 0
    if resize_mode not in RESIZE_MODES:
        modes = ", ".join(f"{k} ({v})" for k, v in RESIZE_MODES.items())
        raise BadRequestError(f"resize_mode {resize_mode} is not supported yet; use {modes}")
    masked = img2img and bool(body.get("mask"))
    if masked:
        params = replace(params, inpaint=_inpaint_settings(get, option("inpainting_mask_weight")))
    read = READ_IMG2IMG | (set(INPAINT_DEFAULTS) | {"mask"} if masked else set())
    read = read if img2img else (READ_TXT2IMG if params.enable_hr else READ)
    unread = set(body) - read
    if way == "diffusers":  # A1111's own fields do nothing there
        unread |= {name for name in body if name.startswith(("subseed", "seed_resize", "s_"))}
        if "eta" in body and not eta:
            unread.add("eta")
    if body.get("send_images") is not None:
        unread.add("send_images")  # honoured (false: no images), yet it cannot change an image
    known = set(OPTIONS)  # the rest (HARMLESS_OPTIONS too) cannot change the image
    request = Request(
        params,
        batch_size=get("batch_size", int, 1),
        n_iter=get("n_iter", int, 1),
        eta=eta,
        ignored=tuple(sorted(unread | {f"override_settings.{k}" for k in set(overrides) - known})),
        send_images=get("send_images", bool, True),
        task_id=get("force_task_id", str),
        checkpoint=typed(overrides, "sd_model_checkpoint", str, None),
        vae=typed(overrides, "sd_vae", str, None),
        restore=get("override_settings_restore_afterwards", bool, True),
        comma_backtrack=typed(settings, "comma_padding_backtrack", int, None),
    )
    if params.seed >= 2**32:
        raise BadRequestError(f"seed must be below 2**32, got {params.seed}")
    if request.batch_size < 1 or request.n_iter < 1:
        raise BadRequestError("batch_size and n_iter must be at least 1")
    if request.batch_size * request.n_iter > MAX_IMAGES:
        raise BadRequestError(f"at most {MAX_IMAGES} images per request (batch_size x n_iter)")
    if params.clip_skip < 1:
        raise BadRequestError(f"clip_skip must be at least 1, got {params.clip_skip}")
    images = body.get("init_images")
    if img2img and (not isinstance(images, list) or len(images) != 1):
        raise BadRequestError("img2img needs init_images: a list of one base64-encoded image")
    try:
        check_size(params.width, params.height)
        if params.enable_hr:
            check_hires_settings(params)
        check_settings(params.steps, params.cfg_scale, params.strength)
        check_uncond_skips(params)
        check_emphasis(params.emphasis)
        check_prompt(params.prompt, params.steps)
        check_prompt(params.negative_prompt, params.steps)
        model_calls(params, SD15.schedule)
        if params.a1111:
            check_source(params.rng)
    except ValueError as error:
        raise BadRequestError(str(error)) from None
    original = None
    if img2img:  # decoding last: cheap checks first
        image, mask = decode_image(images[0], "init_images[0]"), None
        original = image
        if masked:
            mask = decode_image(body["mask"], "mask")
        if not (masked and params.inpaint.inpaint_full_res):  # "only masked" crops the image as it is
            image = _resize(image, resize_mode, params.width, params.height)
            mask = mask and _resize(mask, resize_mode, params.width, params.height)
        request = replace(request, image=image, mask=mask)
    try:
        units, harmless = parse_units(body.get("alwayson_scripts"), decode_image, original, controlnet_dir)
    except UnitError as error:
        raise BadRequestError(str(error)) from None
    if units:
        params = replace(request.params, controlnet=tuple(unit.infotext for unit in units))
        request = replace(request, params=params, control=tuple(units),
                          ignored=tuple(sorted({*request.ignored, *harmless})))  # fmt: skip
    return request


def _inpaint_settings(get, mask_weight: float) -> InpaintSettings:
    """img2img's mask controls, A1111's API fields (mask_blur, when given, sets both axes)."""
    field = lambda name, kind: get(name, kind, INPAINT_DEFAULTS[name])  # noqa: E731
    if not field("mask_round", bool):
        raise BadRequestError("mask_round: an unrounded latent mask (soft inpainting) is not supported yet")
    blur = field("mask_blur", int)
    try:
        return InpaintSettings(
            mask_blur_x=field("mask_blur_x", int) if blur is None else blur,
            mask_blur_y=field("mask_blur_y", int) if blur is None else blur,
            inpainting_fill=field("inpainting_fill", int),
            inpaint_full_res=bool(field("inpaint_full_res", (bool, int))),
            inpaint_full_res_padding=field("inpaint_full_res_padding", int),
            inpainting_mask_invert=bool(field("inpainting_mask_invert", (bool, int))),
            mask_weight=float(mask_weight),
        )
    except ValueError as error:
        raise BadRequestError(str(error)) from None


def sampler_of(name: str, scheduler: str) -> tuple[str, bool]:
    """(our sampler name, karras) from A1111's sampler and scheduler names, or ours (diffusers' way)."""
    karras = SCHEDULERS.get(scheduler.lower())
    if karras is None:
        raise BadRequestError(f"scheduler {scheduler!r} is not supported; use one of {', '.join(SCHEDULERS)}")
    lowered = name.lower()
    if lowered.endswith(" karras"):  # older A1111 clients fold the schedule into the sampler name
        lowered, karras = lowered.removesuffix(" karras"), True
    return A1111_SAMPLER_NAMES.get(lowered, lowered), karras


def _hires_fields(get, a1111: bool) -> dict[str, Any]:
    """GenerationParams fields of txt2img's hires fix, one to one from A1111's request fields."""
    for name in ("firstphase_width", "firstphase_height"):
        if get(name, int):
            raise BadRequestError(
                f"{name}: A1111's old hires fix is not supported; use hr_scale or hr_resize_x/y"
            )
    same = {"use same sampler", "use same scheduler"}
    hr_sampler = get("hr_sampler_name", str)
    hr_sampler = None if not hr_sampler or hr_sampler.lower() in same else hr_sampler
    hr_scheduler = get("hr_scheduler", str)
    hr_scheduler = None if not hr_scheduler or hr_scheduler.lower() in same else hr_scheduler
    fields: dict[str, Any] = dict(
        enable_hr=True,
        strength=float(get("denoising_strength", (int, float))),
        hr_scale=float(get("hr_scale", (int, float))),
        hr_upscaler=get("hr_upscaler", str),
        hr_second_pass_steps=get("hr_second_pass_steps", int),
        hr_resize_x=get("hr_resize_x", int),
        hr_resize_y=get("hr_resize_y", int),
        hr_prompt=get("hr_prompt", str),
        hr_negative_prompt=get("hr_negative_prompt", str),
    )
    try:
        if a1111 and hr_sampler is not None:
            hr_sampler, named_schedule = a1111_sampler(hr_sampler)
            hr_scheduler = hr_scheduler or named_schedule
        if a1111 and hr_scheduler is not None and hr_scheduler.lower() != "automatic":
            hr_scheduler = SCHEDULE_TYPES[schedule_type(hr_scheduler)].label
        if fields["hr_upscaler"] is not None:
            fields["hr_upscaler"] = upscaler_label(fields["hr_upscaler"])
    except ValueError as error:
        raise BadRequestError(str(error)) from None
    return fields | {"hr_sampler_name": hr_sampler, "hr_scheduler": hr_scheduler}


def _a1111_fields(body: dict[str, Any], get, settings: dict[str, Any], sampler_name: str, img2img: bool):
    """GenerationParams fields of A1111's way: its sampler and schedule names, variation seed, seed resize,
    eta and churn (request fields win over the settings, as in A1111)."""
    try:
        label, named_schedule = a1111_sampler(sampler_name)
        scheduler = get("scheduler", str) or "Automatic"
        if scheduler.lower() != "automatic":
            scheduler = SCHEDULE_TYPES[schedule_type(scheduler)].label
    except ValueError as error:
        raise BadRequestError(str(error)) from None
    fields: dict[str, Any] = {"a1111": True, "sampler": label, "schedule": named_schedule or scheduler}
    for option, (kind, default, name) in OPTIONS.items():
        if name is None or name in ("clip_skip", "emphasis", "pad_conds", "tiling") or option not in settings:
            continue
        value = typed(settings, option, kind, default)
        fields[name] = float(value) if kind == (int, float) else value
    if "rng" in fields:
        fields["rng"] = fields["rng"].upper()
    for name in ("sigma_min", "sigma_max", "rho"):  # A1111: 0 means the schedule's own
        if not fields.get(name, 1):
            fields[name] = None
    for name in ("eta", "s_churn", "s_tmin", "s_tmax", "s_noise", "s_min_uncond"):
        value = get(name, (int, float))
        if value is not None:
            fields[name] = float(value)
    if img2img and get("initial_noise_multiplier", (int, float)) is not None:
        fields["noise_multiplier"] = float(body["initial_noise_multiplier"])
    strength = float(get("subseed_strength", (int, float), 0.0))
    if strength:
        subseed = get("subseed", int, -1)
        fields.update(subseed=new_seed() if subseed < 0 else subseed, subseed_strength=strength)
    resize = (get("seed_resize_from_w", int, -1), get("seed_resize_from_h", int, -1))
    if resize[0] > 0 and resize[1] > 0:
        fields["seed_resize_from"] = resize
    return fields
