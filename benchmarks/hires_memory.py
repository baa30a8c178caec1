"""Peak memory of a 1024² hires pass's pieces beside today's 1024² decode, at SD1.5 size (random weights).

    python benchmarks/hires_memory.py            # SD1.5, fp32, CPU: about 2 minutes on 2 cores
    python benchmarks/hires_memory.py --config tiny

Each piece is measured from a reset high-water mark (Linux: /proc/self/clear_refs), in one process holding
the four models: the final decode every 1024² image ends with, the VAE encode of the image upscalers'
1024² input, and one CFG U-Net step (batch 2) on the second pass's 128² latents. The latent upscalers add
an interpolation of the latents only.
"""

from __future__ import annotations

import argparse
import time

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
    for name, run in pieces.items():
        reset_peak()
        start = time.perf_counter()
        with torch.no_grad():
            run()
        print(f"{name}: peak RSS {peak_gb():.2f} GB, {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
