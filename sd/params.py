"""Generation parameters and their A1111-style text form (the PNG `parameters` chunk).

    a red fox in the snow
    Negative prompt: blurry
    Steps: 20, Sampler: euler_a, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 512x512, ...

Our sampler names are written as they are; A1111's display names are understood when reading.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

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

    def to_text(self) -> str:
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        items = [("Steps", self.steps), ("Sampler", self.sampler)]
        if self.karras:
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
        if self.strength is not None:
            items.append(("Denoising strength", f"{self.strength:g}"))
        if self.clip_skip != 1:
            items.append(("Clip skip", self.clip_skip))
        if self.batch_size > 1:
            items += [("Batch size", self.batch_size), ("Batch pos", self.batch_pos)]
        if self.ti_hashes:
            items.append(("TI hashes", self.ti_hashes))
        # A1111 names a non-default emphasis only where it can matter: a prompt with brackets.
        if self.emphasis != "Original" and any(c in self.prompt + self.negative_prompt for c in "(["):
            items.append(("Emphasis", self.emphasis))
        if self.pad_conds:
            items.append(("Pad conds", "True"))
        lines.append(", ".join(f"{key}: {_quote(str(value))}" for key, value in items))
        return "\n".join(lines)

    @classmethod
    def from_text(cls, text: str) -> GenerationParams:
        """Parse the text form; ValueError (one line) when it is not generation parameters."""
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
            karras = settings.get("Schedule type", "").lower() == "karras"
            if sampler.lower().endswith(" karras"):  # older A1111 files fold the schedule into the name
                sampler, karras = sampler[: -len(" karras")], True
            width, height = (int(v) for v in settings.get("Size", "512x512").split("x"))
            strength = settings.get("Denoising strength")
            return replace(
                params,
                steps=int(settings.get("Steps", params.steps)),
                sampler=A1111_SAMPLER_NAMES.get(sampler.lower(), sampler),
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
            )
        except ValueError as error:
            raise ValueError(f"bad generation parameters: {error}") from None


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
