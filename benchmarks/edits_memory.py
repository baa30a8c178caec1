"""Peak memory of the big edits beside today's 1024² decode, at SD1.5 size (random weights): a 1024² hires
pass's pieces, and a 512² "only masked" inpaint of a 2048² photo.

    python benchmarks/edits_memory.py            # SD1.5, fp32, CPU: about 3 minutes on 2 cores
    python benchmarks/edits_memory.py --config tiny

Each piece is measured from a reset high-water mark (Linux: /proc/self/clear_refs), in one process holding
the four models: the final decode every 1024² image ends with, the VAE encode of the image upscalers'
1024² input, one CFG U-Net step (batch 2) on the second pass's 128² latents (the latent upscalers add an
interpolation of the latents only), and a whole inpaint (2 steps) of a 2048² photo with a small mask,
"only masked" at 512²: the crop is worked on at 512², then pasted back into the 2048² image.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from sd.config import SD15, TINY
from sd.pipeline import Pipeline
from sd.testing import random_models


def peak_gb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def inpaint_photo(pipe: Pipeline, side: int) -> None:
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))
    mask = Image.new("L", photo.size, 0)
    mask.paste(255, (side // 2, side // 2, side // 2 + side // 8, side // 2 + side // 8))
    native = pipe.native_size
    (out,) = pipe.inpaint(photo, mask, "a red circle", steps=2, strength=0.75, seed=0, sampler="euler",
                          inpaint_full_res=True, width=native, height=native)  # fmt: skip
    assert out.size == photo.size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("sd15", "tiny"), default="sd15")
    args = parser.parse_args()
    config = {"sd15": SD15, "tiny": TINY}[args.config]
    pipe = Pipeline(random_models(config, seed=0))
    down, size = config.vae.downscale, 1024
    latent = size // down
    generator = torch.Generator().manual_seed(0)
    print(f"models loaded: peak RSS {peak_gb():.2f} GB")
    context = torch.randn(2, 77, config.unet.context_dim, generator=generator)
    pieces = {
        f"decode {size}² (every {size}² image)": lambda: pipe.decode(torch.randn(1, 4, latent, latent)),
        f"encode {size}² (image upscalers)": lambda: pipe.encode_image(Image.new("RGB", (size, size)), None),
        f"U-Net CFG step, 2x4x{latent}² (the second pass)": lambda: pipe.models["diffusion"](
            torch.randn(2, 4, latent, latent, generator=generator), context, torch.tensor([500.0])
        ),
    }
    photo = f"inpaint {pipe.native_size}² of a {2 * size}² photo, only masked"
    pieces[photo] = lambda: inpaint_photo(pipe, 2 * size)
    for name, run in pieces.items():
        reset_peak()
        start = time.perf_counter()
        with torch.no_grad():
            run()
        print(f"{name}: peak RSS {peak_gb():.2f} GB, {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
