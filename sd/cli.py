"""The `sd` command line.

Every expected failure (bad file, bad argument, bad image) ends in one line on stderr and a non-zero
exit; tracebacks are for bugs only. Generation validates everything cheap before loading a model, and
never overwrites an existing image.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

EXIT_USAGE = 2
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

    width = max(map(len, SAMPLERS))
    for name, description in SAMPLERS.items():
        aliases = [alias for alias, target in ALIASES.items() if target == name]
        extras = (["--karras"] if name in KARRAS_SAMPLERS else []) + [f"alias {a}" for a in aliases]
        suffix = f"  [{', '.join(extras)}]" if extras else ""
        print(f"{name:<{width}}  {description}{suffix}")
    return 0


# --- sd generate ---------------------------------------------------------------------------------------

GENERATE_DEFAULTS = dict(
    negative="",
    steps=25,
    cfg=7.5,
    sampler="dpmpp_2m",
    karras=False,
    width=None,  # the model's native size (SD1.5: 512; img2img: the input's)
    height=None,
    strength=0.8,
    clip_skip=1,
)


def resolve_params(args: argparse.Namespace):
    """GenerationParams from the flags, on top of a PNG's parameters when --from-png is given."""
    from .images import read_png_parameters
    from .params import GenerationParams
    from .pipeline import new_seed

    base = GenerationParams(prompt="")
    if args.from_png:
        base = GenerationParams.from_text(read_png_parameters(args.from_png))
    elif args.prompt is None:
        raise ValueError('give a prompt (an empty one, "", is allowed) or --from-png FILE')

    def pick(flag: str, field: str):
        value = getattr(args, flag)
        if value is not None:
            return value
        if args.from_png:
            return getattr(base, field)
        return GENERATE_DEFAULTS[flag]

    strength = None
    if args.init_image:
        strength = args.strength if args.strength is not None else (base.strength or 0.8)
    elif args.strength is not None:
        raise ValueError("--strength needs --init-image")
    seed = args.seed if args.seed is not None else (base.seed if args.from_png else new_seed())
    return replace(
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
    )


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


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from .checkpoints import BUILTIN_MODEL, builtin_notice, find_checkpoint, missing_checkpoint_message
    from .images import load_image, save_png
    from .pipeline import Pipeline, check_settings, check_size
    from .samplers import get_sampler

    params = resolve_params(args)
    # Cheap checks first: a typo should not cost a 4 GB load.
    image = load_image(args.init_image) if args.init_image else None
    if image is not None:  # diffusers' default: the input's size rounded down to a multiple of 8
        params = replace(
            params,
            width=params.width or image.width - image.width % 8,
            height=params.height or image.height - image.height % 8,
        )
    check_size(params.width, params.height)
    check_settings(params.steps, params.cfg_scale, params.strength)
    sampler = get_sampler(params.sampler, params.steps, karras=params.karras, eta=args.eta)
    if params.strength is not None:
        sampler.start_index(params.strength)
    num = args.num if args.num is not None else (params.batch_size if args.from_png else 1)
    if num < 1:
        raise ValueError(f"-n must be at least 1, got {num}")
    # --from-png of one image of a batch: re-run the batch (one shared generator), keep that image.
    keep = [params.batch_pos] if args.from_png and args.num is None and num > 1 else None
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]

    checkpoint = find_checkpoint(args.ckpt)
    if checkpoint is None and BUILTIN_MODEL.exists():
        print(builtin_notice(), file=sys.stderr)
        checkpoint = BUILTIN_MODEL
    if checkpoint is None:
        raise FileNotFoundError(missing_checkpoint_message())
    print(f"loading {checkpoint} ...", file=sys.stderr)
    if args.backend == "openvino":
        from .backends.openvino import compile_models, precision_for

        pipe = Pipeline.from_checkpoint(checkpoint, device="cpu")  # converted from fp32 weights
        precision = precision_for(args.dtype)
        print(
            f"converting to OpenVINO ({precision}; cached on disk after the first run) ...", file=sys.stderr
        )
        pipe.models = compile_models(pipe.models, precision=precision, weights_id=pipe.model_hash)
    else:
        pipe = Pipeline.from_checkpoint(checkpoint, device=args.device, dtype=dtype)
    pipe.vae_tiling = {"auto": None, "on": True, "off": False}[args.vae_tiling]
    total = len(sampler.timesteps) - (sampler.start_index(params.strength) if image else 0)
    bars: list[tqdm] = []  # opened at the first step, so warnings from prompt encoding print cleanly

    def progress(step: object) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc="sampling", unit="step", file=sys.stderr))
        bars[0].update()

    common = dict(
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        steps=params.steps,
        cfg_scale=params.cfg_scale,
        sampler=params.sampler,
        karras=params.karras,
        eta=args.eta,
        seed=params.seed,
        num_images=num,
        clip_skip=params.clip_skip,
        callback=progress,
    )
    if image is None:
        images = pipe.txt2img(width=params.width, height=params.height, **common)
    else:
        images = pipe.img2img(
            image, strength=params.strength, width=params.width, height=params.height, **common
        )
    for bar in bars:
        bar.close()
    if keep is not None:
        images = [images[i] for i in keep if i < len(images)]
    for image_out, path in zip(images, output_paths(args.output, len(images), params.seed), strict=True):
        save_png(image_out, path, image_out.info.get("parameters"))
        print(path)
    return 0


class StderrHandler(logging.Handler):
    """Warnings as 'warning: ...' lines on whatever sys.stderr is at the time."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"{record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)


# --- parser --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sd",
        description="Stable Diffusion v1.5 from scratch: generate images and inspect checkpoints.",
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
    gen.add_argument("--ckpt", metavar="PATH", help=".ckpt / .safetensors file or diffusers folder")
    gen.add_argument("--steps", type=int, help=f"sampling steps (default {GENERATE_DEFAULTS['steps']})")
    gen.add_argument(
        "--cfg",
        type=float,
        metavar="SCALE",
        help=f"classifier-free guidance scale; <= 1 turns it off (default {GENERATE_DEFAULTS['cfg']})",
    )
    gen.add_argument(
        "--sampler", help=f"sampler name, see 'sd samplers' (default {GENERATE_DEFAULTS['sampler']})"
    )
    gen.add_argument("--karras", action="store_true", default=None, help="Karras sigma schedule")
    gen.add_argument("--eta", type=float, default=0.0, help="DDIM eta (ddim only; default 0)")
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
    gen.add_argument("--clip-skip", type=int, help="use the N-th last CLIP layer (default 1)")
    gen.add_argument("--from-png", metavar="FILE", help="take the settings from a PNG made by sd (or A1111)")
    gen.add_argument("-o", "--output", metavar="OUT", help="FILE.png or folder (default ./outputs/)")
    gen.add_argument("--device", default="cpu", help="torch device (default cpu)")
    gen.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="compute dtype: bf16 is ~2x faster on CPUs with avx512_bf16/AMX (default fp32)",
    )
    gen.add_argument(
        "--vae-tiling",
        choices=("auto", "on", "off"),
        default="auto",
        help="decode the image in overlapping tiles: bounded memory for huge images, slightly different "
        "pixels (default auto: above 1024x1024)",
    )
    gen.add_argument(
        "--backend",
        choices=("torch", "openvino"),
        default="torch",
        help="openvino: run our modules converted by OpenVINO (pip install 'sd[openvino]')",
    )
    gen.set_defaults(run=cmd_generate)

    from .shapes import add_make_shapes_command
    from .train import add_train_command

    add_make_shapes_command(commands)
    add_train_command(commands)

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
