"""Speed and memory of our SD1.5 against diffusers (eager PyTorch) and OpenVINO, side by side.

    python benchmarks/bench.py --quick                   # a first look (skips the 512² whole image)
    python benchmarks/bench.py --json results.json       # full mode: what closing notes quote
    python benchmarks/bench.py --config tiny --quick     # smoke run (seconds)

One random SD1.5 checkpoint is written to a temporary .safetensors file. Ours loads it with
`sd.load_models`; diffusers gets the same tensors through its own single-file converters; OpenVINO
converts diffusers' modules. For each row, the contenders of one precision run in rounds (ours, peers,
ours, peers, ...) after a warm-up, so the slow drifts of a shared machine hit all of them alike. The
table gives the median (and min) per contender and, per peer, the median over rounds of ours/peer.

A mode is one entry of MODES: a function (bench, row, inputs) -> zero-argument callable that runs the
row once (or None when the mode cannot run that row). Adding torch.compile, say, is one more entry.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _peers
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sd.backends.openvino import precision_for
from sd.config import SD15, TINY, ModelConfig
from sd.models import build_models
from sd.pipeline import Pipeline
from sd.testing import random_models
from sd.tokenizer import CLIPTokenizer
from sd.weights import load_models, save_checkpoint

WORKER = Path(__file__).with_name("_worker.py")
OPENVINO_CACHE = "sd-openvino"  # our backend's IR cache, under the bench's folder
PROMPT = "a watercolor painting of a lighthouse at dusk"
STEPS, CFG_SCALE, SAMPLER = 20, 7.5, "dpmpp_2m"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The half precision each device races in: bf16 on CPUs (what diffusers users run there), fp16 on GPUs.
PRECISIONS = {"cpu": ("fp32", "bf16"), "cuda": ("fp32", "fp16")}
PEERS = ("diffusers", "openvino")


@dataclass(frozen=True)
class Row:
    """One line group of the table."""

    key: str  # what --rows takes
    title: str
    kind: str  # unet | decode | encode | text | txt2img | cold | big-decode | hires | inpaint
    size: int = 0  # image side in pixels
    quick: bool = True  # part of --quick
    fresh: bool = False  # measured in a fresh process per run (time and peak RSS)


ROWS = (
    Row("unet64", "U-Net step, 2×4×64×64 latents (512², CFG)", "unet", 512),
    Row("unet32", "U-Net step, 2×4×32×32 latents (256², CFG)", "unet", 256),
    Row("decode512", "VAE decode → 512²", "decode", 512),
    Row("decode256", "VAE decode → 256²", "decode", 256),
    Row("encode512", "VAE encode 512²", "encode", 512),
    Row("encode256", "VAE encode 256²", "encode", 256),
    Row("text", "text encoder, 2×77 tokens", "text"),
    Row("txt2img256", f"txt2img 256², {STEPS} steps DPM++ 2M", "txt2img", 256),
    Row("txt2img512", f"txt2img 512², {STEPS} steps DPM++ 2M", "txt2img", 512, quick=False, fresh=True),
    Row("cold", "cold start → first U-Net step (64×64)", "cold", 512, fresh=True),
    # Large decodes, each side as its users would run it: ours in the pipeline's auto mode (tiled above
    # 1024²), diffusers with vae.enable_tiling() above 1024² (untiled, it needs ~4x our peak at 2048²).
    Row("decode1024", "VAE decode → 1024² (own default)", "big-decode", 1024, quick=False, fresh=True),
    Row("decode2048", "VAE decode → 2048² (tiled)", "big-decode", 2048, quick=False, fresh=True),
    # The hires fix, 512² -> 1024² (Latent, strength 0.5, 20 hires steps: 10 run in diffusers' way). Diffusers
    # has none: its row is its txt2img at 512² (latents out) + F.interpolate + its img2img at 1024², the
    # composition our diffusers way equals (tests/test_hires.py). Peak RSS: to set beside decode1024's.
    Row(
        "hires1024",
        f"hires fix 512² → 1024², {STEPS} + 10 steps DPM++ 2M",
        "hires",
        512,
        quick=False,
        fresh=True,
    ),
)
# Inpainting 512² (a centred 256² mask, strength 0.75, 20 steps DPM++ 2M, the 4-channel blend) in diffusers'
# way on both sides: diffusers' StableDiffusionInpaintPipeline, which ours equals (tests/test_inpaint.py).
ROWS += (Row("inpaint512", f"inpaint 512², {STEPS} steps DPM++ 2M, strength 0.75", "inpaint", 512,
             quick=False, fresh=True),)  # fmt: skip
MODULE_KINDS = ("unet", "decode", "encode", "text")

Inputs = dict[str, torch.Tensor]
Runner = Callable[[], object]


# ---------------------------------------------------------------------------------------------------------
# The session: device, weights file, caches
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Bench:
    """What every mode builder may use: the device, the checkpoint, our fp32 models, caches."""

    config: ModelConfig
    device: torch.device
    workdir: Path
    checkpoint: Path
    config_folder: Path  # diffusers configs, for from_single_file
    dconf: dict[str, Any]
    ours: dict[str, nn.Module]  # fp32, loaded once with sd.load_models
    openvino: str | None  # version, None when not importable
    _cache: dict[str, Any] = field(default_factory=dict)
    _ir: dict[str, Path] = field(default_factory=dict)

    def cached(self, key: str, make: Callable[[], Any]) -> Any:
        """`make()` once per group of rows (see `release`)."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def release(self) -> None:
        """Free the group's models: full SD1.5 copies are 2-4 GB each, and only a few fit at once."""
        self._cache.clear()
        gc.collect()

    def sync(self) -> None:
        bench_sync(self.device)

    def ours_openvino(self, precision: str) -> dict[str, Any]:
        """Our backend over our fp32 models; its IR cache lives in the bench's folder (OPENVINO_CACHE)."""
        from sd.backends.openvino import compile_models

        cache = self.workdir / OPENVINO_CACHE
        return compile_models(self.ours, precision, cache, weights_id=self.checkpoint.name)

    def openvino_ir(self, kind: str, example: Inputs) -> Path:
        """diffusers' module for `kind` converted to OpenVINO IR once (on disk, fp32 weights)."""
        if kind not in self._ir:
            # The same cache keys as the diffusers fp32 mode: export reuses the module it already built.
            wrap: dict[str, Callable[[], nn.Module]] = {
                "unet": lambda: _peers.UNetForExport(self.cached("diffusers fp32 unet", self.peer_unet)),
                "decode": lambda: _peers.VAEDecodeForExport(self.cached("diffusers fp32 vae", self.peer_vae)),
                "encode": lambda: _peers.VAEEncodeForExport(self.cached("diffusers fp32 vae", self.peer_vae)),
                "text": lambda: _peers.TextEncoderForExport(
                    self.cached("diffusers fp32 text", self.peer_text_encoder)
                ),
            }
            example = {k: v.cpu() for k, v in example.items()}
            xml = self.workdir / f"openvino-{kind}.xml"
            self._ir[kind] = _peers.export_openvino(wrap[kind](), tuple(example.values()), xml)
            gc.collect()
        return self._ir[kind]

    # The peers' modules on the bench's device, in `dtype`, built from the checkpoint file.

    def peer_unet(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        return _peers.diffusers_unet(self.checkpoint, self.dconf, dtype).to(self.device)

    def peer_vae(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        return _peers.diffusers_vae(self.checkpoint, self.dconf, dtype).to(self.device)

    def peer_text_encoder(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        return _peers.transformers_text_encoder(self.checkpoint, self.dconf, dtype).to(self.device)


def make_inputs(row: Row, config: ModelConfig, device: torch.device | str) -> Inputs:
    """The row's fp32 inputs (token ids for the text encoder), seeded. Dict order = call order."""
    gen = torch.Generator().manual_seed(0)
    latent = row.size // config.vae.downscale
    if row.kind == "unet":
        inputs = {
            "latents": torch.randn(2, config.unet.in_channels, latent, latent, generator=gen),
            "context": torch.randn(2, config.clip.max_length, config.unet.context_dim, generator=gen),
            "timestep": torch.tensor([999.0]),  # stays fp32 in every mode, as the pipelines keep it
        }
    elif row.kind == "decode":
        inputs = {"latents": torch.randn(1, config.vae.latent_channels, latent, latent, generator=gen)}
    elif row.kind == "encode":
        inputs = {"image": torch.rand(1, config.vae.in_channels, row.size, row.size, generator=gen) * 2 - 1}
    elif row.kind == "text":
        ids = CLIPTokenizer().batch_encode_plus(["", PROMPT], padding="max_length", max_length=77).input_ids
        inputs = {"ids": torch.tensor(ids)}
    else:
        inputs = {}
    return {k: v.to(device) for k, v in inputs.items()}


def cast(inputs: Inputs, precision: str) -> Inputs:
    """Activations in the mode's dtype; token ids and the timestep as they are."""
    dtype = DTYPES[precision]
    return {k: v.to(dtype) if k in ("latents", "context", "image") else v for k, v in inputs.items()}


# ---------------------------------------------------------------------------------------------------------
# Modes: ours and the peers. Each builds a zero-argument runner for a row, or None if it cannot run it.
# ---------------------------------------------------------------------------------------------------------


def ours_runner(
    models: dict[str, nn.Module], row: Row, x: Inputs, device: torch.device | str = "cpu"
) -> Runner | None:
    """Our modules (whatever dtype/backend `models` are in) called as the pipeline calls them."""
    if row.kind == "unet":
        unet = models["diffusion"]
        return lambda: unet(x["latents"], x["context"], x["timestep"])
    if row.kind == "decode":
        decoder = models["decoder"]
        return lambda: decoder(x["latents"])
    if row.kind == "encode":
        encoder = models["encoder"]
        return lambda: encoder.encode(x["image"]).mean
    if row.kind == "text":
        clip = models["clip"]
        return lambda: clip(x["ids"])
    if row.kind == "txt2img":
        pipe = Pipeline(models, device=device)
        return lambda: pipe.txt2img(
            PROMPT, width=row.size, height=row.size, steps=STEPS, cfg_scale=CFG_SCALE, sampler=SAMPLER, seed=0
        )
    return None


def ours_eager(precision: str) -> Callable[[Bench, Row, Inputs], Runner | None]:
    """Our PyTorch modules, eager, weights loaded in `precision` by sd.load_models."""

    def build(bench: Bench, row: Row, inputs: Inputs) -> Runner | None:
        dtype = DTYPES[precision]
        if dtype == torch.float32:
            models = bench.ours
        else:
            models = bench.cached(
                f"ours {precision}", lambda: load_models(bench.checkpoint, bench.device, dtype=dtype)
            )
        return ours_runner(models, row, cast(inputs, precision), bench.device)

    return build


def diffusers_eager(precision: str) -> Callable[[Bench, Row, Inputs], Runner | None]:
    """diffusers' UNet2DConditionModel / AutoencoderKL, transformers' CLIPTextModel, StableDiffusionPipeline;
    weights in `precision` (on CUDA diffusers' default attention is SDPA)."""

    def build(bench: Bench, row: Row, inputs: Inputs) -> Runner | None:
        dtype, x = DTYPES[precision], cast(inputs, precision)
        if row.kind == "unet":
            unet = bench.cached(f"diffusers {precision} unet", lambda: bench.peer_unet(dtype))
            return lambda: unet(
                x["latents"], x["timestep"], encoder_hidden_states=x["context"], return_dict=False
            )
        if row.kind in ("decode", "encode"):
            vae = bench.cached(f"diffusers {precision} vae", lambda: bench.peer_vae(dtype))
            if row.kind == "decode":
                scale = vae.config.scaling_factor  # our Decoder divides by it itself
                return lambda: vae.decode(x["latents"] / scale, return_dict=False)
            return lambda: vae.encode(x["image"], return_dict=False)[0].mean
        if row.kind == "text":
            text_encoder = bench.cached(f"diffusers {precision} text", lambda: bench.peer_text_encoder(dtype))
            return lambda: text_encoder(x["ids"], return_dict=False)
        if row.kind == "txt2img":
            pipe = bench.cached(
                f"diffusers {precision} pipeline",
                lambda: _peers.diffusers_pipeline(bench.checkpoint, bench.dconf, dtype).to(bench.device),
            )
            return lambda: pipe(
                PROMPT,
                height=row.size,
                width=row.size,
                num_inference_steps=STEPS,
                guidance_scale=CFG_SCALE,
                generator=torch.Generator().manual_seed(0),
            )
        return None

    return build


def openvino_compiled(precision: str) -> Callable[[Bench, Row, Inputs], Runner | None]:
    """OpenVINO CPU plugin on diffusers' modules, compiled for the row's static shapes with
    INFERENCE_PRECISION_HINT f32 / bf16 (fp32 weights in the IR; the plugin converts)."""
    hint = precision_for(precision)

    def build(bench: Bench, row: Row, inputs: Inputs) -> Runner | None:
        if bench.openvino is None or row.kind not in MODULE_KINDS or bench.device.type != "cpu":
            return None
        arrays = [v.numpy() for v in inputs.values()]
        xml = bench.openvino_ir(row.kind, inputs)
        # The same number of threads as torch uses (OpenVINO would otherwise pick its own).
        runner = _peers.OpenVINORunner(xml, [a.shape for a in arrays], hint, torch.get_num_threads())
        return lambda: runner(*arrays)

    return build


def ours_openvino(precision: str) -> Callable[[Bench, Row, Inputs], Runner | None]:
    """Our modules through sd.backends.openvino (`--backend openvino`): traced once into IR cached in the
    bench's folder, compiled per shape with inference precision f32 / bf16."""
    hint = precision_for(precision)

    def build(bench: Bench, row: Row, inputs: Inputs) -> Runner | None:
        if bench.openvino is None or bench.device.type != "cpu":
            return None
        models = bench.cached(f"ours openvino {precision}", lambda: bench.ours_openvino(hint))
        return ours_runner(models, row, inputs, bench.device)

    return build


@dataclass(frozen=True)
class Mode:
    name: str  # its label in the table
    family: str  # "ours" or one of PEERS
    precision: str  # fp32 | bf16 | fp16
    build: Callable[[Bench, Row, Inputs], Runner | None]
    devices: tuple[str, ...] = ("cpu", "cuda")
    worker: str | None = None  # side _worker.py runs for fresh-process rows ("ours"/"diffusers"), if any


MODES = (
    Mode("ours fp32", "ours", "fp32", ours_eager("fp32"), worker="ours"),
    Mode("ours bf16", "ours", "bf16", ours_eager("bf16"), devices=("cpu",), worker="ours"),
    Mode("ours fp16", "ours", "fp16", ours_eager("fp16"), devices=("cuda",), worker="ours"),
    Mode("diffusers fp32", "diffusers", "fp32", diffusers_eager("fp32"), worker="diffusers"),
    Mode(
        "diffusers bf16", "diffusers", "bf16", diffusers_eager("bf16"), devices=("cpu",), worker="diffusers"
    ),
    Mode(
        "diffusers fp16", "diffusers", "fp16", diffusers_eager("fp16"), devices=("cuda",), worker="diffusers"
    ),
    Mode(
        "ours openvino f32", "ours", "fp32", ours_openvino("fp32"), devices=("cpu",), worker="ours-openvino"
    ),
    Mode(
        "ours openvino bf16", "ours", "bf16", ours_openvino("bf16"), devices=("cpu",), worker="ours-openvino"
    ),
    Mode("openvino f32", "openvino", "fp32", openvino_compiled("fp32"), devices=("cpu",)),
    Mode("openvino bf16", "openvino", "bf16", openvino_compiled("bf16"), devices=("cpu",)),
)


# ---------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Result:
    """One contender on one row."""

    row: str
    mode: str
    family: str
    precision: str
    times: list[float] = field(default_factory=list)  # seconds, one per timed round
    note: str = ""  # why there are no times, or what else to know
    peak_rss_gb: float | None = None  # fresh-process rows
    peak_cuda_gb: float | None = None  # fresh-process rows on CUDA: torch.cuda.max_memory_allocated
    phases: dict[str, float] = field(default_factory=dict)  # fresh-process rows: where the time went

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None

    @property
    def min(self) -> float | None:
        return min(self.times) if self.times else None


_STARTED = time.perf_counter()


def log(message: str) -> None:
    """Progress on stderr, stamped with seconds since start (stdout carries only the tables)."""
    print(f"[{time.perf_counter() - _STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


def matmul_kernels(device: torch.device) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """The matmuls a peak is measured with. On CPUs torch's fp32 matmul is MKL's sgemm, which on AMD CPUs
    may skip AVX-512; oneDNN's (what torch runs convolutions, bf16 matmuls and frozen compiled linears on)
    can be twice as fast there, so both are measured and the best one is the roofline."""
    kernels: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"torch.matmul": torch.matmul}
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        kernels["oneDNN matmul"] = lambda a, b: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    return kernels


def measure_peak(precision: str, device: torch.device, n: int, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of each matmul kernel in `precision`: the best of `repeats` n×n by n×n products."""
    a = torch.randn(n, n, device=device).to(DTYPES[precision])
    b = torch.randn(n, n, device=device).to(DTYPES[precision])
    found = {}
    for name, matmul in matmul_kernels(device).items():
        best = float("inf")
        try:
            for _ in range(repeats + 1):  # the first one warms up
                bench_sync(device)
                start = time.perf_counter()
                matmul(a, b)
                bench_sync(device)
                best = min(best, time.perf_counter() - start)
        except RuntimeError as error:  # a kernel this build lacks for this dtype: measure the others
            log(f"  {name} {precision}: {error}")
            continue
        found[name] = 2 * n**3 / best / 1e9
    return found


def bench_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(row: Row, config: ModelConfig) -> int | None:
    """FLOPs of one call of our module for the row, counted on the meta device (costs no compute)."""
    if row.kind not in MODULE_KINDS:
        return None
    models = build_models(config, device="meta")
    inputs = {k: torch.empty_like(v, device="meta") for k, v in make_inputs(row, config, "cpu").items()}
    run = ours_runner(models, row, inputs)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        run()
    return counter.get_total_flops()


def race(
    bench: Bench, runners: dict[str, Runner], warmup: int, repeats: int, results: dict[str, Result]
) -> None:
    """Round-robin: every contender once per round, in order; `warmup` rounds are not recorded.
    A contender that raises is dropped with its error noted; the others go on."""
    live = dict(runners)
    for round_ in range(warmup + repeats):
        for name, run in list(live.items()):
            try:
                bench.sync()
                start = time.perf_counter()
                with torch.inference_mode():
                    run()
                bench.sync()
                elapsed = time.perf_counter() - start
            except Exception as error:  # report it as measured: failing is a result too
                results[name].note = f"failed: {type(error).__name__}: {str(error)[:200]}"
                log(f"    {name}: {results[name].note}")
                del live[name]
                continue
            if round_ >= warmup:
                results[name].times.append(elapsed)
            log(f"    {name}: {elapsed:.3f} s{'  (warm-up)' if round_ < warmup else ''}")


def build_runners(
    bench: Bench, row: Row, group: list[Mode], inputs: Inputs, measured: dict[str, Result]
) -> dict[str, Runner]:
    """Each mode's runner for the row; modes that cannot run it, or fail to build, get a note instead."""
    runners: dict[str, Runner] = {}
    for mode in group:
        try:
            runner = mode.build(bench, row, inputs)
        except Exception as error:  # reported in the table's notes; the other contenders still race
            measured[mode.name].note = f"failed to build: {type(error).__name__}: {str(error)[:200]}"
            log(f"    {mode.name}: {measured[mode.name].note}")
            continue
        if runner is None:
            measured[mode.name].note = "n/a"
        else:
            runners[mode.name] = runner
    return runners


def run_in_process(
    bench: Bench, rows: list[Row], modes: list[Mode], args: argparse.Namespace
) -> list[Result]:
    """Module and whole-image rows, grouped by kind and precision so each group's models are built once."""
    results: list[Result] = []
    kinds = list(dict.fromkeys(row.kind for row in rows))
    for kind in kinds:
        for precision in dict.fromkeys(m.precision for m in modes):
            group = [m for m in modes if m.precision == precision]
            for row in (r for r in rows if r.kind == kind):
                log(f"{row.key} ({precision})")
                inputs = make_inputs(row, bench.config, bench.device)
                measured = {m.name: Result(row.key, m.name, m.family, precision) for m in group}
                runners = build_runners(bench, row, group, inputs, measured)
                whole = row.kind == "txt2img"
                warmup = 0 if whole else args.warmup
                race(bench, runners, warmup, args.image_repeats if whole else args.repeats, measured)
                del runners  # OpenVINO compiled models live in their runner only: free them now
                results += measured.values()
            bench.release()
    return results


def run_fresh(bench: Bench, rows: list[Row], modes: list[Mode], args: argparse.Namespace) -> list[Result]:
    """Cold start, the 512² image and large decodes: one fresh process per run (sides alternating)."""
    results: list[Result] = []
    # Our OpenVINO side only where OpenVINO is in this run (importable and not left out by --peers).
    sides = [m for m in modes if m.worker and (m.worker != "ours-openvino" or bench.openvino is not None)]
    if rows and bench.openvino is not None and any(m.worker == "ours-openvino" for m in sides):
        # Convert our IR once up front (a tiny image runs every component the image rows use), so the
        # fresh processes time what a second `sd generate --backend openvino` costs: reading and compiling.
        log("ours openvino: converting to IR (once)")
        if not bench.ours:  # the parent let its copies go: load them for the conversion only
            bench.ours = load_models(bench.checkpoint, bench.device)
        Pipeline(bench.ours_openvino("f32")).txt2img("warm-up", width=64, height=64, steps=1, seed=0)
        bench.ours = {}
        bench.release()
    for row in rows:
        precisions = list(dict.fromkeys(m.precision for m in sides))[: 1 if args.quick else None]
        rounds = (
            1
            if (args.quick or row.kind in ("txt2img", "big-decode", "hires", "inpaint"))
            else args.cold_repeats
        )
        for precision in precisions:
            log(f"{row.key} ({precision}, fresh process per run)")
            contenders = [m for m in sides if m.precision == precision]
            if row.kind in (
                "big-decode",
                "hires",
                "inpaint",
            ):  # the OpenVINO backend: whole images at compiled sizes
                contenders = [m for m in contenders if m.worker != "ours-openvino"]
            measured = {m.name: Result(row.key, m.name, m.family, precision) for m in contenders}
            for _ in range(rounds):
                for mode in contenders:
                    task = {
                        "task": row.kind,
                        "side": mode.worker,
                        "precision": precision,
                        "checkpoint": str(bench.checkpoint),
                        "config_folder": str(bench.config_folder),
                        "device": str(bench.device),
                        "latent": row.size // bench.config.vae.downscale,
                        "latent_channels": bench.config.vae.latent_channels,
                        "context_dim": bench.config.unet.context_dim,
                        "size": row.size,
                        "steps": STEPS,
                        "threads": torch.get_num_threads(),
                        "openvino_cache": str(bench.workdir / OPENVINO_CACHE),
                    }
                    timed = {
                        "txt2img": "image",
                        "big-decode": "decode",
                        "hires": "image",
                        "inpaint": "image",
                    }.get(row.kind)
                    fresh_run(task, measured[mode.name], timed)
            results += measured.values()
    return results


def fresh_run(task: dict[str, Any], result: Result, timed_phase: str | None) -> None:
    """Run `_worker.py` once; record its time (total, or one phase) and peak RSS into `result`."""
    task = {**task, "spawned": time.time()}
    proc = subprocess.run([sys.executable, str(WORKER), json.dumps(task)], capture_output=True, text=True)
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        result.note = f"failed: {last[0][:200]}"
        log(f"    {result.mode}: {result.note}")
        return
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    result.times.append(out["phases"][timed_phase] if timed_phase else out["total_s"])
    result.peak_rss_gb = max(result.peak_rss_gb or 0.0, out["peak_rss_gb"])
    if "peak_cuda_gb" in out:
        result.peak_cuda_gb = max(result.peak_cuda_gb or 0.0, out["peak_cuda_gb"])
    result.phases = out["phases"]
    phases = ", ".join(f"{k} {v:.1f}" for k, v in out["phases"].items())
    log(f"    {result.mode}: {out['total_s']:.1f} s ({phases}), peak RSS {out['peak_rss_gb']:.2f} GB")


# ---------------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------------


def paired_ratio(ours: Result, peer: Result) -> float | None:
    """Median over rounds of ours/peer, each pair timed back to back (< 1: ours is faster)."""
    pairs = [a / b for a, b in zip(ours.times, peer.times, strict=False)]
    return statistics.median(pairs) if pairs else None


def row_report(row: Row, results: list[Result], flops: int | None, peaks: dict[str, float]) -> dict[str, Any]:
    """One row of the JSON report: every contender's times and, per ours mode, ratios and GFLOP/s."""
    mine = [r for r in results if r.row == row.key]
    ratios: dict[str, dict[str, float | None]] = {}
    gflops: dict[str, dict[str, float]] = {}
    for ours in (r for r in mine if r.family == "ours"):
        peers = [r for r in mine if r.family != "ours" and r.precision == ours.precision]
        ratios[ours.mode] = {peer.mode: paired_ratio(ours, peer) for peer in peers}
        if flops and ours.median:
            achieved = flops / ours.median / 1e9
            gflops[ours.mode] = {"gflops": achieved, "fraction_of_peak": achieved / peaks[ours.precision]}
    return {
        "key": row.key,
        "title": row.title,
        "kind": row.kind,
        "flops": flops,
        "results": [{**vars(r), "median": r.median, "min": r.min} for r in mine],
        "ratios": ratios,
        "gflops": gflops,
    }


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def _cell(result: dict[str, Any] | None) -> str:
    """'median (min)' seconds, or why there is none."""
    if result is None:
        return "—"
    if result["median"] is None:
        return "n/a" if result["note"] in ("", "n/a") else "failed"
    return f"{_seconds(result['median'])} ({_seconds(result['min'])})"


def markdown(report: dict[str, Any]) -> str:
    """The tables, in markdown, ready to paste into a note."""
    meta, peaks, kernels = report["meta"], report["peak_gflops"], report["peak_kernels"]
    peers = [p for p in PEERS if any(r["family"] == p for row in report["rows"] for r in row["results"])]
    lines = [
        f"### Speed: ours vs {' and '.join(peers) or 'nobody'} ({meta['config']} config, random weights)",
        "",
        f"{meta['date']} · {meta['cpu']} · {meta['cores']} cores, {meta['ram_gb']:.0f} GB RAM · device "
        f"{meta['device']} · torch {meta['torch']} (threads: {meta['threads']}), "
        f"diffusers {meta['diffusers']}, transformers {meta['transformers']}, "
        f"OpenVINO {meta['openvino'] or 'not installed'} · "
        f"{'quick' if meta['quick'] else 'full'} mode, {meta['wall_s'] / 60:.1f} min",
        "",
        "Measured peak (best n×n matmul, n = "
        + f"{meta['peak_n']}, best of 5 at start and 5 at end): "
        + "; ".join(
            f"**{p} {peaks[p]:.0f} GFLOP/s** ("
            + ", ".join(f"{name} {v:.0f}" for name, v in kernels[p].items())
            + ")"
            for p in peaks
        )
        + ".",
        "",
    ]
    header = ["row", "ours", "ours s"]
    for peer in peers:
        header += [f"{peer} s", f"ours ÷ {peer}"]
    header.append("ours GFLOP/s (% of peak)")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in report["rows"]:
        first = True
        for ours in (r for r in row["results"] if r["family"] == "ours"):
            if ours["note"] == "n/a" and not ours["times"]:
                continue  # a mode this run cannot have (e.g. OpenVINO left out): no line
            cells = [row["title"] if first else "", ours["mode"], _cell(ours)]
            for peer in peers:
                same = [
                    r for r in row["results"] if r["family"] == peer and r["precision"] == ours["precision"]
                ]
                ratio = row["ratios"][ours["mode"]].get(same[0]["mode"]) if same else None
                cells += [_cell(same[0] if same else None), "—" if ratio is None else f"{ratio:.2f}"]
            g = row["gflops"].get(ours["mode"])
            cells.append(f"{g['gflops']:.0f} ({g['fraction_of_peak']:.0%})" if g else "")
            lines.append("| " + " | ".join(cells) + " |")
            first = False
    lines += [
        "",
        f"Seconds: median (min) over {meta['repeats']} rounds after {meta['warmup']} warm-up round(s) "
        f"for module rows; whole images: {meta['image_repeats']} round(s), no warm-up; fresh processes: "
        "see below. "
        "Contenders of one precision run in turn within each round. ours ÷ peer: median over rounds of the "
        "ratio of the two times of the same round (< 1: ours faster). GFLOP/s: FLOPs of our module "
        "(torch FlopCounterMode) / our median time, against the matmul peak of that precision.",
    ]
    fresh = [(row, r) for row in report["rows"] for r in row["results"] if r["peak_rss_gb"] is not None]
    if fresh:
        lines += [
            "",
            "Fresh process per run (time from process start; the checkpoint is in the page cache):",
            "",
            "| row | mode | seconds | where the time went (last run) | peak RSS GB |",
            "|---|---|---|---|---|",
        ]
        for row, r in fresh:
            phases = ", ".join(f"{k} {v:.1f}" for k, v in r["phases"].items())
            memory = f"{r['peak_rss_gb']:.2f}"
            if r["peak_cuda_gb"] is not None:
                memory += f" (CUDA {r['peak_cuda_gb']:.2f})"
            lines.append(f"| {row['title']} | {r['mode']} | {_cell(r)} | {phases} | {memory} |")
    notes = list(report["notes"])
    notes += [
        f"{r['mode']} on {row['key']}: {r['note']}"
        for row in report["rows"]
        for r in row["results"]
        if r["note"] not in ("", "n/a")
    ]
    if notes:
        lines += ["", "Notes:", *[f"- {note}" for note in notes]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import os

    cpu = platform.processor() or platform.machine()
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        cpu = next(
            line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else 0.0
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": ram}


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {"torch": torch.__version__}
    for name in ("diffusers", "transformers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer repeats; no 512² image; one cold-start pair"
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--config", default="sd15", choices=("sd15", "tiny"), help="tiny: smoke run")
    parser.add_argument(
        "--rows", nargs="+", help=f"rows to run (default: all): {', '.join(r.key for r in ROWS)}"
    )
    parser.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS)
    parser.add_argument(
        "--precisions", nargs="+", help="default: fp32 and bf16 on CPU, fp32 and fp16 on CUDA"
    )
    parser.add_argument("--repeats", type=int, help="timed rounds for module rows (default 2 quick, 5 full)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before module rows")
    parser.add_argument("--image-repeats", type=int, help="rounds for whole images (default 1 quick, 2 full)")
    parser.add_argument("--cold-repeats", type=int, default=3, help="cold-start rounds in full mode")
    parser.add_argument("--threads", type=int, help="CPU threads for every contender (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.image_repeats = args.image_repeats or (1 if args.quick else 2)
    args.precisions = args.precisions or list(PRECISIONS[args.device])
    keys = [k for item in args.rows or [] for k in item.split(",") if k]
    unknown = set(keys) - {r.key for r in ROWS}
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose from {[r.key for r in ROWS]}")
    args.rows = [r for r in ROWS if r.key in keys] if keys else [r for r in ROWS if r.quick or not args.quick]
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = {"sd15": SD15, "tiny": TINY}[args.config]
    modes = [
        m
        for m in MODES
        if device.type in m.devices and m.precision in args.precisions and m.family in ("ours", *args.peers)
    ]
    notes = []
    openvino = _peers.openvino_version() if "openvino" in args.peers else None
    if "openvino" in args.peers and openvino is None and device.type == "cpu":
        notes.append("OpenVINO is not importable (`pip install openvino`): its columns are skipped.")
    if openvino is None:
        modes = [m for m in modes if m.family != "openvino"]
    notes.append(
        "Whole images: diffusers' StableDiffusionPipeline and our Pipeline, same prompt, seed, CFG 7.5 and "
        "DPM++ 2M; OpenVINO runs single modules only. Module rows exclude moving/casting inputs."
    )

    peak_n = 1024 if args.config == "tiny" else 2048 if args.quick else 4096
    log(f"measuring the matmul peak ({', '.join(args.precisions)})")
    kernels = {p: measure_peak(p, device, peak_n) for p in args.precisions}
    log(f"  GFLOP/s: {kernels}")

    with tempfile.TemporaryDirectory(prefix="sd-bench-") as tmp:
        workdir = Path(tmp)
        checkpoint = workdir / f"{args.config}-random.safetensors"
        log(f"writing random {args.config} weights to {checkpoint}")
        save_checkpoint(random_models(config, seed=args.seed), checkpoint, config)
        gc.collect()
        dconf = _peers.peer_configs(config)
        folder = _peers.write_config_folder(workdir / "diffusers-config", dconf)
        ours = load_models(checkpoint, device)
        bench = Bench(config, device, workdir, checkpoint, folder, dconf, ours, openvino)
        results = run_in_process(bench, [r for r in args.rows if not r.fresh], modes, args)
        bench.ours = {}  # the parent's copies are not needed by fresh processes: leave them the memory
        del ours
        bench.release()
        results += run_fresh(bench, [r for r in args.rows if r.fresh], modes, args)

    # Once more at the end, keeping the best: a busy moment at start-up would understate the peak.
    for precision, found in kernels.items():
        for name, value in measure_peak(precision, device, peak_n).items():
            found[name] = max(value, found.get(name, 0.0))
    peaks = {p: max(found.values()) for p, found in kernels.items()}
    log(f"  GFLOP/s, best of start and end: {kernels}")

    report = {
        "meta": {
            "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            **machine(),
            **versions(),
            "openvino": openvino,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "config": args.config,
            "quick": args.quick,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "image_repeats": args.image_repeats,
            "peak_n": peak_n,
            "wall_s": time.perf_counter() - started,
        },
        "peak_gflops": peaks,
        "peak_kernels": kernels,
        "rows": [row_report(row, results, count_flops(row, config), peaks) for row in args.rows],
        "notes": notes,
    }
    print(markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
