"""Generation parameters and their A1111-style text form (the PNG `parameters` chunk).

    a red fox in the snow
    Negative prompt: blurry
    Steps: 20, Sampler: euler_a, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 512x512, ...

Our sampler names are written as they are; A1111's display names are understood when reading.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from .samplers.a1111 import exact_label as a1111_label
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
    # Images of a batch share one seed (one generator, as diffusers' num_images_per_prompt): an image is
    # reproduced by re-running its batch and keeping its position.
    batch_size: int = 1
    batch_pos: int = 0
    emphasis: str = "Original"  # sd.conditioning.EMPHASIS_MODES
    # Pad the shorter of prompt / negative with the empty prompt's chunks (A1111 "Pad conds"; a PNG says so
    # only when that padded anything).
    pad_conds: bool = False
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

    # Settings keys of an infotext that were read but cannot change what we make (written by A1111 for
    # other features), named once when an image is replayed.
    unhonoured: tuple[str, ...] = ()

    def to_text(self) -> str:
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        items: list[tuple[str, object]] = [("Steps", self.steps), ("Sampler", self.sampler)]
        if self.a1111:
            items.append(("Schedule type", self.schedule))
        elif self.karras:
            items.append(("Schedule type", "Karras"))
        items += [
            ("CFG scale", f"{self.cfg_scale:g}"),
            ("Seed", self.seed),
            ("Size", f"{self.width}x{self.height}"),
        ]
        if self.model_hash:
            items.append(("Model hash", self.model_hash))
        if self.model:
            items.append(("Model", self.model))
        if self.a1111 and self.subseed_strength:
            items += [
                ("Variation seed", self.subseed),
                ("Variation seed strength", f"{self.subseed_strength:g}"),
            ]
        if self.a1111 and self.seed_resize_from:
            items.append(("Seed resize from", "{}x{}".format(*self.seed_resize_from)))
        if self.strength is not None:
            items.append(("Denoising strength", f"{self.strength:g}"))
        if self.clip_skip != 1:
            items.append(("Clip skip", self.clip_skip))
        if self.a1111 and self.ensd:
            items.append(("ENSD", self.ensd))
        if self.a1111 and self.rng != "GPU":
            items.append(("RNG", self.rng))
        if self.batch_size > 1:
            items += [("Batch size", self.batch_size), ("Batch pos", self.batch_pos)]
        if self.ti_hashes:
            items.append(("TI hashes", self.ti_hashes))
        # A1111 names a non-default emphasis only where it can matter: a prompt with brackets.
        if self.emphasis != "Original" and any(c in self.prompt + self.negative_prompt for c in "(["):
            items.append(("Emphasis", self.emphasis))
        if self.a1111:
            defaults = {
                "Eta": None,
                "Sigma churn": 0.0,
                "Sigma tmin": 0.0,
                "Sigma tmax": 0.0,
                "Sigma noise": 1.0,
            }
            values = {"Eta": self.eta, "Sigma churn": self.s_churn, "Sigma tmin": self.s_tmin,
                      "Sigma tmax": self.s_tmax, "Sigma noise": self.s_noise}  # fmt: skip
            items += [(k, f"{v:g}") for k, v in values.items() if v != defaults[k] and v is not None]
        if self.pad_conds:
            items.append(("Pad conds", "True"))
        if not self.a1111:
            items.append(("Sampling", "diffusers"))  # our own way; A1111's needs no key
        lines.append(", ".join(f"{key}: {_quote(str(value))}" for key, value in items))
        return "\n".join(lines)

    @classmethod
    def from_text(cls, text: str) -> GenerationParams:
        """Parse the text form; ValueError (one line) when it is not generation parameters.

        An A1111 sampler name (exactly as A1111 writes it: "DPM++ 2M", "Euler a", "DPM++ 2M Karras" before
        v1.9) means A1111's way; our own names ("dpmpp_2m") or "Sampling: diffusers" mean diffusers'."""
        lines = text.strip().split("\n")
        settings_line = lines.pop() if lines and re.match(r"\s*Steps: ", lines[-1]) else None
        if settings_line is None:
            raise ValueError("not generation parameters: no 'Steps: ...' line")
        negative_at = next((i for i, line in enumerate(lines) if line.startswith("Negative prompt:")), None)
        if negative_at is None:
            prompt, negative = "\n".join(lines), ""
        else:
            prompt = "\n".join(lines[:negative_at])
            negative = "\n".join(lines[negative_at:]).removeprefix("Negative prompt:").strip()
        settings = _parse_settings(settings_line)
        params = cls(prompt=prompt, negative_prompt=negative)
        try:
            sampler = settings.get("Sampler", params.sampler)
            schedule = settings.get("Schedule type")
            a1111 = None if settings.get("Sampling") == "diffusers" else a1111_label(sampler)
            if a1111 is not None:
                label, from_name = a1111
                version = settings.get("Version")
                if from_name is not None:  # "DPM++ 2M Karras": before v1.9 the name carried the schedule
                    schedule = SCHEDULE_TYPES[from_name].label
                elif schedule is None and (version is None or _version(version) < (1, 9)):
                    schedule = "Uniform"  # before v1.9 a plain name meant the model's own schedule
                extra = _a1111_settings(settings)
                karras, sampler = False, label
            else:
                karras = (schedule or "").lower() == "karras"
                if sampler.lower().endswith(" karras"):  # older A1111 files fold the schedule into the name
                    sampler, karras = sampler[: -len(" karras")], True
                sampler = A1111_SAMPLER_NAMES.get(sampler.lower(), sampler)
                extra = {}
            width, height = (int(v) for v in settings.get("Size", "512x512").split("x"))
            strength = settings.get("Denoising strength")
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
                batch_size=int(settings.get("Batch size", 1)),
                batch_pos=int(settings.get("Batch pos", 0)),
                emphasis=settings.get("Emphasis", "Original"),
                pad_conds=settings.get("Pad conds", "False").lower() == "true",
                ti_hashes=settings.get("TI hashes"),
                a1111=a1111 is not None,
                schedule=schedule or "Automatic",
                unhonoured=tuple(k for k in settings if k not in _HONOURED and k not in _NO_EFFECT),
                **extra,
            )
        except ValueError as error:
            raise ValueError(f"bad generation parameters: {error}") from None


# Keys read into GenerationParams, and keys that describe an image without changing how it is made.
_HONOURED = frozenset({
    "Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Denoising strength", "Clip skip",
    "Batch size", "Batch pos", "Emphasis", "Pad conds", "Sampling", "RNG", "ENSD", "Variation seed",
    "Variation seed strength", "Seed resize from", "Eta", "Sigma churn", "Sigma tmin", "Sigma tmax",
    "Sigma noise",
})  # fmt: skip
# (Lora hashes name the files; the prompt's <lora:...> tags are what applies them.)
_NO_EFFECT = frozenset({"Model hash", "Model", "Version", "TI hashes", "Lora hashes", "User", "VAE hash"})


def _version(text: str) -> tuple[int, ...]:
    """(1, 10, 1) from "v1.10.1" or "v1.10.1-3-gabc1234"; (0,) when unreadable."""
    match = re.match(r"v?(\d+(?:\.\d+)*)", text.strip())
    return tuple(int(p) for p in match.group(1).split(".")) if match else (0,)


def _a1111_settings(settings: dict[str, str]) -> dict:
    out: dict = {"rng": settings.get("RNG", "GPU").upper(), "ensd": int(settings.get("ENSD", 0))}
    if "Variation seed" in settings:
        out["subseed"] = int(settings["Variation seed"])
        out["subseed_strength"] = float(settings.get("Variation seed strength", 0))
    if "Seed resize from" in settings:
        width, height = (int(v) for v in settings["Seed resize from"].split("x"))
        out["seed_resize_from"] = (width, height) if width > 0 and height > 0 else None
    for key, field_name in (("Eta", "eta"), ("Sigma churn", "s_churn"), ("Sigma tmin", "s_tmin"),
                            ("Sigma tmax", "s_tmax"), ("Sigma noise", "s_noise")):  # fmt: skip
        if key in settings:
            out[field_name] = float(settings[key])
    return out


def _quote(value: str) -> str:
    return '"' + value.replace('"', '\\"') + '"' if ("," in value or ":" in value) else value


def _parse_settings(line: str) -> dict[str, str]:
    """'Key: value, Key: "quoted, value", ...' -> dict."""
    pattern = re.compile(r'\s*([\w .+-]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
    settings = {}
    for match in pattern.finditer(line):
        key, value = match.group(1).strip(), match.group(2).strip()
        if value.startswith('"') and value.endswith('"'):
            value = value[1:-1].replace('\\"', '"')
        settings[key] = value
    return settings
