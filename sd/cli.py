"""The `sd` command line.

Every expected failure (bad file, bad argument) ends in one line on stderr and a non-zero exit;
tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def cmd_info(args: argparse.Namespace) -> int:
    from .weights import describe, format_description

    info = describe(args.path)
    print(format_description(info))
    return 0 if info.usable else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sd",
        description="Stable Diffusion v1.5 from scratch: inspect checkpoints and generate images.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    from .weights import CheckpointError

    try:
        return args.run(args)
    except (CheckpointError, ValueError, OSError) as error:
        print(f"sd {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sd {args.command}: interrupted", file=sys.stderr)
        return 130
