"""The 4-step LCM-LoRA fast path, ours beside diffusers, on the same random SD1.5 weights and LoRA.

    python benchmarks/lcm_lora.py                          # SD1.5 shapes, 512², 4 steps, CFG 1
    python benchmarks/lcm_lora.py --config tiny --size 64  # a smoke run (seconds)

A random SD1.5 checkpoint and a random file in LCM-LoRA's shape (sd.testing.lcm_lora_like: kohya keys, the
278 U-Net layers, rank 64, fp16; 67.25 M parameters like the real 135 MB file) are written to a temporary
folder. Each contender loads them as its users would and makes 1 warm-up image (OpenVINO converts then:
timed apart) and `--images` timed ones, one after another (the machine holds one SD1.5 at a time):

- ours: `sd generate`'s path: `Pipeline.set_loras([(file, 1)])` (merged), A1111's LCM sampler, 4 steps,
  CFG 1 (one U-Net call per step), in fp32, bf16, and OpenVINO bf16 / f32 (`compile_checkpoint`).
- diffusers: `StableDiffusionPipeline` + `load_lora_weights(file)` + `fuse_lora()` + `LCMScheduler`, 4
  steps, guidance 1 (its CFG is off at <= 1), in fp32 and bf16: the usage the LCM-LoRA model card shows.

Per image: text encoding, the 4 steps, the VAE decode, and the whole image (median over the timed images).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _peers import diffusers_pipeline, openvino_version, peer_configs

from sd.config import SD15, TINY
from sd.params import GenerationParams
from sd.pipeline import Pipeline
from sd.testing import lcm_lora_like, random_models
from sd.weights import save_checkpoint

PROMPT = "a lighthouse at dusk, detailed, 8k"


class Parts:
    """Wall time spent inside wrapped callables, per part, for the image being made."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    def wrap(self, part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.times[part] = self.times.get(part, 0.0) + time.perf_counter() - start

        return timed


def measure(make: Callable[[], Any], parts: Parts, images: int) -> dict[str, float]:
    """Warm-up image, then median seconds per part over `images` timed ones."""
    start = time.perf_counter()
    make()
    first = time.perf_counter() - start
    rows: list[dict[str, float]] = []
    for _ in range(images):
        parts.times = {}
        start = time.perf_counter()
        make()
        total = time.perf_counter() - start
        rows.append({**parts.times, "total": total})
    out = {key: statistics.median(r.get(key, 0.0) for r in rows) for key in rows[0]}
    out["steps"] = out["total"] - out.get("text", 0.0) - out.get("decode", 0.0)
    out["first"] = first
    return out


def ours(ckpt: Path, lora: Path, mode: str, size: int, images: int) -> dict[str, float]:
    if mode.startswith("openvino"):
        from sd.backends.openvino import compile_checkpoint

        pipe = Pipeline(compile_checkpoint(ckpt, mode.removeprefix("openvino "), tempfile.mkdtemp()))
    else:
        pipe = Pipeline.from_checkpoint(ckpt, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[mode])
    pipe.set_loras([(lora, 1.0)])
    parts = Parts()
    pipe.condition = parts.wrap("text", pipe.condition)
    pipe.decode = parts.wrap("decode", pipe.decode)
    params = GenerationParams(PROMPT, steps=4, sampler="LCM", cfg_scale=1.0, a1111=True, seed=1,
                              width=size, height=size)  # fmt: skip
    return measure(lambda: pipe.run(params), parts, images)


def diffusers(ckpt: Path, lora: Path, mode: str, size: int, images: int, config) -> dict[str, float]:
    from diffusers import LCMScheduler

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[mode]
    dconf = peer_configs(config)
    pipe = diffusers_pipeline(ckpt, dconf, dtype)
    pipe.scheduler = LCMScheduler.from_config(dconf["scheduler"])
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    pipe.fuse_lora()
    parts = Parts()
    pipe.encode_prompt = parts.wrap("text", pipe.encode_prompt)
    pipe.vae.decode = parts.wrap("decode", pipe.vae.decode)
    generator = torch.Generator().manual_seed(1)

    def make() -> Any:
        return pipe(PROMPT, num_inference_steps=4, guidance_scale=1.0, height=size, width=size,
                    generator=generator.manual_seed(1))  # fmt: skip

    return measure(make, parts, images)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", choices=("sd15", "tiny"), default="sd15")
    parser.add_argument("--size", type=int, default=512, help="image side (default 512)")
    parser.add_argument("--images", type=int, default=3, help="timed images per contender (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default torch's)")
    parser.add_argument("--modes", nargs="*", default=None, help="subset, e.g. 'ours openvino bf16'")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = SD15 if args.config == "sd15" else TINY
    modes = ["ours fp32", "ours bf16", "diffusers fp32", "diffusers bf16"]
    if openvino_version():
        modes[2:2] = ["ours openvino bf16", "ours openvino f32"]
    modes = [m for m in modes if not args.modes or m in args.modes]

    folder = Path(tempfile.mkdtemp(prefix="lcm-bench-"))
    ckpt, lora = folder / "model.safetensors", folder / "lcm-lora-sdv1-5.safetensors"
    print(
        f"writing a random {args.config} checkpoint and LCM-LoRA-shaped file to {folder} ...", file=sys.stderr
    )
    save_checkpoint(random_models(config, seed=0), ckpt, config=config)
    save_file(lcm_lora_like(config, rank=64 if config == SD15 else 4), str(lora))
    results = {}
    for mode in modes:
        print(f"{mode} ...", file=sys.stderr)
        who, _, precision = mode.partition(" ")
        if who == "ours":
            results[mode] = ours(ckpt, lora, precision, args.size, args.images)
        else:
            results[mode] = diffusers(ckpt, lora, precision, args.size, args.images, config)
        gc.collect()
        print(f"  {results[mode]}", file=sys.stderr)

    threads = args.threads or torch.get_num_threads()
    print(f"**{args.config} {args.size}², LCM-LoRA (rank 64 for SD1.5), 4 steps, CFG 1, {threads} threads, "
          f"median of {args.images} warm images (seconds)**\n")  # fmt: skip
    print("| contender | text | 4 steps | decode | image | first image | image ÷ diffusers same precision |")
    print("|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        precision = "bf16" if "bf16" in mode else "fp32"
        peer = results.get(f"diffusers {precision}")
        ratio = f"{r['total'] / peer['total']:.2f}" if peer and not mode.startswith("diffusers") else ""
        print(f"| {mode} | {r.get('text', 0):.2f} | {r['steps']:.2f} | {r.get('decode', 0):.2f} | "
              f"{r['total']:.2f} | {r['first']:.1f} | {ratio} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
