"""A1111's infotext, the `parameters` text of its PNGs (v1.10.1 processing.create_infotext and
infotext_utils.parse_generation_parameters), read and written as A1111 does:

    a photo of a cat, (masterpiece:1.2)
    Negative prompt: lowres
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Lora hashes: "a: 0123, b: 4567"

The text is only the container here: what the keys mean is `sd.params.GenerationParams`'s business.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping

# A1111's re_param: a key, then a JSON-quoted value or anything up to the next comma.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_NEGATIVE = "Negative prompt:"


def quote(value: object) -> str:
    """A value as A1111 writes it: str(value), JSON-quoted when it holds ',', ':' or a newline."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            return json.loads(value)
        except json.JSONDecodeError:  # A1111 keeps such a value as it is
            return value
    return value


def format_infotext(prompt: str, negative_prompt: str, settings: Iterable[tuple[str, object]]) -> str:
    """The whole text: prompt, "Negative prompt: ..." (left out when empty), then "Key: value, ..." with
    None values left out and a key whose value is itself written alone."""
    line = ", ".join(
        key if key == value else f"{key}: {quote(value)}" for key, value in settings if value is not None
    )
    negative = f"\n{_NEGATIVE} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, settings) as A1111 parses them: the last line holds the settings when it
    has at least three `Key: value` pairs (else it is more prompt); quoted values are JSON-decoded. Sizes
    ("512x768") stay whole: the caller splits them."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt = negative = ""
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(_NEGATIVE):  # (a later such line loses its prefix too, as in A1111)
            in_negative, line = True, line[len(_NEGATIVE) :].strip()
        # A1111 joins with a newline only onto non-empty text; kept, so odd texts parse as there
        if in_negative:
            negative += ("\n" if negative else "") + line
        else:
            prompt += ("\n" if prompt else "") + line
    settings = {key.strip(): _unquote(value.strip()) for key, value in _PARAM.findall(last)}
    return prompt, negative, settings


def parse_version(text: str | None) -> tuple[int, int, int, int] | None:
    """(major, minor, patch, commits since the tag; -1 for a release candidate) of an A1111 `Version`
    ("v1.10.1", "v1.7.0-225-gabc1234", "v1.7.0-RC-5-g..."); None when it is not an A1111 version (a fork's,
    e.g. Forge's "f2.0.1v1.10.1-previous-..."), in which case A1111 applies no back-compatibility."""
    match = re.fullmatch(r"v(\d+)\.(\d+)(?:\.(\d+))?(?:-(\w+))?(?:-.*)?", (text or "").strip())
    if match is None:
        return None
    major, minor, patch, suffix = match.groups()
    if suffix is None or not suffix.isdigit():
        commits = -1 if suffix is not None and suffix.lower().startswith("rc") else 0
    else:
        commits = int(suffix)
    return int(major), int(minor), int(patch or 0), commits


def backcompat(settings: Mapping[str, str], prompt: str) -> dict[str, str]:
    """The settings A1111 turns on for an old `Version` (infotext_versions.backcompat), added to `settings`
    where they are not already given."""
    out = dict(settings)
    version = parse_version(settings.get("Version"))
    if version is None:
        return out
    if version < (1, 6, 0, 0):
        if "[" in prompt or "[" in settings.get("Hires prompt", ""):
            out.setdefault("Old prompt editing timelines", "True")
        if settings.get("Sampler") in ("DDIM", "PLMS"):
            out.setdefault("Pad conds v0", "True")
    if version < (1, 7, 0, 225):
        out.setdefault("Downcast alphas_cumprod", "True")
    return out


# NovelAI's sampler names, as A1111 maps them (sd_samplers.samplers_map by alias)
_NOVELAI_SAMPLERS = {
    "k_euler_ancestral": "Euler a",
    "k_euler": "Euler",
    "k_lms": "LMS",
    "k_heun": "Heun",
    "k_dpm_2": "DPM2",
    "k_dpm_2_ancestral": "DPM2 a",
    "k_dpmpp_2s_ancestral": "DPM++ 2S a",
    "k_dpmpp_2m": "DPM++ 2M",
    "k_dpmpp_sde": "DPM++ SDE",
    "k_dpm_fast": "DPM fast",
    "k_dpm_adaptive": "DPM adaptive",
    "ddim": "DDIM",
    "plms": "PLMS",
}


def from_novelai(text_chunks: Mapping[str, str], width: int, height: int) -> str | None:
    """A1111's infotext for a NovelAI PNG (Software "NovelAI": prompt in Description, settings as JSON in
    Comment), as A1111 converts it: CLIP skip 2 and ENSD 31337, NovelAI's own settings. None otherwise."""
    if text_chunks.get("Software") != "NovelAI":
        return None
    try:
        info = json.loads(text_chunks.get("Comment", ""))
        sampler = _NOVELAI_SAMPLERS.get(str(info.get("sampler", "")).lower(), "Euler a")
        settings = [
            ("Steps", info["steps"]), ("Sampler", sampler), ("CFG scale", info["scale"]),
            ("Seed", info["seed"]), ("Size", f"{width}x{height}"), ("Clip skip", 2), ("ENSD", 31337),
        ]  # fmt: skip
    except (json.JSONDecodeError, KeyError, AttributeError) as error:
        raise ValueError(f"NovelAI PNG with unreadable settings (Comment): {error}") from None
    # A1111 writes the negative line even when it is empty, and does not quote these values.
    line = ", ".join(f"{key}: {value}" for key, value in settings)
    return f"{text_chunks.get('Description', '')}\n{_NEGATIVE} {info.get('uc', '')}\n{line}"


__all__ = ["backcompat", "format_infotext", "from_novelai", "parse_infotext", "parse_version", "quote"]
