"""Generation parameters and their A1111-style text form (the PNG `parameters` chunk).

    a red fox in the snow
    Negative prompt: blurry
    Steps: 20, Sampler: euler_a, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 512x512, ...

Our sampler names are written as they are; A1111's display names are understood when reading.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from .hires import hires_sampler_text, hires_schedule_text, infer_hr_scheduler
from .infotext import backcompat, format_infotext, parse_infotext, parse_version
from .inpaint import INFOTEXT_KEYS as INPAINT_KEYS
from .inpaint import InpaintSettings
from .samplers.a1111 import exact_label as a1111_label
from .samplers.a1111 import split_schedule, writes_ensd
from .samplers.sigmas import SCHEDULE_TYPES

A1111_SAMPLER_NAMES = {
    "euler a": "euler_a",
    "euler": "euler",
    "lms": "lms",
    "heun": "heun",
    "dpm2": "dpm2",
    "dpm++ 2m": "dpmpp_2m",
    "dpm++ 2m sde": "dpmpp_2m_sde",
    "ddim": "ddim",
    "plms": "plms",
    "pndm": "pndm",
    "unipc": "unipc",
    "lcm": "lcm",
    "ddpm": "ddpm",
}


def a1111_sampler(name: str) -> tuple[str, str | None]:
    """(A1111 label, schedule type label or None) for a sampler named A1111's way ("DPM++ 2M", "dpm++ 2m
    karras", "k_euler_a") or ours ("dpmpp_2m" -> "DPM++ 2M"); ValueError for an unknown one."""
    exact = a1111_label(name)
    if exact is None:
        ours_to_a1111 = {ours: label for label, ours in A1111_SAMPLER_NAMES.items()}
        exact = split_schedule(ours_to_a1111.get(name, name))
    label, schedule = exact
    return label, SCHEDULE_TYPES[schedule].label if schedule else None


@dataclass(frozen=True)
class GenerationParams:
    prompt: str
    negative_prompt: str = ""
    steps: int = 50
    sampler: str = "pndm"
    karras: bool = False
    cfg_scale: float = 7.5
    seed: int = 0
    width: int = 512
    height: int = 512
    strength: float | None = None  # img2img only
    clip_skip: int = 1
    model_hash: str | None = None
    model: str | None = None
    vae_hash: str | None = None  # of a swapped-in VAE file (A1111: sha256[:10])
    vae: str | None = None  # its file name; a replay looks it up in the VAE folder
    # Images of a batch share one seed (one generator, as diffusers' num_images_per_prompt): an image is
    # reproduced by re-running its batch and keeping its position.
    batch_size: int = 1
    batch_pos: int = 0
    emphasis: str = "Original"  # sd.conditioning.EMPHASIS_MODES
    # Pad the shorter of prompt / negative with the empty prompt's chunks (A1111 "Pad conds"; a PNG says so
    # only when that padded anything).
    pad_conds: bool = False
    lora_hashes: str | None = None  # "name: hash, ..." of the LoRA files used (written, names the files)
    ti_hashes: str | None = None  # "name: hash, ..." of the embeddings used (written, not needed to replay)
    # A1111's way (its samplers, noise, CFG and pixels: sd.samplers.a1111, sd.noise), else diffusers'.
    a1111: bool = False
    schedule: str = "Automatic"  # A1111 "Schedule type"
    rng: str = "GPU"  # A1111 "RNG": GPU (CUDA's Philox, computed here), CPU or NV
    ensd: int = 0  # eta noise seed delta
    subseed: int | None = None  # variation seed
    subseed_strength: float = 0.0
    seed_resize_from: tuple[int, int] | None = None  # (width, height)
    eta: float | None = None  # ancestral / SDE eta; None: A1111's default, 1.0
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = 0.0
    s_noise: float = 1.0
    eta_ddim: float | None = None  # DDIM's eta; None: A1111's eta_ddim default, 0
    # The schedule's range and rho (A1111's sigma_min / sigma_max / rho settings); None: the schedule's own.
    sigma_min: float | None = None
    sigma_max: float | None = None
    rho: float | None = None
    discard_penultimate: bool = False  # A1111's always_discard_next_to_last_sigma
    downcast_alphas: bool = False  # alphas_cumprod in fp16, as A1111 before v1.7.0-225
    old_prompt_editing: bool = False  # prompt-editing steps as A1111 before v1.6 counted them
    noise_multiplier: float = 1.0  # img2img: A1111's initial_noise_multiplier
    sgm_noise: bool = False  # txt2img noise scaled by sqrt(1 + sigma_max^2) (A1111's sgm_noise_multiplier)
    # A1111's skips of the negative pass (sd.guidance.UncondSkip): skip_early_cond ("Skip Early CFG"), the
    # fraction of the run from its start; s_min_uncond ("NGMS"), every other call below that sigma;
    # s_min_uncond_all ("NGMS all steps"), every call below it. 0: off.
    skip_early_cond: float = 0.0
    s_min_uncond: float = 0.0
    s_min_uncond_all: bool = False
    tiling: bool = False  # A1111's "Tiling": circular padding, an image that tiles (sd.seamless)
    # "ControlNet i" values, as A1111's ControlNet extension writes them (sd.controlnet.unit_infotext)
    controlnet: tuple[str, ...] = ()
    # Inpainting's mask controls (sd.inpaint); None: no mask. The mask itself is in no PNG.
    inpaint: InpaintSettings | None = None
    nine_channel: bool = False  # made with an inpainting U-Net (A1111 writes its conditional mask weight)
    # Hires fix (sd.hires), A1111's API names; its denoising strength is `strength`.
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str | None = None  # None: "Latent" (not written)
    hr_second_pass_steps: int = 0  # 0: as the first pass
    hr_resize_x: int = 0  # a target size instead of the scale; 0: from the other side's aspect
    hr_resize_y: int = 0
    hr_sampler_name: str | None = None  # None: the first pass's
    hr_scheduler: str | None = None  # None: the first pass's schedule type
    hr_prompt: str = ""  # "": the first pass's
    hr_negative_prompt: str = ""

    # Settings keys of an infotext that were read but cannot change what we make (written by A1111 for
    # other features), named once when an image is replayed.
    unhonoured: tuple[str, ...] = ()

    def a1111_image(self, index: int, wrap: int | None = None) -> GenerationParams:
        """The parameters A1111 gives image `index` of a run: seed + index (with a variation seed, every
        image keeps the seed and takes subseed + index); modulo `wrap` when given (A1111 does not wrap)."""
        if self.subseed_strength:
            subseed = (self.subseed or 0) + index
            return replace(self, subseed=subseed % wrap if wrap else subseed)
        return replace(self, seed=(self.seed + index) % wrap if wrap else self.seed + index)

    def to_text(self) -> str:
        """The infotext, keys in A1111's order (sd.infotext); A1111 reads ours back to the same settings."""
        a1111 = self.a1111
        schedule = self.schedule if a1111 else ("Karras" if self.karras else None)
        variation = a1111 and bool(self.subseed_strength)
        resize = "{}x{}".format(*self.seed_resize_from) if a1111 and self.seed_resize_from else None
        emphasised = any(c in self.prompt + self.negative_prompt for c in "([")
        settings: list[tuple[str, object]] = [
            ("Steps", self.steps),
            ("Sampler", self.sampler),
            ("Schedule type", schedule),
            ("CFG scale", f"{self.cfg_scale:g}"),
            ("Seed", self.seed),
            ("Size", f"{self.width}x{self.height}"),
            ("Model hash", self.model_hash),
            ("Model", self.model),
            ("VAE hash", self.vae_hash),
            ("VAE", self.vae),
            ("Variation seed", self.subseed if variation else None),
            ("Variation seed strength", f"{self.subseed_strength:g}" if variation else None),
            ("Seed resize from", resize),
            ("Denoising strength", _number(self.strength)),
            ("Clip skip", self.clip_skip if self.clip_skip != 1 else None),
            ("ENSD", self.ensd if a1111 and self.ensd and writes_ensd(self.sampler, self.eta) else None),
            ("RNG", self.rng if a1111 and self.rng != "GPU" else None),
            ("Tiling", "True" if self.tiling else None),
            *(self.inpaint.infotext(self.nine_channel) if self.inpaint is not None else []),
            # then, as A1111's extra_generation_params, in the order it adds them
            ("Batch size", self.batch_size if self.batch_size > 1 else None),
            ("Batch pos", self.batch_pos if self.batch_size > 1 else None),
            *(_hires_settings(self) if self.enable_hr else ()),
            *((f"ControlNet {i}", text) for i, text in enumerate(self.controlnet)),
            ("Lora hashes", self.lora_hashes),
            ("TI hashes", self.ti_hashes),
            # A1111 names a non-default emphasis only where it can matter: a prompt with brackets.
            ("Emphasis", self.emphasis if self.emphasis != "Original" and emphasised else None),
        ]
        if a1111:
            settings += [
                ("Schedule min sigma", _number(self.sigma_min)),
                ("Schedule max sigma", _number(self.sigma_max)),
                ("Schedule rho", _number(self.rho)),
                ("Discard penultimate sigma", "True" if self.discard_penultimate else None),
                ("SGM noise multiplier", "True" if self.sgm_noise else None),
                ("Eta DDIM", _number(self.eta_ddim) if self.eta_ddim else None),
                ("Eta", _number(self.eta) if self.eta is not None and self.eta != 1 else None),
                ("Sigma churn", _number(self.s_churn) if self.s_churn else None),
                ("Sigma tmin", _number(self.s_tmin) if self.s_tmin else None),
                ("Sigma tmax", _number(self.s_tmax) if self.s_tmax else None),
                ("Sigma noise", _number(self.s_noise) if self.s_noise != 1 else None),
                ("Noise multiplier", _number(self.noise_multiplier) if self.noise_multiplier != 1 else None),
                ("Downcast alphas_cumprod", "True" if self.downcast_alphas else None),
                ("Old prompt editing timelines", "True" if self.old_prompt_editing else None),
                # added as the sampling first skips (A1111 writes each only where it took effect)
                ("Skip Early CFG", _number(self.skip_early_cond) if self.skip_early_cond else None),
                ("NGMS", _number(self.s_min_uncond) if self.s_min_uncond else None),
                ("NGMS all steps", "True" if self.s_min_uncond and self.s_min_uncond_all else None),
            ]
        settings.append(("Pad conds", "True" if self.pad_conds else None))
        if not a1111:
            settings.append(("Sampling", "diffusers"))  # our own way; A1111's needs no key
        return format_infotext(self.prompt, self.negative_prompt, settings)

    @classmethod
    def from_text(cls, text: str) -> GenerationParams:
        """Parse an infotext (A1111's, or ours); ValueError (one line) when it holds no settings.

        An A1111 sampler name (exactly as A1111 writes it: "DPM++ 2M", "Euler a", "DPM++ 2M Karras" before
        v1.9) means A1111's way, with A1111's back-compatibility for the PNG's `Version`; our own names
        ("dpmpp_2m") or "Sampling: diffusers" mean diffusers'."""
        prompt, negative, settings = parse_infotext(text)
        if not settings:
            raise ValueError("not generation parameters: no 'Steps: 20, Sampler: ..., ...' settings line")
        params = cls(prompt=prompt, negative_prompt=negative)
        try:
            sampler = settings.get("Sampler", params.sampler)
            schedule = settings.get("Schedule type")
            a1111 = None if settings.get("Sampling") == "diffusers" else a1111_label(sampler)
            if a1111 is not None:
                settings = backcompat(settings, prompt)
                label, from_name = a1111
                version = parse_version(settings.get("Version"))
                if from_name is not None:  # "DPM++ 2M Karras": before v1.9 the name carried the schedule
                    schedule = SCHEDULE_TYPES[from_name].label
                elif schedule is None and ("Version" not in settings or (version and version < (1, 9, 0, 0))):
                    schedule = "Uniform"  # before v1.9 a plain name meant the model's own schedule
                extra = _a1111_settings(settings)
                karras, sampler = False, label
            else:
                karras = (schedule or "").lower() == "karras"
                if sampler.lower().endswith(" karras"):  # older A1111 files fold the schedule into the name
                    sampler, karras = sampler[: -len(" karras")], True
                sampler = A1111_SAMPLER_NAMES.get(sampler.lower(), sampler)
                extra = {}
            width, height = _size(settings.get("Size", "512x512"))
            strength = settings.get("Denoising strength")
            hires = _read_hires(settings, sampler, schedule or "Automatic", a1111 is not None)
            width, height = hires.pop("width", width), hires.pop("height", height)
            return replace(
                params,
                steps=int(settings.get("Steps", params.steps)),
                sampler=sampler,
                karras=karras,
                cfg_scale=float(settings.get("CFG scale", params.cfg_scale)),
                seed=int(settings.get("Seed", params.seed)),
                width=width,
                height=height,
                strength=float(strength) if strength is not None else None,
                clip_skip=int(settings.get("Clip skip", 1)),
                model_hash=settings.get("Model hash"),
                model=settings.get("Model"),
                vae_hash=settings.get("VAE hash"),
                vae=settings.get("VAE"),
                batch_size=int(settings.get("Batch size", 1)),
                batch_pos=int(settings.get("Batch pos", 0)),
                emphasis=settings.get("Emphasis", "Original"),
                pad_conds=_true(settings.get("Pad conds")),
                tiling=_true(settings.get("Tiling")),
                lora_hashes=settings.get("Lora hashes"),
                ti_hashes=settings.get("TI hashes"),
                a1111=a1111 is not None,
                schedule=schedule or "Automatic",
                inpaint=InpaintSettings.from_infotext(settings),
                unhonoured=tuple(
                    k
                    for k in settings
                    if k not in _HONOURED and k not in _NO_EFFECT and k not in INPAINT_KEYS
                ),
                **extra,
                **hires,
            )
        except (ValueError, TypeError) as error:
            raise ValueError(f"bad generation parameters: {error}") from None


# Keys read into GenerationParams, and keys that describe an image without changing how it is made.
_HONOURED = frozenset({
    "Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Denoising strength", "Clip skip",
    "Batch size", "Batch pos", "Emphasis", "Pad conds", "Sampling", "RNG", "ENSD", "Variation seed",
    "Variation seed strength", "Seed resize from", "Eta", "Eta DDIM", "Sigma churn", "Sigma tmin",
    "Sigma tmax", "Sigma noise", "Schedule min sigma", "Schedule max sigma", "Schedule rho",
    "Discard penultimate sigma", "Downcast alphas_cumprod", "Old prompt editing timelines",
    "Noise multiplier", "SGM noise multiplier", "Lora hashes", "VAE", "Hires upscale", "Hires resize",
    "Hires steps", "Hires upscaler", "Hires sampler", "Hires schedule type", "Hires prompt",
    "Hires negative prompt", "First pass size", "Skip Early CFG", "NGMS", "NGMS all steps", "Tiling",
})  # fmt: skip
# (Lora hashes are read to name the files; the prompt's <lora:...> tags are what applies them. VAE names
# the file a replay swaps in, as A1111's sd_vae override.)
_NO_EFFECT = frozenset({"Model hash", "Model", "Version", "TI hashes", "User", "VAE hash", "Init image hash"})
_NUMBERS = {
    "Eta": "eta", "Eta DDIM": "eta_ddim", "Sigma churn": "s_churn", "Sigma tmin": "s_tmin",
    "Sigma tmax": "s_tmax", "Sigma noise": "s_noise", "Noise multiplier": "noise_multiplier",
    "Skip Early CFG": "skip_early_cond", "NGMS": "s_min_uncond",
}  # fmt: skip
# 0 means "the schedule's own" in A1111's settings
_SCHEDULE_RANGE = {
    "Schedule min sigma": "sigma_min",
    "Schedule max sigma": "sigma_max",
    "Schedule rho": "rho",
}
_FLAGS = {
    "Discard penultimate sigma": "discard_penultimate", "Downcast alphas_cumprod": "downcast_alphas",
    "Old prompt editing timelines": "old_prompt_editing", "SGM noise multiplier": "sgm_noise",
    "NGMS all steps": "s_min_uncond_all",
}  # fmt: skip


def _true(value: str | None) -> bool:
    return (value or "False").strip().lower() == "true"


def _number(value: float | None) -> str | None:
    return None if value is None else f"{value:g}"


def _size(text: str) -> tuple[int, int]:
    """(width, height) from "512x768"."""
    match = re.fullmatch(r"\s*(-?\d+)x(-?\d+)\s*", text)
    if match is None:
        raise ValueError(f"size {text!r} is not WIDTHxHEIGHT")
    return int(match.group(1)), int(match.group(2))


def _a1111_settings(settings: dict[str, str]) -> dict:
    out: dict = {"rng": settings.get("RNG", "GPU").upper(), "ensd": int(settings.get("ENSD", 0))}
    if "Variation seed" in settings:
        out["subseed"] = int(settings["Variation seed"])
        out["subseed_strength"] = float(settings.get("Variation seed strength", 0))
    if "Seed resize from" in settings:
        width, height = _size(settings["Seed resize from"])
        out["seed_resize_from"] = (width, height) if width > 0 and height > 0 else None
    out.update({name: float(settings[key]) for key, name in _NUMBERS.items() if key in settings})
    out.update(
        {name: float(settings[key]) for key, name in _SCHEDULE_RANGE.items() if float(settings.get(key, 0))}
    )
    out.update({name: _true(settings.get(key)) for key, name in _FLAGS.items()})
    return out


def _hires_settings(params: GenerationParams) -> list[tuple[str, object]]:
    """The hires keys, where and as A1111 writes them (init, calculate_target_resolution): the prompts
    only when they differ, "Hires resize" instead of the scale when a size was asked, the steps unless 0,
    the upscaler when one was named."""
    resize = params.hr_resize_x or params.hr_resize_y
    prompt, negative = params.hr_prompt, params.hr_negative_prompt
    return [
        ("Hires sampler", hires_sampler_text(params)),
        ("Hires prompt", prompt if prompt and prompt != params.prompt else None),
        ("Hires negative prompt", negative if negative and negative != params.negative_prompt else None),
        ("Hires schedule type", hires_schedule_text(params) if params.a1111 else None),
        ("Hires upscale", None if resize else _number(params.hr_scale)),
        ("Hires resize", f"{params.hr_resize_x}x{params.hr_resize_y}" if resize else None),
        ("Hires steps", params.hr_second_pass_steps or None),
        ("Hires upscaler", params.hr_upscaler),
    ]


def _read_hires(settings: dict[str, str], sampler: str, schedule: str, a1111: bool) -> dict:
    """The hires fields of an infotext, as A1111's paste reads them: on when "Denoising strength" and any of
    "Hires upscale", "Hires upscaler", "Hires resize" are there; an old "First pass size" turned into a
    resize from it (restore_old_hires_fix_params); the hires schedule as A1111 replays it (see
    sd.hires.infer_hr_scheduler)."""
    out: dict = {}
    if "First pass size" in settings:  # before v1.0 the Size was the final one, and this the first pass's
        first_w, first_h = _size(settings["First pass size"])
        width, height = _size(settings.get("Size", "512x512"))
        if first_w and first_h:
            out.update(width=first_w, height=first_h)
        else:
            out.update(dict(zip(("width", "height"), _old_first_pass(width, height), strict=True)))
        settings = {**settings, "Hires resize": f"{width}x{height}"}
    hires_keys = ("Hires upscale", "Hires upscaler", "Hires resize")
    if "Denoising strength" not in settings or not any(key in settings for key in hires_keys):
        return out
    resize_x, resize_y = _size(settings.get("Hires resize", "0x0"))
    hr_sampler = settings.get("Hires sampler")
    hr_scheduler = settings.get("Hires schedule type")
    if a1111 and hr_sampler is not None:
        found = a1111_label(hr_sampler)
        if found is not None:
            hr_sampler, from_name = found
            version = parse_version(settings.get("Version"))
            if from_name is not None and hr_scheduler is None:  # "DPM++ 2M Karras": before v1.9
                hr_scheduler = SCHEDULE_TYPES[from_name].label
            elif hr_scheduler is None and version and version < (1, 9, 0, 0):
                hr_scheduler = "Uniform"  # a plain name meant the model's own schedule then
    if a1111 and hr_scheduler is None:
        hr_scheduler = infer_hr_scheduler(sampler, schedule, hr_sampler)
    if hr_sampler == sampler:
        hr_sampler = None
    out.update(
        enable_hr=True,
        hr_scale=float(settings.get("Hires upscale", 2.0)),
        hr_upscaler=settings.get("Hires upscaler"),
        hr_second_pass_steps=int(settings.get("Hires steps", 0)),
        hr_resize_x=resize_x,
        hr_resize_y=resize_y,
        hr_sampler_name=hr_sampler,
        hr_scheduler=hr_scheduler,
        hr_prompt=settings.get("Hires prompt", ""),
        hr_negative_prompt=settings.get("Hires negative prompt", ""),
    )
    return out


def _old_first_pass(width: int, height: int) -> tuple[int, int]:
    """A1111's old_hires_fix_first_pass_dimensions: about 512x512 pixels, sides rounded up to 64."""
    scale = math.sqrt(512 * 512 / (width * height))
    return math.ceil(scale * width / 64) * 64, math.ceil(scale * height / 64) * 64
