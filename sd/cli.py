"""The `sd` command line.

Every expected failure (bad file, bad argument, bad image) ends in one line on stderr and a non-zero
exit; tracebacks are for bugs only. Generation validates everything cheap before loading a model, and
never overwrites an existing image.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

EXIT_USAGE = 2
EMPHASIS_CHOICES = ("Original", "No norm", "Ignore", "None")  # sd.conditioning.EMPHASIS_MODES
DEFAULT_OUTPUT_DIR = Path("outputs")


# --- sd info ------------------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    from .weights import describe, format_description

    info = describe(args.path)
    print(format_description(info))
    return 0 if info.usable else 1


# --- sd samplers ---------------------------------------------------------------------------------------


def cmd_samplers(args: argparse.Namespace) -> int:
    from .samplers import ALIASES, KARRAS_SAMPLERS, SAMPLERS
    from .samplers.a1111 import catalogue
    from .samplers.sigmas import SCHEDULE_TYPES

    a1111 = catalogue()
    print("A1111's way (the default), with the schedule type each uses for --scheduler Automatic:")
    width = max(len(label) for label, *_ in a1111)
    for label, aliases, _, meaning in a1111:
        suffix = f"  [alias {', '.join(aliases)}]" if aliases else ""
        print(f"  {label:<{width}}  {meaning}{suffix}")
    print(f"schedule types: Automatic, {', '.join(kind.label for kind in SCHEDULE_TYPES.values())}")
    print("\ndiffusers' way (--way diffusers), each equal to its diffusers scheduler:")
    width = max(map(len, SAMPLERS))
    for name, description in SAMPLERS.items():
        aliases = [alias for alias, target in ALIASES.items() if target == name]
        extras = (["--karras"] if name in KARRAS_SAMPLERS else []) + [f"alias {a}" for a in aliases]
        suffix = f"  [{', '.join(extras)}]" if extras else ""
        print(f"  {name:<{width}}  {description}{suffix}")
    return 0


# --- sd generate ---------------------------------------------------------------------------------------

GENERATE_DEFAULTS = dict(
    negative="",
    karras=False,
    width=None,  # the model's native size (SD1.5: 512; img2img: the input's)
    height=None,
    strength=0.8,
    clip_skip=1,
    emphasis="Original",
    pad_conds=False,
    tiling=False,
    way="a1111",  # its users' expectations, and PNGs that A1111 reproduces
    scheduler="Automatic",
    rng="GPU",
    ensd=0,
)
VAE_TILING = {"auto": None, "on": True, "off": False}  # --vae-tiling -> Pipeline.vae_tiling
# Each way's own defaults: A1111's UI (DPM++ 2M, Automatic = Karras, 20 steps, CFG 7) and diffusers'.
WAY_DEFAULTS = {
    "a1111": dict(steps=20, cfg=7.0, sampler="DPM++ 2M"),
    "diffusers": dict(steps=25, cfg=7.5, sampler="dpmpp_2m"),
}


def resolve_params(args: argparse.Namespace):
    """GenerationParams from the flags, on top of a PNG's parameters when --from-png is given."""
    from .images import read_png_parameters
    from .noise import check_source
    from .params import GenerationParams, a1111_sampler
    from .pipeline import new_seed

    base = GenerationParams(prompt="")
    if args.from_png:
        base = GenerationParams.from_text(read_png_parameters(args.from_png))
    elif args.prompt is None:
        raise ValueError('give a prompt (an empty one, "", is allowed) or --from-png FILE')

    way = args.way or (
        ("a1111" if base.a1111 else "diffusers") if args.from_png else GENERATE_DEFAULTS["way"]
    )

    def pick(flag: str, field: str):
        value = getattr(args, flag)
        if value is not None:
            return value
        if args.from_png:
            return getattr(base, field)
        return WAY_DEFAULTS[way].get(flag, GENERATE_DEFAULTS.get(flag))

    strength = None
    if (args.mask or args.outpaint) and not args.init_image:
        raise ValueError("--mask and --outpaint need --init-image")
    if args.init_image:
        # inpainting: A1111's default denoising 0.75; outpainting paints the new area from scratch
        default = 1.0 if args.outpaint else 0.75 if args.mask else 0.8
        strength = args.strength if args.strength is not None else (base.strength or default)
    elif args.strength is not None:
        raise ValueError("--strength needs --init-image")
    hires = hires_options(args, base)
    if hires.get("enable_hr") and args.init_image:
        if args.hires is not None:
            raise ValueError("--hires is for txt2img; it cannot go with --init-image")
        hires = {"enable_hr": False}  # a hires PNG's settings for img2img: A1111's img2img has no hires pass
    elif hires.get("enable_hr"):
        strength = hires.pop("strength")
    seed = args.seed if args.seed is not None else (base.seed if args.from_png else new_seed())
    variation_strength = base.subseed_strength if args.variation_strength is None else args.variation_strength
    params = replace(
        base,
        prompt=args.prompt if args.prompt is not None else base.prompt,
        negative_prompt=pick("negative", "negative_prompt"),
        steps=pick("steps", "steps"),
        sampler=pick("sampler", "sampler"),
        karras=pick("karras", "karras"),
        cfg_scale=pick("cfg", "cfg_scale"),
        seed=seed,
        width=pick("width", "width"),
        height=pick("height", "height"),
        strength=strength,
        clip_skip=pick("clip_skip", "clip_skip"),
        emphasis=pick("emphasis", "emphasis"),
        pad_conds=pick("pad_conds", "pad_conds"),
        tiling=pick("tiling", "tiling"),
        ti_hashes=None,  # written anew from the embeddings this run uses
        a1111=way == "a1111",
        schedule=pick("scheduler", "schedule"),
        rng=pick("rng", "rng").upper(),
        ensd=pick("ensd", "ensd"),
        subseed=args.variation_seed if args.variation_seed is not None else base.subseed,
        subseed_strength=variation_strength,
        **hires,
    )
    params = replace(params, inpaint=inpaint_settings(args, base.inpaint))
    if params.a1111:
        # A1111's names, any case, or ours: "dpmpp_2m" -> "DPM++ 2M" (--karras: its Karras schedule)
        label, named_schedule = a1111_sampler(params.sampler)
        schedule = "Karras" if params.karras else (named_schedule or params.schedule)
        params = replace(params, sampler=label, schedule=schedule, karras=False)
        if args.eta is not None:
            params = replace(params, eta=args.eta)
        skips = {"skip_early_cond": args.skip_early_cfg, "s_min_uncond": args.ngms,
                 "s_min_uncond_all": args.ngms_all_steps}  # fmt: skip
        params = replace(params, **{k: v for k, v in skips.items() if v is not None})
    elif any(v is not None for v in (args.skip_early_cfg, args.ngms, args.ngms_all_steps)):
        raise ValueError("--skip-early-cfg and --ngms are A1111's settings: they need --way a1111")
        if params.hr_sampler_name is not None:  # as the first pass's: A1111's names, or ours
            label, named_schedule = a1111_sampler(params.hr_sampler_name)
            params = replace(
                params, hr_sampler_name=label, hr_scheduler=params.hr_scheduler or named_schedule
            )
        check_source(params.rng)
    return params


CONTROL_MODE_CHOICES = {
    "balanced": "Balanced",
    "prompt": "My prompt is more important",
    "controlnet": "ControlNet is more important",
}
CONTROL_RESIZE_CHOICES = {"crop": "Crop and Resize", "just": "Just Resize", "fill": "Resize and Fill"}


def controlnet_options(args: argparse.Namespace, params) -> list[tuple]:
    """(file, hint image, scale, start, end, control mode, resize mode) per --controlnet, checked before
    any model loads."""
    from .images import load_image

    files, images = args.controlnet or [], args.control_image or []
    if len(files) != len(images):
        raise ValueError(
            f"give one --control-image per --controlnet ({len(files)} ControlNets, {len(images)} images)"
        )

    def nth(values: list | None, i: int, default):
        return values[i] if values and i < len(values) else default

    out = []
    for i, (file, image) in enumerate(zip(files, images, strict=True)):
        path = Path(file)
        if not path.exists():
            raise ValueError(f"ControlNet not found: {path}")
        mode = CONTROL_MODE_CHOICES[nth(args.control_mode, i, "balanced")]
        resize = CONTROL_RESIZE_CHOICES[nth(args.control_resize, i, "crop")]
        unit = (path, load_image(image), nth(args.control_scale, i, 1.0), nth(args.control_start, i, 0.0),
                nth(args.control_end, i, 1.0), mode, resize)  # fmt: skip
        if not 0 <= unit[3] < unit[4] <= 1 or unit[2] < 0:
            raise ValueError("--control-scale must be >= 0 and 0 <= --control-start < --control-end <= 1")
        out.append(unit)
    return out


def controlnet_units(pipe, options) -> list:
    """The ControlUnits of controlnet_options, read for this pipeline's U-Net and dtype."""
    from .controlnet import ControlUnit, load_controlnet
    from .models import dtype_of

    dtype = dtype_of(pipe.models["diffusion"])
    return [
        ControlUnit(load_controlnet(path, pipe.config.unet, dtype), image, scale, start, end, mode, resize)
        for path, image, scale, start, end, mode, resize in options
    ]


def inpaint_settings(args: argparse.Namespace, base):
    """The mask controls from the flags, over a PNG's (`base`); None without --mask / --outpaint."""
    from .inpaint import InpaintSettings, fill_mode

    if not (args.mask or args.outpaint):
        return None
    start = base or InpaintSettings(inpainting_fill=0 if args.outpaint else 1)
    changes = {}
    if args.mask_blur is not None:
        changes.update(mask_blur_x=args.mask_blur, mask_blur_y=args.mask_blur)
    if args.inpaint_fill is not None:
        changes["inpainting_fill"] = fill_mode(args.inpaint_fill)
    if args.only_masked:
        changes["inpaint_full_res"] = True
    if args.only_masked_padding is not None:
        changes["inpaint_full_res_padding"] = args.only_masked_padding
    if args.invert_mask:
        changes["inpainting_mask_invert"] = True
    if args.mask_weight is not None:
        changes["mask_weight"] = args.mask_weight
    return replace(start, **changes)


def parse_outpaint(text: str) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) from "left=64,right=64" (sides not named: 0; "all=32" for every side)."""
    sides = dict.fromkeys(("left", "right", "top", "bottom"), 0)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        name = name.strip().lower()
        if name not in (*sides, "all") or not value.strip().isdigit():
            raise ValueError(
                f"--outpaint {text!r}: use SIDE=PIXELS[,...] with sides left, right, top, bottom, all"
            )
        for side in sides if name == "all" else (name,):
            sides[side] = int(value)
    return sides["left"], sides["right"], sides["top"], sides["bottom"]


HIRES_FLAGS = ("hires_steps", "hires_strength", "hires_upscaler", "hires_sampler", "hires_scheduler",
               "hires_prompt", "hires_negative")  # fmt: skip
HIRES_STRENGTH = 0.7  # A1111's UI default (its API's: 0.75, as Pipeline.txt2img)


def hires_options(args: argparse.Namespace, base) -> dict:
    """The GenerationParams hires fields from --hires (SCALE or WxH) and --hires-*, over a PNG's; {} when
    the hires fix is off. ValueError (one line) for a --hires-* flag without it or a bad --hires."""
    given = [flag for flag in HIRES_FLAGS if getattr(args, flag) is not None]
    if args.hires is None and not (args.from_png and base.enable_hr):
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} needs --hires SCALE or --hires WxH")
        return {}
    out: dict = {"enable_hr": True}
    if args.hires is not None:
        match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", args.hires)
        if match:
            out.update(hr_resize_x=int(match.group(1)), hr_resize_y=int(match.group(2)))
        else:
            try:
                out.update(hr_scale=float(args.hires), hr_resize_x=0, hr_resize_y=0)
            except ValueError:
                raise ValueError(
                    f"--hires takes a scale (2, 1.5) or a size (1024x768), got {args.hires!r}"
                ) from None
    from_png = args.from_png and base.enable_hr
    fields = {
        "hires_steps": "hr_second_pass_steps", "hires_upscaler": "hr_upscaler",
        "hires_sampler": "hr_sampler_name", "hires_scheduler": "hr_scheduler", "hires_prompt": "hr_prompt",
        "hires_negative": "hr_negative_prompt",
    }  # fmt: skip
    for flag, field in fields.items():
        if getattr(args, flag) is not None:
            out[field] = getattr(args, flag)
    default = base.strength if from_png and base.strength is not None else HIRES_STRENGTH
    out["strength"] = args.hires_strength if args.hires_strength is not None else default
    if args.hires_upscaler is not None:
        from .hires import upscaler_label

        out["hr_upscaler"] = upscaler_label(args.hires_upscaler)
    return out


def output_paths(out: str | None, count: int, seed: int) -> list[Path]:
    """Where to save: -o FILE.png (numbered when several), -o DIR, or ./outputs; never an existing file."""
    target = Path(out) if out else DEFAULT_OUTPUT_DIR
    if target.suffix.lower() == ".png":
        folder, stem = target.parent, target.stem
        names = [f"{stem}.png"] if count == 1 else [f"{stem}-{i + 1}.png" for i in range(count)]
    else:
        folder, stem = target, None
        names = None
    folder.mkdir(parents=True, exist_ok=True)
    if names is None:
        taken = {p.name.split("-")[0] for p in folder.glob("*.png")}
        number = max((int(n) for n in taken if n.isdigit()), default=0) + 1
        names = [f"{number + i:05d}-{seed}.png" for i in range(count)]
    paths = []
    for name in names:
        path = folder / name
        k = 1
        while path.exists():  # keep earlier work: pick the next free name
            path = folder / f"{Path(name).stem}_{k}.png"
            k += 1
        paths.append(path)
    return paths


def _given_folder(value: str | None, flag: str, what: str, default: Path | None) -> Path | None:
    if value is None:
        return default
    path = Path(value).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{what} folder not found: {path} (from {flag})")
    return path


def embeddings_dir(args: argparse.Namespace) -> Path | None:
    """--embeddings-dir, else <models folder>/embeddings when it exists (A1111's layout)."""
    from .checkpoints import default_embeddings_dir

    return _given_folder(args.embeddings_dir, "--embeddings-dir", "embeddings", default_embeddings_dir())


def lora_dir(args: argparse.Namespace) -> Path | None:
    """--lora-dir, else <models folder>/Lora when it exists (A1111's layout)."""
    from .checkpoints import default_model_dir

    default = default_model_dir() / "Lora"
    return _given_folder(args.lora_dir, "--lora-dir", "LoRA", default if default.is_dir() else None)


def vae_dir(args: argparse.Namespace) -> Path | None:
    """--vae-dir, else <models folder>/VAE when it exists (A1111's layout)."""
    from .checkpoints import default_model_dir

    default = default_model_dir() / "VAE"
    return _given_folder(args.vae_dir, "--vae-dir", "VAE", default if default.is_dir() else None)


def vae_option(args: argparse.Namespace, from_png: str | None = None) -> Path | None:
    """The VAE file --vae names (a path, or a name in the VAE folder), else the one a PNG's `VAE` names
    when it is in the VAE folder (warned about when not); FileNotFoundError before any model is loaded."""
    from .vae_swap import VAE_AUTOMATIC, VAE_NONE, find_vae

    folder = vae_dir(args)
    name = getattr(args, "vae", None)
    if name is None or name in (VAE_AUTOMATIC, VAE_NONE):
        if name is None and from_png:
            path = find_vae(folder, from_png)
            if path is None:
                print(f"warning: the PNG was made with the VAE {from_png}, which is not in "
                      f"{folder or 'the VAE folder (--vae-dir)'}; using the checkpoint's own",
                      file=sys.stderr)  # fmt: skip
            return path
        return None
    path = find_vae(folder, name)
    if path is None:
        where = f" or in {folder}" if folder is not None else ""
        raise FileNotFoundError(f"VAE file not found: {name}{where} (from --vae)")
    return path


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def lora_options(args: argparse.Namespace) -> list[tuple[Path, float | tuple[float, float]]]:
    """--lora FILE[:W] / FILE:TE:UNET (repeatable) as set_loras entries; FILE is a path, or a name in the
    LoRA folder (as in a <lora:NAME:W> tag). FileNotFoundError before any model is loaded."""
    from .networks import find_lora

    folder = lora_dir(args)
    out: list[tuple[Path, float | tuple[float, float]]] = []
    for text in args.lora or ():
        parts = text.split(":")
        numbers: list[float] = []
        # trailing numbers are strengths; the rest (which may hold ':', e.g. C:\...) is the file
        while len(parts) > 1 and len(numbers) < 2 and (value := _number(parts[-1])) is not None:
            numbers.insert(0, value)
            parts.pop()
        name = ":".join(parts)
        path = Path(name).expanduser()
        if not path.is_file() and folder is not None:
            path = find_lora(folder, name) or path
        if not path.is_file():
            where = f" or in {folder}" if folder is not None else ""
            raise FileNotFoundError(f"LoRA file not found: {name}{where} (from --lora {text})")
        weight = (numbers[0], numbers[1]) if len(numbers) == 2 else (numbers[0] if numbers else 1.0)
        out.append((path, weight))
    return out


def load_pipeline(args: argparse.Namespace, vae: Path | None = None):
    """The Pipeline that --ckpt, --device, --dtype, --backend, --vae and --vae-tiling ask for (with no
    checkpoint anywhere: the built-in model, said in one line); `vae`: the VAE file already resolved
    (vae_option), else the one --vae names."""
    import torch

    from .checkpoints import BUILTIN_MODEL, builtin_notice, find_checkpoint, missing_checkpoint_message
    from .pipeline import Pipeline

    checkpoint = find_checkpoint(args.ckpt)
    embeddings = embeddings_dir(args)
    loras = lora_dir(args)
    if checkpoint is None and BUILTIN_MODEL.exists():
        print(builtin_notice(), file=sys.stderr)
        checkpoint = BUILTIN_MODEL
    if checkpoint is None:
        raise FileNotFoundError(missing_checkpoint_message())
    print(f"loading {checkpoint} ...", file=sys.stderr)
    if args.backend == "openvino":
        from .backends.openvino import compile_checkpoint, precision_for
        from .checkpoints import model_hash

        precision = precision_for(args.dtype)
        print(
            f"converting to OpenVINO ({precision}; cached on disk after the first run) ...", file=sys.stderr
        )
        # Weights are read (in fp32) only for components not converted yet.
        checkpoint_hash = model_hash(checkpoint)
        models = compile_checkpoint(checkpoint, precision, weights_id=checkpoint_hash)
        pipe = Pipeline(models, model_name=checkpoint.stem, model_hash=checkpoint_hash, embeddings=embeddings)
    else:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        pipe = Pipeline.from_checkpoint(checkpoint, device=args.device, dtype=dtype, embeddings=embeddings)
    if len(pipe.embeddings):
        print(f"embeddings: {', '.join(pipe.embeddings.by_name)}", file=sys.stderr)
    pipe.lora_dir = loras
    pipe.vae_dir = vae_dir(args)
    if getattr(args, "lora_mode", "merged") == "unmerged":
        pipe.set_loras([], merge=False)  # prompt tags too are kept out of the weights from now on
    vae = vae or vae_option(args)
    if vae is not None:
        pipe.set_vae(vae)
    pipe.vae_tiling = VAE_TILING[args.vae_tiling]
    return pipe


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .config import SD15
    from .images import load_image, save_png
    from .pipeline import (
        check_hires_settings,
        check_settings,
        check_size,
        check_tiling,
        check_uncond_skips,
        model_calls,
    )
    from .prompts import check_prompt

    params = resolve_params(args)
    # Cheap checks first: a typo should not cost a 4 GB load.
    image = load_image(args.init_image) if args.init_image else None
    sides = parse_outpaint(args.outpaint) if args.outpaint else None
    inpaint = params.inpaint if (args.mask or sides) else None
    if inpaint is not None and (sides or inpaint.inpaint_full_res):
        pass  # the size is the canvas's (outpainting) or the model's ("only masked"), set by the pipeline
    elif image is not None:  # diffusers' default: the input's size rounded down to a multiple of 8
        params = replace(
            params,
            width=params.width or image.width - image.width % 8,
            height=params.height or image.height - image.height % 8,
        )
    check_size(params.width, params.height)
    if params.enable_hr:
        check_hires_settings(params)
    check_settings(params.steps, params.cfg_scale, params.strength)
    check_uncond_skips(params)
    if params.tiling:
        check_tiling(params, VAE_TILING[args.vae_tiling], compiled=args.backend == "openvino")
    check_prompt(params.prompt, params.steps)
    check_prompt(params.negative_prompt, params.steps)
    total = model_calls(params, SD15.schedule)  # also refuses a strength that leaves no steps
    for key in params.unhonoured:
        print(f"warning: {key} (from the PNG) is not supported yet; the image is made without it",
              file=sys.stderr)  # fmt: skip
    # A1111's way: every image is its own seed, so one image replays alone.
    replay_batch = args.from_png and not params.a1111
    num = args.num if args.num is not None else (params.batch_size if replay_batch else 1)
    if num < 1:
        raise ValueError(f"-n must be at least 1, got {num}")
    # --from-png of one image of a batch: re-run the batch (one shared generator), keep that image.
    keep = [params.batch_pos] if replay_batch and args.num is None and num > 1 else None
    loras = lora_options(args)
    vae = vae_option(args, params.vae if args.from_png else None)
    control_options = controlnet_options(args, params)
    pipe = load_pipeline(args, vae)
    control = controlnet_units(pipe, control_options)
    if loras:
        pipe.set_loras(loras, merge=args.lora_mode == "merged")
    if args.from_png and params.model_hash and pipe.model_hash and params.model_hash != pipe.model_hash:
        print(f"warning: the PNG was made with model hash {params.model_hash}; this checkpoint's is "
              f"{pipe.model_hash}, so the image will differ", file=sys.stderr)  # fmt: skip
    bars: list[tqdm] = []  # opened at the first step, so warnings from prompt encoding print cleanly

    def progress(step: object) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc="sampling", unit="step", file=sys.stderr))
        bars[0].update()

    if params.inpaint is not None and not (args.mask or sides):
        print("warning: the PNG was inpainted; give --mask FILE (masks are not stored in PNGs), or the "
              "image is made as a plain img2img", file=sys.stderr)  # fmt: skip
        params = replace(params, inpaint=None)
    eta = args.eta or 0.0
    if sides:
        images = pipe.run_outpaint(params, image, sides, num_images=num, eta=eta, callback=progress,
                                   control=control)  # fmt: skip
    else:
        images = pipe.run(params, image, num_images=num, eta=eta, callback=progress, mask=args.mask,
                          control=control)  # fmt: skip
    for bar in bars:
        bar.close()
    if keep is not None:
        images = [images[i] for i in keep if i < len(images)]
    for image_out, path in zip(images, output_paths(args.output, len(images), params.seed), strict=True):
        save_png(image_out, path, image_out.info.get("parameters"))
        print(path)
    return 0


# --- sd prompt -------------------------------------------------------------------------------------------


def _chunk_text(chunk, tokenizer) -> tuple[int, str]:
    """(prompt tokens, readable text) of a closed chunk: weighted tokens as (word:w), embeddings as <name>."""
    fixes = {offset + 1: embedding for offset, embedding in chunk.fixes}
    words, position = [], 1
    while position < len(chunk.tokens) - 1 and chunk.tokens[position] != tokenizer.eos_token_id:
        if position in fixes:
            words.append(f"<{fixes[position].name}>")
            position += len(fixes[position])
            continue
        word, weight = tokenizer.decode([chunk.tokens[position]]), chunk.multipliers[position]
        words.append(word if weight == 1 else f"({word}:{weight:.3g})")
        position += 1
    return position - 1, " ".join(words)


def _print_prompt(label: str, text: str, args: argparse.Namespace, tokenizer, embeddings) -> None:
    from .conditioning import CHUNK_LENGTH, tokenize_prompt
    from .prompts import is_break, parse_attention, prompt_schedule

    schedule = prompt_schedule(text, args.steps)
    if len(schedule) > 1:
        print(f"{label}: changes during sampling ({args.steps} steps):")
        starts = [1] + [end + 1 for end, _ in schedule[:-1]]
        for start, (end, variant) in zip(starts, schedule, strict=True):
            print(f"  steps {start}-{end}: {variant!r}")
        label = f"{label} at the last step"
    variant = schedule[-1][1]
    tokenized = tokenize_prompt(variant, tokenizer, embeddings, args.emphasis)
    count = len(tokenized.chunks)
    print(f"{label}: {tokenized.token_count}/{tokenized.capacity} tokens, "
          f"{count} chunk{'s' * (count > 1)} of {CHUNK_LENGTH}")  # fmt: skip
    if args.emphasis != "None":
        pieces = ["BREAK" if is_break(p) else repr(p[0]) + (f" x{p[1]:.4g}" if p[1] != 1 else "")
                  for p in parse_attention(variant)]  # fmt: skip
        print(f"  pieces: {' | '.join(pieces)}")
    for index, chunk in enumerate(tokenized.chunks, 1):
        tokens, words = _chunk_text(chunk, tokenizer)
        print(f"  chunk {index} ({tokens} tokens): {words}")
    for embedding in tokenized.embeddings:
        print(f"  embedding {embedding.name}: {len(embedding)} vector(s), {embedding.path}")


def cmd_prompt(args: argparse.Namespace) -> int:
    """How a prompt is read: AND parts, schedule, weighted pieces, chunks and tokens, embeddings, tags."""
    from .embeddings import Embeddings
    from .prompts import extract_networks, lora_multipliers, split_and
    from .tokenizer import CLIPTokenizer

    tokenizer = CLIPTokenizer()
    embeddings = Embeddings(lambda text: tokenizer.encode(text, add_special_tokens=False))
    folder = embeddings_dir(args)
    if folder is not None:
        embeddings.load_folder(folder)

    prompt, tags = extract_networks(args.prompt)
    parts = split_and(prompt)
    for number, (part, weight) in enumerate(parts, 1):
        composite = len(parts) > 1 or weight != 1
        label = f"prompt part {number} of {len(parts)} (weight {weight:g})" if composite else "prompt"
        _print_prompt(label, part, args, tokenizer, embeddings)
    if args.negative is not None:
        _print_prompt("negative prompt", args.negative, args, tokenizer, embeddings)
        if extract_networks(args.negative)[1]:
            print("  note: <...> tags in the negative prompt are read as text (A1111 applies them from the "
                  "prompt only)")  # fmt: skip
    for tag in tags:
        if tag.kind == "lora":
            te, unet = lora_multipliers(tag)
            print(f"tag {tag.text}: LoRA {tag.name!r}, text encoder {te:g}, U-Net {unet:g}; taken out of the "
                  "prompt, the file (from --lora-dir) merged")  # fmt: skip
        else:
            print(f"tag {tag.text}: {tag.kind} networks are not supported; taken out of the prompt, ignored")
    if folder is not None:
        skipped = f", {len(embeddings.skipped)} skipped" if embeddings.skipped else ""
        print(f"embeddings in {folder}: {len(embeddings)} usable{skipped}")
    return 0


# --- sd serve --------------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from copy import copy

    from .checkpoints import BUILTIN_MODEL, default_model_dir, find_checkpoint
    from .server import LOCAL_HOSTS, Service, make_server, parse_api_auth

    auth = parse_api_auth(args.api_auth) if args.api_auth else None
    origins = (
        [o.strip() for o in args.cors_allow_origins.split(",") if o.strip()]
        if args.cors_allow_origins
        else None
    )
    server = make_server(None, args.host, args.port, auth=auth, cors_origins=origins,
                         cors_regex=args.cors_allow_origins_regex, log_level="info")  # fmt: skip
    try:  # a taken port fails above, before the model loads
        checkpoint = find_checkpoint(args.ckpt) or BUILTIN_MODEL

        def loader(path):  # sd_model_checkpoint: another file, with the same --device, --dtype, ...
            again = copy(args)
            again.ckpt = str(path)
            return load_pipeline(again)

        flags = {k: v for k, v in vars(args).items() if k != "run"} | {"api_auth": None}  # no secrets out
        server.service = Service(load_pipeline(args), args.way, models_dir=default_model_dir(),
                                 checkpoint=checkpoint, loader=loader, flags=flags)  # fmt: skip
        host, port = server.server_address[:2]
        if args.host not in LOCAL_HOSTS and not auth:
            print(f"warning: listening on {args.host}: anyone who can reach port {port} can use the model "
                  "(--api-auth user:password to ask for one)", file=sys.stderr)  # fmt: skip
        print(f"serving at http://{host}:{port}/ (web UI; A1111's API under /sdapi/v1, its pages at /docs; "
              "Ctrl-C stops)", file=sys.stderr)  # fmt: skip
        server.serve_forever()
    except KeyboardInterrupt:
        print("sd serve: stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0


class StderrHandler(logging.Handler):
    """Warnings as 'warning: ...' lines on whatever sys.stderr is at the time."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"{record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)


# --- parser --------------------------------------------------------------------------------------------


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 0 to 65535, not {text!r}")
    return int(text)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The flags `load_pipeline` reads: which checkpoint, and how to run it."""
    group = parser.add_argument_group("model")
    group.add_argument("--ckpt", metavar="PATH", help=".ckpt / .safetensors file or diffusers folder")
    group.add_argument("--device", default="cpu", help="torch device (default cpu)")
    group.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="compute dtype: bf16 is ~2x faster on CPUs with avx512_bf16/AMX (default fp32)",
    )
    group.add_argument(
        "--vae-tiling",
        choices=("auto", "on", "off"),
        default="auto",
        help="decode the image in overlapping tiles: bounded memory for huge images, slightly different "
        "pixels (default auto: above 1024x1024)",
    )
    group.add_argument(
        "--embeddings-dir",
        metavar="DIR",
        help="textual-inversion embeddings, used by file name in prompts (default: the 'embeddings' folder "
        "of the model folder, when it exists)",
    )
    group.add_argument(
        "--lora-dir",
        metavar="DIR",
        help="LoRA files, named by <lora:NAME:WEIGHT> tags in prompts (default: the 'Lora' folder of the "
        "model folder, when it exists)",
    )
    group.add_argument(
        "--lora-mode",
        choices=("merged", "unmerged"),
        default="merged",
        help="merged (default, fastest): LoRA deltas written into the weights, originals restored after; "
        "unmerged: weights left untouched, the deltas added as the weights are read (torch backend)",
    )
    group.add_argument(
        "--vae",
        metavar="FILE",
        help="decode (and encode) with this VAE file instead of the checkpoint's, e.g. "
        "vae-ft-mse-840000-ema-pruned.safetensors: a path or a name in --vae-dir; original or diffusers "
        "layout ('None': the checkpoint's own)",
    )
    group.add_argument(
        "--vae-dir",
        metavar="DIR",
        help="VAE files for --vae and for PNGs that name one (default: the 'VAE' folder of the model "
        "folder, when it exists)",
    )
    group.add_argument(
        "--backend",
        choices=("torch", "openvino"),
        default="torch",
        help="openvino: run our modules converted by OpenVINO (pip install 'sd[openvino]')",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sd",
        description="Stable Diffusion v1.5 from scratch: generate images, serve them over HTTP, train "
        "models and inspect checkpoints.",
        epilog="Run 'sd COMMAND --help' for the options of a command.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = commands.add_parser(
        "generate",
        help="text-to-image, or image-to-image with --init-image",
        description="Generate images from a prompt. The checkpoint comes from --ckpt, else $SD_CHECKPOINT, "
        "else the default model folder (see 'sd info --help'). Each PNG stores its generation parameters "
        "(A1111 'parameters' chunk), so --from-png FILE reproduces it.",
        epilog="""examples:
  sd generate "a lighthouse at dusk, oil painting" --seed 42
  sd generate "a cat" --negative "blurry" --sampler euler_a --steps 30 -n 4 -o cats/
  sd generate "a winter scene" --init-image summer.jpg --strength 0.6
  sd generate --from-png outputs/00001-42.png            # same image again
  sd generate --from-png outputs/00001-42.png --seed 7   # same settings, new seed""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("prompt", nargs="?", help='what to draw ("" = unconditional)')
    gen.add_argument("--negative", metavar="TEXT", help="negative prompt: what to avoid (default: none)")
    gen.add_argument("--steps", type=int, help="sampling steps (default 20; --way diffusers: 25)")
    gen.add_argument(
        "--cfg",
        type=float,
        metavar="SCALE",
        help="classifier-free guidance scale; <= 1 turns it off (default 7; --way diffusers: 7.5)",
    )
    gen.add_argument(
        "--sampler", help="sampler name, see 'sd samplers' (default 'DPM++ 2M'; --way diffusers: dpmpp_2m)"
    )
    gen.add_argument("--karras", action="store_true", default=None, help="Karras sigma schedule")
    gen.add_argument(
        "--eta",
        type=float,
        help="the sampler's eta: noise added per step (A1111's way: ancestral and SDE samplers, default 1, "
        "and DDIM, default 0; --way diffusers: ddim only, default 0)",
    )
    gen.add_argument("--seed", type=int, help="random seed (default: a new one, saved in the PNG)")
    gen.add_argument(
        "--width",
        type=int,
        help="multiple of 8 (default: the model's own size, 512 for SD1.5; img2img: the input's)",
    )
    gen.add_argument(
        "--height",
        type=int,
        help="multiple of 8 (default: the model's own size, 512 for SD1.5; img2img: the input's)",
    )
    gen.add_argument("-n", "--num", type=int, help="number of images, one batch (default 1)")
    gen.add_argument("--init-image", metavar="PATH", help="start from this image (img2img)")
    gen.add_argument(
        "--strength", type=float, help="img2img: how much to change the image, in (0, 1] (default 0.8)"
    )
    inp = gen.add_argument_group("inpainting and outpainting (A1111's img2img mask controls)")
    inp.add_argument(
        "--mask", metavar="FILE", help="inpaint: repaint the white part of this mask (RGBA: its alpha)"
    )
    inp.add_argument(
        "--mask-blur", type=int, metavar="N", help="Gaussian blur of the mask, pixels (default 4)"
    )
    inp.add_argument(
        "--inpaint-fill",
        metavar="MODE",
        help="masked content: fill, original (default), 'latent noise', 'latent nothing' (or 0..3)",
    )
    inp.add_argument(
        "--only-masked",
        action="store_true",
        help="work on the crop around the mask at --width x --height (default 512), paste it back",
    )
    inp.add_argument(
        "--only-masked-padding", type=int, metavar="PX", help="padding around the mask (default 32)"
    )
    inp.add_argument("--invert-mask", action="store_true", help="repaint the black part instead")
    inp.add_argument(
        "--mask-weight",
        type=float,
        metavar="W",
        help="inpainting models: conditioning mask strength, 0..1 (default 1)",
    )
    inp.add_argument(
        "--outpaint",
        metavar="SIDES",
        help="extend the --init-image: left=64,right=64 (top, bottom, all); strength default 1",
    )
    gen.add_argument("--clip-skip", type=int, help="use the N-th last CLIP layer (default 1)")
    gen.add_argument(
        "--tiling", action="store_true", default=None,
        help="an image that tiles seamlessly (A1111's Tiling: circular padding in the U-Net and VAE)",
    )  # fmt: skip
    gen.add_argument(
        "--emphasis",
        choices=EMPHASIS_CHOICES,
        help="how (word:1.2) weights apply (A1111's modes): Original multiplies and keeps the mean, "
        "'No norm' only multiplies, Ignore drops the weights, None reads brackets and BREAK as text "
        "(default Original)",
    )
    gen.add_argument(
        "--pad-conds",
        action="store_true",
        default=None,
        help="pad the shorter of prompt and negative prompt with empty chunks, one U-Net call (A1111 option)",
    )
    a1111 = gen.add_argument_group(
        "A1111's way (the default: its samplers, schedules, per-image noise and pixels, as its PNGs say)"
    )
    a1111.add_argument(
        "--way",
        choices=("a1111", "diffusers"),
        help="a1111: make the image as AUTOMATIC1111 does (sampler names 'DPM++ 2M', 'Euler a', ...); "
        "diffusers: as diffusers does (default a1111; --from-png: the PNG's way)",
    )
    a1111.add_argument(
        "--scheduler", help="A1111 schedule type: Automatic, Karras, Exponential, ... (default Automatic)"
    )
    a1111.add_argument(
        "--rng", choices=("gpu", "cpu", "nv", "GPU", "CPU", "NV"), help="noise source (default GPU)"
    )
    a1111.add_argument("--ensd", type=int, help="eta noise seed delta, e.g. 31337 (default 0)")
    a1111.add_argument(
        "--skip-early-cfg", type=float, metavar="F",
        help="leave out the negative prompt for this fraction of the steps from the start (A1111's "
        "'Ignore negative prompt during early sampling', 'Skip Early CFG'; default 0: off)",
    )  # fmt: skip
    a1111.add_argument(
        "--ngms", type=float, metavar="SIGMA",
        help="leave out the negative prompt every other step once sigma is below SIGMA, e.g. 1.5: faster "
        "(A1111's 'Negative Guidance minimum sigma', NGMS; default 0: off)",
    )  # fmt: skip
    a1111.add_argument(
        "--ngms-all-steps", action="store_true", default=None, help="--ngms on every step below it"
    )
    a1111.add_argument("--variation-seed", type=int, metavar="S", help="A1111's variation seed (subseed)")
    a1111.add_argument(
        "--variation-strength", type=float, metavar="F", help="how much of it, 0..1 (default 0)"
    )
    gen.add_argument(
        "--lora",
        action="append",
        metavar="FILE[:W]",
        help="merge a LoRA / LyCORIS file at strength W (default 1), or FILE:TE:UNET for the text encoder "
        "and U-Net apart; FILE may be a name in --lora-dir; repeatable (prompt tags <lora:NAME:W> add more)",
    )
    control = gen.add_argument_group("ControlNet (repeat the flags for several)")
    control.add_argument(
        "--controlnet", action="append", metavar="FILE",
        help="a ControlNet for SD1.5: control_v11p_sd15_canny.pth / .safetensors (original layout, fp16 "
        "copies too) or a diffusers ControlNetModel folder",
    )  # fmt: skip
    control.add_argument(
        "--control-image", action="append", metavar="IMAGE",
        help="its hint: an edge map, depth map, pose drawing, ... (resized to the output)",
    )  # fmt: skip
    control.add_argument(
        "--control-scale", action="append", type=float, metavar="F", help="its strength (default 1)"
    )
    control.add_argument(
        "--control-start", action="append", type=float, metavar="F",
        help="the fraction of the steps it starts at (default 0)",
    )  # fmt: skip
    control.add_argument(
        "--control-end", action="append", type=float, metavar="F",
        help="the fraction of the steps it stops at (default 1)",
    )  # fmt: skip
    control.add_argument(
        "--control-mode", action="append", choices=CONTROL_MODE_CHOICES, metavar="MODE",
        help="A1111's control mode: balanced (default), prompt ('My prompt is more important'), controlnet "
        "('ControlNet is more important')",
    )  # fmt: skip
    control.add_argument(
        "--control-resize", action="append", choices=CONTROL_RESIZE_CHOICES, metavar="MODE",
        help="A1111's resize mode for a hint of another size: crop (default, 'Crop and Resize'), just "
        "('Just Resize'), fill ('Resize and Fill')",
    )  # fmt: skip
    hires = gen.add_argument_group("hires fix (A1111's: txt2img, upscaled, then repainted at the large size)")
    hires.add_argument(
        "--hires",
        metavar="SCALE|WxH",
        help="upscale by SCALE (2, 1.5) or to WxH (0 for one side: from the aspect)",
    )
    hires.add_argument(
        "--hires-steps", type=int, metavar="N", help="second-pass steps (default 0: as --steps)"
    )
    hires.add_argument(
        "--hires-strength",
        type=float,
        metavar="F",
        help=f"its denoising strength, in (0, 1] (default {HIRES_STRENGTH})",
    )
    hires.add_argument(
        "--hires-upscaler", metavar="NAME",
        help="Latent (default), 'Latent (antialiased)', 'Latent (bicubic)', 'Latent (bicubic antialiased)', "
        "'Latent (nearest)', 'Latent (nearest-exact)', Lanczos, Nearest, None (any case)",
    )  # fmt: skip
    hires.add_argument("--hires-sampler", metavar="NAME", help="second-pass sampler (default: --sampler's)")
    hires.add_argument("--hires-scheduler", metavar="NAME", help="its schedule type (default: --scheduler's)")
    hires.add_argument("--hires-prompt", metavar="TEXT", help="second-pass prompt (default: the prompt)")
    hires.add_argument(
        "--hires-negative", metavar="TEXT", help="second-pass negative prompt (default: --negative)"
    )
    gen.add_argument("--from-png", metavar="FILE", help="take the settings from a PNG made by sd (or A1111)")
    gen.add_argument("-o", "--output", metavar="OUT", help="FILE.png or folder (default ./outputs/)")
    add_model_options(gen)
    gen.set_defaults(run=cmd_generate)

    from .shapes import add_make_shapes_command
    from .train import add_train_command

    add_make_shapes_command(commands)
    add_train_command(commands)

    from .server import DEFAULT_HOST, DEFAULT_PORT

    serve = commands.add_parser(
        "serve",
        help="serve the model over HTTP (an AUTOMATIC1111-style API)",
        description="""Load the model once and answer HTTP requests, in the shape of AUTOMATIC1111's API:
  GET  /                   a web UI;  /docs: every route and field of the API
  POST /sdapi/v1/txt2img   JSON with A1111's fields and defaults: prompt, negative_prompt, seed (-1: random),
                           steps, cfg_scale, sampler_name ("DPM++ 2M", "Euler a", ... or ours), scheduler
                           ("Karras", ...), width, height, batch_size, n_iter, subseed, subseed_strength,
                           seed_resize_from_w/h, eta, override_settings (A1111's option names),
                           and the hires fix: enable_hr, hr_scale, hr_upscaler, hr_second_pass_steps,
                           denoising_strength, hr_resize_x/y, hr_sampler_name, hr_scheduler, hr_prompt, ...
  POST /sdapi/v1/img2img   the same, plus init_images (one base64 image) and denoising_strength
  GET  /sdapi/v1/progress  the running job and the queue;  POST /sdapi/v1/interrupt stops it
  GET|POST /sdapi/v1/options, GET /sdapi/v1/samplers, /schedulers, /sd-models, /sd-vae, /loras, ...
Images are made A1111's way (its samplers, noise and pixels) unless --way diffusers or a request's
"way" says otherwise. Answers hold base64 PNGs with their parameters inside. One job runs at a time,
the others wait in line (first come, first served); bad requests get a 4xx status and a one-line "detail".""",
        epilog="""examples:
  sd serve                                  # http://127.0.0.1:7860, this machine only
  sd serve --ckpt v1-5-pruned-emaonly.safetensors --dtype bf16
  curl -s localhost:7860/sdapi/v1/txt2img -d '{"prompt": "a red circle", "seed": 1, "steps": 20}' >a.json
  (a.json: {"images": [base64 PNG, ...], "parameters": {...}, "info": "<JSON: seeds, ...>"})""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to listen on (default {DEFAULT_HOST}: this machine only; 0.0.0.0: every interface)",
    )
    serve.add_argument(
        "--port", type=_port, default=DEFAULT_PORT, help=f"(default {DEFAULT_PORT}; 0: any free one)"
    )
    serve.add_argument(
        "--way",
        choices=("a1111", "diffusers"),
        default="a1111",
        help='how images are made unless a request says (its "way" field): a1111, as AUTOMATIC1111 makes '
        "them (its samplers, schedules, noise and pixels), or diffusers (default a1111)",
    )
    serve.add_argument(
        "--api-auth",
        metavar="USER:PASS[,USER2:PASS2]",
        help="ask every request for HTTP Basic credentials (A1111's flag); advised with --host 0.0.0.0",
    )
    serve.add_argument(
        "--cors-allow-origins",
        metavar="ORIGINS",
        help="comma-separated origins whose web pages may call the API (default: none, CORS off)",
    )
    serve.add_argument(
        "--cors-allow-origins-regex", metavar="REGEX", help="the same, as a regular expression"
    )
    add_model_options(serve)
    serve.set_defaults(run=cmd_serve)

    prompt = commands.add_parser(
        "prompt",
        help="show how a prompt is read (weights, BREAK, chunks and tokens, embeddings, tags)",
        description="Print how PROMPT is read, A1111's way: its AND parts and their weights, prompt editing "
        "over the steps, the (text, weight) pieces, each 75-token chunk, the embeddings found and the "
        "<lora:...> tags taken out. No model is loaded.",
        epilog="""examples:
  sd prompt "masterpiece, (detailed face:1.2), [blurry], a castle BREAK night sky"
  sd prompt "a [cat:dog:0.5] <lora:ink:0.8>" --negative "EasyNegative" --embeddings-dir embeddings/""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prompt.add_argument("prompt", help="the prompt, in A1111's syntax")
    prompt.add_argument("--negative", metavar="TEXT", help="a negative prompt to show too")
    prompt.add_argument("--steps", type=int, default=20, help="steps, for prompt editing (default 20)")
    prompt.add_argument("--emphasis", choices=EMPHASIS_CHOICES, default="Original", help="(default Original)")
    prompt.add_argument("--embeddings-dir", metavar="DIR", help="as for 'sd generate'")
    prompt.set_defaults(run=cmd_prompt)

    samplers = commands.add_parser("samplers", help="list the samplers", description="List the samplers.")
    samplers.set_defaults(run=cmd_samplers)

    info = commands.add_parser(
        "info",
        help="say what a checkpoint file or diffusers folder is",
        description="Print what PATH is (model family, components, dtype, parameter counts) "
        "or why it cannot be used. Reads headers only where the format allows.",
        epilog="example: sd info ~/models/v1-5-pruned-emaonly.safetensors",
    )
    info.add_argument("path", help=".ckpt / .safetensors file or diffusers folder")
    info.set_defaults(run=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logger = logging.getLogger("sd")
    if not any(isinstance(h, StderrHandler) for h in logger.handlers):
        logger.addHandler(StderrHandler(logging.WARNING))
        logger.propagate = False
    from .weights import CheckpointError

    try:
        return args.run(args)
    except (CheckpointError, ValueError, OSError) as error:
        print(f"sd {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"sd {args.command}: interrupted", file=sys.stderr)
        return 130
