"""Score a shapes model from its pixels: does it draw what the caption says?

    python benchmarks/eval_shapes.py                       # the built-in model, 100 captions
    python benchmarks/eval_shapes.py --ckpt my.safetensors --count 20 --cfg 3 5

Captions come from the dataset's grammar (`sd.shapes.random_caption`, seeds 0..count-1, so every run and
every model sees the same ones); each image is generated with the caption's seed and judged by
`sd.shapes.score_batch` (background colour, shape colour, kind, size, position, count, all at once).
Guidance is measured at CFG 5 and 7.5 (issue 4's range) and off (CFG 1.0), which shows how much the text
conditioning does.

img2img: a rendered dataset-style scene is re-generated under a different caption (other background).
At strength 0.3 the output should still show the input's layout (where the shapes are, how big); at 0.9
it should show the new caption. Colours follow the caption already at 0.3 under guidance: on these flat
images the background is one direction in latent space, and CFG pushes hard along it.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import sd
from sd.pipeline import Pipeline
from sd.shapes import SCORE_KEYS, Scene, layout_scene, random_caption, render_scene, sample_scene, score_batch

BUILTIN = Path(sd.__file__).resolve().parent / "data" / "shapes-builtin.safetensors"


def eval_captions(count: int, first_seed: int = 0) -> list[tuple[str, Scene]]:
    """(caption, stated scene) for seeds first_seed .. first_seed + count - 1."""
    return [random_caption(np.random.default_rng(seed)) for seed in range(first_seed, first_seed + count)]


def txt2img_scores(
    pipe: Pipeline,
    captions: list[tuple[str, Scene]],
    cfg_scale: float,
    steps: int = 20,
    size: int = 64,
    first_seed: int = 0,
) -> dict[str, float]:
    """score_batch over one image per caption, generated with seed first_seed + i."""
    images = [
        pipe.txt2img(text, width=size, height=size, steps=steps, cfg_scale=cfg_scale, seed=first_seed + i)[0]
        for i, (text, _) in enumerate(captions)
    ]
    return score_batch(images, [scene for _, scene in captions])


@dataclass(frozen=True)
class Img2ImgCase:
    """An input image with its truth, and a caption that differs from it (other background)."""

    image: object  # PIL image
    truth: Scene
    caption: str
    stated: Scene


def img2img_cases(count: int, size: int = 64, first_seed: int = 0) -> list[Img2ImgCase]:
    cases = []
    for seed in range(first_seed, first_seed + count):
        rng = np.random.default_rng([seed, 7])
        truth = sample_scene(rng)
        image = render_scene(truth, size, layout_scene(truth, rng))
        while True:  # a caption on another background, so "kept" and "followed" cannot both hold
            caption, stated = random_caption(rng)
            if stated.background not in (None, truth.background):
                break
        cases.append(Img2ImgCase(image, truth, caption, stated))
    return cases


def img2img_scores(
    pipe: Pipeline, cases: list[Img2ImgCase], strength: float, cfg_scale: float, steps: int = 20
) -> dict[str, dict[str, float]]:
    """Scores of img2img outputs against the input's scene ("input") and the new caption ("prompt")."""
    outputs = [
        pipe.img2img(case.image, case.caption, strength=strength, steps=steps, cfg_scale=cfg_scale, seed=i)[0]
        for i, case in enumerate(cases)
    ]
    return {
        "input": score_batch(outputs, [case.truth for case in cases]),
        "prompt": score_batch(outputs, [case.stated for case in cases]),
    }


def _row(label: str, scores: dict[str, float], keys: tuple[str, ...]) -> str:
    return f"{label:<34}" + "".join(f"{scores[k]:>12.0%}" for k in keys)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt", default=str(BUILTIN), help="checkpoint (default: the built-in model)")
    parser.add_argument("--count", type=int, default=100, help="captions (default 100)")
    parser.add_argument("--img2img-count", type=int, help="img2img inputs (default: --count; 0: skip)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    parser.add_argument(
        "--cfg",
        type=float,
        nargs="+",
        default=[5.0, 7.5],
        help="guidance scales to score beside CFG 1 (default 5 7.5; img2img uses the first)",
    )
    parser.add_argument("--size", type=int, default=64, help="image side (default 64)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    pipe = Pipeline.from_checkpoint(args.ckpt, device=args.device)
    captions = eval_captions(args.count)
    keys = (*SCORE_KEYS, "all")
    print(f"{args.ckpt}: {args.count} captions, {args.steps} steps, {args.size} px")
    print(f"{'txt2img':<34}" + "".join(f"{k:>12}" for k in keys))
    for cfg_scale in (*args.cfg, 1.0):
        scores = txt2img_scores(pipe, captions, cfg_scale, args.steps, args.size)
        print(_row(f"  CFG {cfg_scale:g}", scores, keys), flush=True)

    count = args.count if args.img2img_count is None else args.img2img_count
    if not count:
        return 0
    cases = img2img_cases(count, args.size)
    print(f"\nimg2img ({len(cases)} inputs, new caption on another background, CFG {args.cfg[0]:g})")
    print(f"{'':<34}" + "".join(f"{k:>12}" for k in keys))
    for strength in (0.3, 0.9):
        scores = img2img_scores(pipe, cases, strength, args.cfg[0], args.steps)
        print(_row(f"  strength {strength} vs input scene", scores["input"], keys))
        print(_row(f"  strength {strength} vs new caption", scores["prompt"], keys), flush=True)
    print(f"\n({time.time() - start:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
