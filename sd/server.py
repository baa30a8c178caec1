"""`sd serve`: an HTTP API over one loaded model, shaped like AUTOMATIC1111's web API.

Clients written for A1111's `/sdapi/v1` routes work unchanged for what SD1.x generation needs:

    POST /sdapi/v1/txt2img    {"prompt": "a red fox", "steps": 20, "seed": 42, "sampler_name": "Euler a"}
    POST /sdapi/v1/img2img    {"prompt": ..., "init_images": ["<base64 PNG>"], "denoising_strength": 0.6}
    GET  /sdapi/v1/progress   how far the running job is
    POST /sdapi/v1/interrupt  stop the running job
    GET  /sdapi/v1/samplers   the sampler names (and /sdapi/v1/schedulers: the schedule types)
    GET  /sdapi/v1/sd-models  the loaded model (and /sdapi/v1/options: its title, as clients read it)

Images are made A1111's way by default (its samplers, schedules, per-image noise and pixels; a request's
`"way": "diffusers"` or `sd serve --way diffusers` picks ours). Answers carry base64 PNGs with their
generation parameters in the `parameters` text chunk (so
`sd generate --from-png` reproduces them) and an `info` JSON string with the seeds. One job runs at a time
(one model in memory); the others wait for it. A bad request gets status 400 and a one-line `detail`, never
a traceback.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import re
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .conditioning import check_emphasis
from .config import SD15
from .hires import upscaler_label
from .images import image_from_bytes, read_png_parameters, save_png
from .infotext import parse_infotext
from .noise import check_source
from .params import A1111_SAMPLER_NAMES, GenerationParams, a1111_sampler
from .pipeline import Pipeline, check_hires_settings, check_settings, check_size, model_calls, new_seed
from .prompts import check_prompt
from .samplers import ALIASES, SAMPLERS
from .samplers.a1111 import catalogue
from .samplers.sigmas import SCHEDULE_TYPES, schedule_type

DEFAULT_HOST = "127.0.0.1"  # this machine only: anyone who can reach the port can use the model
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
DEFAULT_PORT = 7860  # A1111's, so its clients find us without settings
MAX_BODY_BYTES = 64 * 2**20
MAX_IMAGES = 16  # batch_size x n_iter per request

# Request fields we read, with A1111's defaults where ours would surprise its clients. Fields A1111 has
# and we do not (restore_faces, styles, ...) are ignored and listed in the answer's info.
TXT2IMG_DEFAULTS: dict[str, Any] = {
    "prompt": "",
    "negative_prompt": "",
    "seed": -1,
    "steps": 20,
    "cfg_scale": 7.0,
    "sampler_name": "DPM++ 2M",
    "scheduler": "Automatic",
    "width": None,  # the model's own size (SD1.5: 512); img2img: the input's, rounded down to a multiple of 8
    "height": None,
    "batch_size": 1,
    "n_iter": 1,
    "clip_skip": 1,
    "eta": None,  # None: the sampler's own (A1111: 1 for ancestral and SDE samplers; diffusers' DDIM: 0)
    # A1111's variation seed and seed resize, and Karras' churn settings (A1111's way only)
    "subseed": -1,
    "subseed_strength": 0.0,
    "seed_resize_from_h": -1,
    "seed_resize_from_w": -1,
    "s_churn": None,
    "s_tmin": None,
    "s_tmax": None,
    "s_noise": None,
    "way": None,  # ours: "a1111" or "diffusers" (default: the server's, `sd serve --way`)
}
IMG2IMG_DEFAULTS: dict[str, Any] = {
    **TXT2IMG_DEFAULTS,
    "init_images": None,
    "denoising_strength": 0.75,
}
# txt2img's hires fix (sd.hires), A1111's fields and defaults ("Use same ...": None)
HIRES_DEFAULTS: dict[str, Any] = {
    "enable_hr": False,
    "denoising_strength": 0.75,
    "hr_scale": 2.0,
    "hr_upscaler": None,
    "hr_second_pass_steps": 0,
    "hr_resize_x": 0,
    "hr_resize_y": 0,
    "hr_sampler_name": None,
    "hr_scheduler": None,
    "hr_prompt": "",
    "hr_negative_prompt": "",
    "firstphase_width": 0,  # A1111's pre-1.0 hires fix: refused when set
    "firstphase_height": 0,
}
SCHEDULERS = {"automatic": False, "uniform": False, "karras": True}  # diffusers' way: A1111 name -> karras
CLIP_SKIP_OPTION = "CLIP_stop_at_last_layers"  # A1111's name for clip skip
# override_settings we honour (A1111's option names), beyond clip skip: -> (type, GenerationParams field)
OPTIONS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "emphasis": (str, "emphasis"),
    "pad_cond_uncond": (bool, "pad_conds"),
    "eta_noise_seed_delta": (int, "ensd"),
    "randn_source": (str, "rng"),
    "eta_ancestral": ((int, float), "eta"),
    "eta_ddim": ((int, float), "eta_ddim"),
    "s_churn": ((int, float), "s_churn"),
    "s_tmin": ((int, float), "s_tmin"),
    "s_tmax": ((int, float), "s_tmax"),
    "s_noise": ((int, float), "s_noise"),
    "sigma_min": ((int, float), "sigma_min"),
    "sigma_max": ((int, float), "sigma_max"),
    "rho": ((int, float), "rho"),
    "always_discard_next_to_last_sigma": (bool, "discard_penultimate"),
    "use_downcasted_alpha_bar": (bool, "downcast_alphas"),
    "use_old_scheduling": (bool, "old_prompt_editing"),
    "initial_noise_multiplier": ((int, float), "noise_multiplier"),
    "sgm_noise_multiplier": (bool, "sgm_noise"),
}
# options that describe the server rather than the image: accepted, nothing to do
HARMLESS_OPTIONS = frozenset({"sd_model_checkpoint", "sd_vae", "samples_format", "save_images"})
WAYS = ("a1111", "diffusers")
# Request fields that would change the image in a way we cannot make yet: refused when set.
UNSUPPORTED_YET = {
    "mask": "inpainting",
    "restore_faces": "face restoration",
    "tiling": "tiling",
    "refiner_checkpoint": "a refiner",
    "alwayson_scripts": "scripts (e.g. ControlNet)",
}


class BadRequestError(ValueError):
    """A request we refuse, with the one line that says why."""


class JobInterruptedError(Exception):
    pass


@dataclass
class Job:
    """What /progress reports about the running request."""

    running: bool = False
    step: int = 0
    total: int = 0
    started: float = 0.0
    interrupt: threading.Event = field(default_factory=threading.Event)


# --- reading requests ------------------------------------------------------------------------------------


def _typed(request: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = request.get(name)
    if value is None:  # absent, or null as some clients send
        return default
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        wanted = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise BadRequestError(f"{name} must be {wanted}, got {json.dumps(value)}")
    return value


def sampler_of(name: str, scheduler: str) -> tuple[str, bool]:
    """(our sampler name, karras) from A1111's sampler and scheduler names, or ours."""
    karras = SCHEDULERS.get(scheduler.lower())
    if karras is None:
        raise BadRequestError(f"scheduler {scheduler!r} is not supported; use one of {', '.join(SCHEDULERS)}")
    lowered = name.lower()
    if lowered.endswith(" karras"):  # older A1111 clients fold the schedule into the sampler name
        lowered, karras = lowered.removesuffix(" karras"), True
    return A1111_SAMPLER_NAMES.get(lowered, lowered), karras


def _base64(data: str, label: str) -> bytes:
    """The bytes of base64 text or a data URL (data:image/png;base64,....)."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequestError(f"{label} is not valid base64") from None


def decode_init_image(data: Any):
    if not isinstance(data, str):
        raise BadRequestError("init_images must be a list of base64-encoded images")
    raw = _base64(data, "init_images[0]")
    try:
        return image_from_bytes(raw, "init_images[0]")
    except ValueError as error:
        raise BadRequestError(str(error)) from None


def png_info(body: Any) -> dict[str, Any]:
    """A1111's /sdapi/v1/png-info: the image's infotext, and it parsed as A1111 parses it (WxH values
    split into key-1 and key-2, "Prompt" and "Negative prompt" keys)."""
    if not isinstance(body, dict) or not isinstance(body.get("image"), str):
        raise BadRequestError('png-info needs {"image": <base64 PNG>}')
    raw = _base64(body["image"], "image")
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


def _overrides(body: dict[str, Any]) -> dict[str, Any]:
    """A1111 clients set clip skip, emphasis and cond padding as options, in override_settings."""
    overrides = body.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise BadRequestError("override_settings must be a JSON object")
    return overrides


@dataclass(frozen=True)
class Request:
    """A checked generation request: the parameters of each batch, and how many batches."""

    params: GenerationParams  # the first batch's; batch k has seed + k
    batch_size: int
    n_iter: int
    eta: float
    image: Any = None  # PIL image for img2img
    ignored: tuple[str, ...] = ()


def _a1111_fields(body: dict[str, Any], get, overrides: dict[str, Any]) -> dict[str, Any]:
    """GenerationParams fields of A1111's way: its sampler and schedule names, variation seed, seed resize,
    eta and churn (request fields win over override_settings, as in A1111)."""
    sampler_name = body.get("sampler_name") or body.get("sampler_index") or TXT2IMG_DEFAULTS["sampler_name"]
    if not isinstance(sampler_name, str):
        raise BadRequestError(f"sampler_name must be str, got {json.dumps(sampler_name)}")
    try:
        label, named_schedule = a1111_sampler(sampler_name)
        scheduler = get("scheduler", str) or "Automatic"
        if scheduler.lower() != "automatic":
            scheduler = SCHEDULE_TYPES[schedule_type(scheduler)].label
    except ValueError as error:
        raise BadRequestError(str(error)) from None
    fields: dict[str, Any] = {"a1111": True, "sampler": label, "schedule": named_schedule or scheduler}
    for option, (kind, name) in OPTIONS.items():
        if option in overrides:
            value = _typed(overrides, option, kind, None)
            fields[name] = float(value) if kind == (int, float) else value
    if "rng" in fields:
        fields["rng"] = fields["rng"].upper()
    for name in ("sigma_min", "sigma_max", "rho"):  # A1111: 0 means the schedule's own
        if not fields.get(name, 1):
            fields[name] = None
    for name in ("eta", "s_churn", "s_tmin", "s_tmax", "s_noise"):
        value = get(name, (int, float))
        if value is not None:
            fields[name] = float(value)
    strength = float(get("subseed_strength", (int, float)))
    if strength:
        subseed = get("subseed", int)
        fields.update(subseed=new_seed() if subseed < 0 else subseed, subseed_strength=strength)
    resize = (get("seed_resize_from_w", int), get("seed_resize_from_h", int))
    if resize[0] > 0 and resize[1] > 0:
        fields["seed_resize_from"] = resize
    return fields


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


def parse_request(body: dict[str, Any], img2img: bool, way: str = "a1111") -> Request:
    """Check every field before any work: a BadRequestError names the first problem. `way`: the server's
    default, which a request's own "way" overrides."""
    if not isinstance(body, dict):
        raise BadRequestError("the request body must be a JSON object")
    defaults = IMG2IMG_DEFAULTS if img2img else {**TXT2IMG_DEFAULTS, **HIRES_DEFAULTS}
    get = lambda name, kind: _typed(body, name, kind, defaults[name])  # noqa: E731
    way = get("way", str) or way
    if way not in WAYS:
        raise BadRequestError(f"way must be one of {', '.join(WAYS)}, got {way!r}")
    overrides = _overrides(body)
    seed = get("seed", int)
    params = GenerationParams(
        prompt=get("prompt", str),
        negative_prompt=get("negative_prompt", str),
        steps=get("steps", int),
        cfg_scale=float(get("cfg_scale", (int, float))),
        seed=new_seed() if seed < 0 else seed,
        width=get("width", int),
        height=get("height", int),
        strength=float(get("denoising_strength", (int, float))) if img2img else None,
        clip_skip=_typed(overrides, CLIP_SKIP_OPTION, int, get("clip_skip", int)),
        emphasis=_typed(overrides, "emphasis", str, "Original"),
        pad_conds=_typed(overrides, "pad_cond_uncond", bool, False),
    )
    if way == "a1111":
        params = replace(params, **_a1111_fields(body, get, overrides))
        eta = 0.0
    else:
        sampler_name = body.get("sampler_name") or body.get("sampler_index") or "dpmpp_2m"
        if not isinstance(sampler_name, str):
            raise BadRequestError(f"sampler_name must be str, got {json.dumps(sampler_name)}")
        sampler, karras = sampler_of(sampler_name, get("scheduler", str) or "automatic")
        params = replace(params, sampler=sampler, karras=karras)
        eta = float(get("eta", (int, float)) or 0.0)
    if not img2img and get("enable_hr", bool):
        params = replace(params, **_hires_fields(get, params.a1111))
    for name, feature in UNSUPPORTED_YET.items():  # a wrong image that looks like success is worse
        if body.get(name):
            raise BadRequestError(f"{name}: {feature} is not supported yet; leave it out (or false)")
    known_options = set(OPTIONS) | HARMLESS_OPTIONS | {CLIP_SKIP_OPTION}
    unread = set(body) - set(defaults) - {"sampler_index", "override_settings"}
    if way == "diffusers":  # A1111's own fields do nothing there
        unread |= {name for name in body if name.startswith(("subseed", "seed_resize", "s_"))}
    request = Request(
        params,
        batch_size=get("batch_size", int),
        n_iter=get("n_iter", int),
        eta=eta,
        ignored=tuple(sorted(unread | {f"override_settings.{k}" for k in set(overrides) - known_options})),
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
        check_emphasis(params.emphasis)
        check_prompt(params.prompt, params.steps)
        check_prompt(params.negative_prompt, params.steps)
        model_calls(params, SD15.schedule)
        if params.a1111:
            check_source(params.rng)
    except ValueError as error:
        raise BadRequestError(str(error)) from None
    if img2img:  # decoding last: cheap checks first
        request = replace(request, image=decode_init_image(images[0]))
    return request


# --- running them ------------------------------------------------------------------------------------------


class Service:
    """The model and the one job it runs at a time."""

    def __init__(self, pipe: Pipeline, way: str = "a1111"):
        self.pipe = pipe
        self.way = way  # a request's default: A1111's way, or diffusers'
        self.lock = threading.Lock()
        self.job = Job()

    def generate(self, request: Request) -> dict[str, Any]:
        with self.lock:
            total = model_calls(request.params, self.pipe.config.schedule) * request.n_iter
            self.job = Job(running=True, total=total, started=time.monotonic())
            try:
                return self._run(request)
            except ValueError as error:  # what the pipeline refuses (e.g. a size its VAE cannot take)
                raise BadRequestError(str(error)) from None
            finally:
                self.job.running = False

    def _run(self, request: Request) -> dict[str, Any]:
        job = self.job

        def progress(_step: object) -> None:
            if job.interrupt.is_set():
                raise JobInterruptedError(f"interrupted at step {job.step} of {job.total}")
            job.step += 1

        warnings = _WarningCollector()
        logger = logging.getLogger("sd")
        logger.addHandler(warnings)
        images, seeds = [], []
        try:
            for iteration in range(request.n_iter):
                params = _batch_params(request, iteration)
                batch = self.pipe.run(params, request.image, request.batch_size, request.eta, progress)
                images += batch
                seeds += [GenerationParams.from_text(image.info["parameters"]).seed for image in batch]
        finally:
            logger.removeHandler(warnings)
        params = request.params
        sampler_name = (
            params.sampler if params.a1111 else params.sampler + (" karras" if params.karras else "")
        )
        info = {
            "prompt": params.prompt,
            "negative_prompt": params.negative_prompt,
            "seed": params.seed,
            "all_seeds": seeds,
            "steps": params.steps,
            "cfg_scale": params.cfg_scale,
            "sampler_name": sampler_name,
            "width": images[0].width,
            "height": images[0].height,
            "denoising_strength": params.strength,
            "sd_model_name": self.pipe.model_name,
            "sd_model_hash": self.pipe.model_hash,
            "infotexts": [image.info.get("parameters", "") for image in images],
            "warnings": warnings.messages,
            "ignored_fields": list(request.ignored),
        }
        per_image = ("batch_pos", "model", "model_hash")  # in each image's own parameters
        parameters = {k: v for k, v in asdict(params).items() if k not in per_image}
        parameters |= {"batch_size": request.batch_size, "n_iter": request.n_iter, "eta": request.eta}
        return {
            "images": [_png_base64(image) for image in images],
            "parameters": parameters,
            "info": json.dumps(info),
        }

    def progress(self) -> dict[str, Any]:
        job = self.job
        fraction = job.step / job.total if job.running and job.total else 0.0
        elapsed = time.monotonic() - job.started if job.running else 0.0
        eta = elapsed / fraction - elapsed if fraction else 0.0
        return {
            "progress": fraction,
            "eta_relative": eta,
            "state": {
                "job_count": int(job.running),
                "sampling_step": job.step if job.running else 0,
                "sampling_steps": job.total if job.running else 0,
                "interrupted": job.interrupt.is_set(),
            },
            "current_image": None,
            "textinfo": None,
        }

    def interrupt(self) -> dict[str, Any]:
        if self.job.running:
            self.job.interrupt.set()
        return {}

    def samplers(self) -> list[dict[str, Any]]:
        """A1111's sampler set (its names, aliases and options), then ours (diffusers' way)."""
        a1111 = [
            {"name": label, "aliases": aliases, "options": {"scheduler": schedule} if schedule else {}}
            for label, aliases, schedule, _ in catalogue()
        ]
        ours = [
            {
                "name": name,
                "aliases": [alias for alias, target in ALIASES.items() if target == name],
                "options": {"description": description, "way": "diffusers"},
            }
            for name, description in SAMPLERS.items()
        ]
        return a1111 + ours

    def schedulers(self) -> list[dict[str, Any]]:
        """A1111's schedule types, as its /sdapi/v1/schedulers lists them."""
        kinds = [("automatic", "Automatic", None)] + [
            (k, t.label, t.default_rho) for k, t in SCHEDULE_TYPES.items()
        ]
        return [
            {"name": key, "label": label, "aliases": None, "default_rho": -1 if rho is None else rho,
             "need_inner_model": False}
            for key, label, rho in kinds
        ]  # fmt: skip

    def _title(self) -> str:
        name = self.pipe.model_name or "model"
        return f"{name} [{self.pipe.model_hash}]" if self.pipe.model_hash else name

    def models(self) -> list[dict[str, Any]]:
        name = self.pipe.model_name or "model"
        return [{"title": self._title(), "model_name": name, "hash": self.pipe.model_hash, "config": None}]

    def options(self) -> dict[str, Any]:
        """The few A1111 options clients read: the loaded model, and clip skip's default."""
        return {"sd_model_checkpoint": self._title(), CLIP_SKIP_OPTION: 1}


def _batch_params(request: Request, iteration: int) -> GenerationParams:
    """The parameters of batch `iteration` of a request."""
    params = request.params
    if not params.a1111:  # a seed per batch: seed, seed + 1, ... (one generator per batch)
        return replace(params, seed=(params.seed + iteration) % 2**32)
    return params.a1111_image(iteration * request.batch_size, wrap=2**32)  # every image of the request


class _WarningCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _png_base64(image) -> str:
    buffer = io.BytesIO()
    save_png(image, buffer, image.info.get("parameters"))
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# --- HTTP ---------------------------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    server_version = "sd"

    @property
    def service(self) -> Service:
        return self.server.service  # type: ignore[attr-defined]

    def do_GET(self) -> None:
        routes = {
            "/": self._index,
            "/sdapi/v1/progress": self.service.progress,
            "/sdapi/v1/samplers": self.service.samplers,
            "/sdapi/v1/schedulers": self.service.schedulers,
            "/sdapi/v1/sd-models": self.service.models,
            "/sdapi/v1/options": self.service.options,
        }
        self._dispatch(routes, "GET")

    def do_POST(self) -> None:
        routes = {
            "/sdapi/v1/txt2img": lambda: self.service.generate(
                parse_request(self._json(), img2img=False, way=self.service.way)
            ),
            "/sdapi/v1/img2img": lambda: self.service.generate(
                parse_request(self._json(), img2img=True, way=self.service.way)
            ),
            "/sdapi/v1/interrupt": self.service.interrupt,
            "/sdapi/v1/png-info": lambda: png_info(self._json()),
        }
        self._dispatch(routes, "POST")

    def _index(self) -> dict[str, Any]:
        return {
            "name": "sd",
            "model": self.service.pipe.model_name,
            "routes": ["GET /sdapi/v1/progress", "GET /sdapi/v1/samplers", "GET /sdapi/v1/schedulers",
                       "GET /sdapi/v1/sd-models", "GET /sdapi/v1/options",
                       "POST /sdapi/v1/txt2img", "POST /sdapi/v1/img2img", "POST /sdapi/v1/interrupt",
                       "POST /sdapi/v1/png-info"],
        }  # fmt: skip

    def _dispatch(self, routes: dict[str, Any], method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        handler = routes.get(path)
        if handler is None:
            self._send_error(HTTPStatus.NOT_FOUND, f"no route {method} {path}; GET / lists them")
            return
        try:
            self._send(HTTPStatus.OK, handler())
        except BadRequestError as error:
            self._send_error(HTTPStatus.BAD_REQUEST, str(error))
        except BodyTooLargeError as error:
            self._send_error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, str(error))
        except JobInterruptedError as error:
            self._send_error(HTTPStatus.CONFLICT, str(error))
        except Exception as error:  # a bug: say so in one line, keep serving
            logging.getLogger("sd").exception("request failed")
            self._send_error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(error).__name__}: {error}")

    def _json(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise BodyTooLargeError(f"request body over {MAX_BODY_BYTES // 2**20} MiB")
        try:
            return json.loads(self.rfile.read(length) or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BadRequestError(f"the request body is not JSON: {error}") from None

    def _send(self, status: HTTPStatus, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, status: HTTPStatus, detail: str) -> None:
        self.close_connection = True  # an unread body must not be parsed as the next request
        self.detail = detail
        self._send(status, {"error": status.phrase, "detail": detail})

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        detail = getattr(self, "detail", None)
        self.log_message('"%s" %s%s', self.requestline, code, f": {detail}" if detail else "")

    def log_message(self, format: str, *args: Any) -> None:
        print(f"{self.address_string()} {format % args}", file=sys.stderr)


class BodyTooLargeError(Exception):
    pass


def make_server(
    service: Service | None = None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT
) -> ThreadingHTTPServer:
    """A server bound to host:port (port 0: any free one); give it its `service` (here or as the
    attribute, before serving), then call serve_forever(). Binding first lets a taken port fail fast,
    before a model is loaded."""
    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as error:
        raise OSError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    server.daemon_threads = True
    server.service = service  # type: ignore[attr-defined]
    return server
