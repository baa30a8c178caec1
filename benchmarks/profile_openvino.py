"""Where our OpenVINO U-Net step's time goes: OpenVINO's per-layer profile, grouped by layer type, and the
GFLOP/s each kind of work achieves against the machine's matmul peak.

    python benchmarks/profile_openvino.py                         # bf16, 64×64 latents, batch 2 (CFG)
    python benchmarks/profile_openvino.py --precision f32 --size 32 --threads 1

Random SD1.5 weights; the first call converts and compiles (about a minute), a second warms up, and a
third runs with OpenVINO's PERF_COUNT on. FLOPs come from torch's FlopCounterMode on the graph OpenVINO
was given (the traced form: the U-Net's upsamplers as interpolate + 3x3 conv, see sd.kernels.upsample_conv):
convolutions for OpenVINO's Convolution layers, matmuls for FullyConnected, and scaled-dot-product
attention for the fused attention Subgraphs.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
from unittest import mock

import numpy as np
import torch
from bench import measure_peak
from torch.utils.flop_counter import FlopCounterMode

from sd.backends.openvino import compile_models
from sd.config import SD15
from sd.diffusion import timestep_embedding
from sd.models import build_models
from sd.testing import randomize_

# FlopCounterMode's op -> the OpenVINO layer type that runs it.
LAYER_OF_OP = {
    "convolution": "Convolution",
    "addmm": "FullyConnected",
    "mm": "FullyConnected",
    "bmm": "Subgraph",
}


def traced_flops(size: int) -> dict[str, float]:
    """FLOPs per OpenVINO layer type of one CFG U-Net call, counted on the meta device."""
    unet = build_models(SD15, device="meta")["diffusion"]
    latents = torch.empty(2, 4, size, size, device="meta")
    context = torch.empty(2, 77, SD15.unet.context_dim, device="meta")
    flops: dict[str, float] = collections.defaultdict(float)
    with mock.patch("torch.jit.is_tracing", return_value=True), FlopCounterMode(display=False) as counter:
        unet(latents, context, torch.full((2,), 999.0, device="meta"))
    for op, count in counter.get_flop_counts()["Global"].items():
        flops[LAYER_OF_OP.get(str(op).split(".")[-1], "other")] += count
    return flops


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--precision", default="bf16", choices=("bf16", "f32"))
    parser.add_argument("--size", type=int, default=64, help="latent side (64 = a 512² image)")
    parser.add_argument("--threads", type=int, help="CPU threads for OpenVINO and torch (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    models = build_models(SD15)
    randomize_(models["diffusion"], seed=0)
    with tempfile.TemporaryDirectory(prefix="sd-ov-profile-") as cache:
        unet = compile_models(models, args.precision, cache)["diffusion"]
        del models
        unet._compiler.config.update({"PERF_COUNT": "YES", "INFERENCE_NUM_THREADS": threads})
        gen = torch.Generator().manual_seed(0)
        latents = torch.randn(2, 4, args.size, args.size, generator=gen)
        context = torch.randn(2, 77, SD15.unet.context_dim, generator=gen)
        for _ in range(2):  # compile, then warm up
            unet(latents, context, 999)
        request = next(iter(unet._compiled.values())).create_infer_request()
        features = timestep_embedding(torch.full((2,), 999.0), unet.config.model_channels)
        request.infer([np.ascontiguousarray(t.numpy()) for t in (latents, context, features)])
        seconds: dict[str, float] = collections.defaultdict(float)
        for layer in request.get_profiling_info():
            seconds[layer.node_type] += layer.real_time.total_seconds()

    peak = max(
        measure_peak("bf16" if args.precision == "bf16" else "fp32", torch.device("cpu"), 2048).values()
    )
    flops = traced_flops(args.size)
    total = sum(seconds.values())
    print(
        f"U-Net step, 2×4×{args.size}×{args.size} latents, OpenVINO {args.precision}, {threads} threads: "
        f"{total:.3f} s in layers, {sum(flops.values()) / total / 1e9:.0f} GFLOP/s overall "
        f"(matmul peak {peak:.0f} GFLOP/s)\n"
    )
    print("| layer type | seconds | share | GFLOP | GFLOP/s | % of peak |")
    print("|---|---|---|---|---|---|")
    for kind, spent in sorted(seconds.items(), key=lambda item: -item[1]):
        if spent < 0.001 * total:
            continue
        work = flops.get(kind, 0.0) / 1e9
        rate = f"{work:.0f} | {work / spent:.0f} | {100 * work / spent / peak:.0f}%" if work else "— | — | —"
        print(f"| {kind} | {spent:.3f} | {100 * spent / total:.1f}% | {rate} |")


if __name__ == "__main__":
    main()
