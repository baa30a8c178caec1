"""Where one U-Net step's time goes: torch.profiler top ops, ours vs diffusers, on the same random weights.

    python benchmarks/profile_unet.py                          # fp32 and bf16, 64×64 latents, batch 2
    python benchmarks/profile_unet.py --precisions fp32 --size 32 --threads 1 --top 20

Each contender is called once to warm up, then once under the profiler; the tables are sorted by self CPU
time, so the time of a kernel is not counted again in the ops that call it.
"""

from __future__ import annotations

import argparse
import time

import _peers
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from sd.config import SD15
from sd.models import build_models
from sd.testing import ldm_state_dict, randomize_

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def unets(dtype: torch.dtype, device: str) -> dict[str, nn.Module]:
    """Our Diffusion and diffusers' UNet2DConditionModel with the same random weights, in `dtype`."""
    ours = randomize_(build_models(SD15)["diffusion"], seed=0)
    theirs = _peers.diffusers_unet(ldm_state_dict({"diffusion": ours}), _peers.peer_configs(SD15), dtype)
    return {"ours": ours.to(device, dtype), "diffusers": theirs.to(device)}


def step(name: str, unet: nn.Module, latents: torch.Tensor, context: torch.Tensor, t: torch.Tensor) -> None:
    if name == "ours":
        unet(latents, context, t)
    else:
        unet(latents, t, encoder_hidden_states=context, return_dict=False)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--size", type=int, default=64, help="latent side (64 = a 512² image)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--top", type=int, default=15, help="ops per table")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    sort = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"

    for precision in args.precisions:
        dtype = DTYPES[precision]
        gen = torch.Generator().manual_seed(0)
        latents = torch.randn(2, 4, args.size, args.size, generator=gen).to(args.device, dtype)
        context = torch.randn(2, 77, 768, generator=gen).to(args.device, dtype)
        timestep = torch.tensor([999.0], device=args.device)
        for name, unet in unets(dtype, args.device).items():
            with torch.inference_mode():
                step(name, unet, latents, context, timestep)  # warm-up: oneDNN primitives, allocator
                start = time.perf_counter()
                with profile(activities=activities) as prof:
                    step(name, unet, latents, context, timestep)
                    if args.device == "cuda":
                        torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            print(
                f"\n## {name} {precision}, U-Net step 2×4×{args.size}×{args.size}: {elapsed:.2f} s profiled\n"
            )
            print(prof.key_averages().table(sort_by=sort, row_limit=args.top))


if __name__ == "__main__":
    main()
