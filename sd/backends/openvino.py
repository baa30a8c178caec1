"""OpenVINO backend: our four components converted to OpenVINO and run by its CPU plugin.

    from sd.backends.openvino import compile_models
    pipe = Pipeline(compile_models(load_models(path), precision="bf16"))

`compile_models` returns drop-in replacements for the modules: the same call signatures, fp32 torch
tensors in and out (whatever the inference precision), so `sd.Pipeline` uses them unchanged.

How a component gets to run:
1. At its first call, our module is traced (`openvino.convert_model`) ONCE into a graph with dynamic
   input shapes, saved as IR (fp32 weights: one IR serves both precisions) under
   `<cache_dir>/<fingerprint>/<component>.xml`.
2. For every new input shape, that IR is read back, reshaped to the call's static shapes and compiled:
   static shapes let the CPU plugin plan memory and pick kernels for exactly those sizes (SD1.5 U-Net
   step: 2-6% faster than the dynamic graph; `dynamic=True` keeps that instead: one compile, any shape).
3. Optionally (`blob_cache=True`), compiled models also go to OpenVINO's own cache (`CACHE_DIR`, under
   `<cache_dir>/<fingerprint>/compiled/<precision>`). Off by default: on the CPU plugin importing a blob
   costs as much time as compiling the IR (SD1.5 U-Net: ~3-5 s either way, measured), and 3 GB more
   peak memory and 4 GB of disk per precision. The expensive step a second run skips is conversion.

The fingerprint covers everything the IR is made from: the weights (or an id the caller passes, such as
the checkpoint's hash), the configs, the source of the `sd` modules the trace runs, and the OpenVINO and
torch versions. A stale IR can therefore not be picked up after the weights or our code change.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ..allocator import release_free_heap
from ..diffusion import Diffusion, timestep_embedding
from ..encoder import LatentDistribution
from ..models import COMPONENTS
from ..unet import UNet

try:
    import openvino as ov
except ImportError:  # an optional dependency: only compile_models needs it
    ov = None

Precision = Literal["bf16", "f32"]
PRECISIONS = ("bf16", "f32")


def precision_for(dtype: str) -> Precision:
    """The inference precision for a torch dtype name (fp32, bf16, ...): bf16 stays bf16, all else f32."""
    return "bf16" if dtype == "bf16" else "f32"


MISSING_MESSAGE = "OpenVINO backend needs the openvino package: pip install openvino"


def available() -> bool:
    """Whether the openvino package is installed."""
    return ov is not None


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/sd/openvino, else ~/.cache/sd/openvino."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sd" / "openvino"


# --- what identifies a converted graph ----------------------------------------------------------------


def _source_files(model: nn.Module) -> set[Path]:
    """Source files of the `sd` code a trace of `model` runs: the modules defining its layers, the `sd`
    functions and classes those import (attention's kernels, say), and this file's graph wrappers."""
    package = __name__.split(".")[0]
    names = {type(m).__module__ for m in model.modules()} | {__name__}
    for name in list(names):
        names |= {getattr(value, "__module__", None) or "" for value in vars(sys.modules[name]).values()}
    return {Path(sys.modules[n].__file__) for n in names if n.split(".")[0] == package}


@torch.no_grad()
def _checksum(tensor: torch.Tensor) -> str:
    """Shape, dtype, the wrapping integer sum of the raw bits, and 16 evenly spaced raw values.

    Integer addition (mod 2**bits) is exact, so the sum does not depend on the thread count as a float
    sum would; it reads every element once, so any edit to the weights shows.
    """
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    raw = tensor.detach().view(bits)
    if raw.numel() == 0:
        return f"{tuple(tensor.shape)} {tensor.dtype}"
    spots = torch.take(raw, torch.arange(16) * (raw.numel() - 1) // 15)  # integer: exact for any size
    return f"{tuple(tensor.shape)} {tensor.dtype} {int(raw.sum(dtype=bits))} {spots.tolist()}"


def fingerprint(models: dict[str, nn.Module], weights_id: str | None = None) -> str:
    """16 hex digits naming the cache folder of `models`: weights, configs, code and versions.

    `weights_id` (e.g. `sd.checkpoints.model_hash(path)`) stands in for checksumming the weights, which
    costs one pass over them (about 2 s for SD1.5 on two busy cores).
    """
    digest = hashlib.sha256()

    def add(text: str) -> None:
        digest.update(text.encode() + b"\0")

    add(f"openvino {ov.get_version()} torch {torch.__version__}")
    for name in COMPONENTS:
        model = models[name]
        add(f"{name} {json.dumps(asdict(model.config), sort_keys=True)}")
        for path in sorted(_source_files(model)):
            add(path.read_text())
        if weights_id is None:
            for key, tensor in model.state_dict().items():
                add(f"{key} {_checksum(tensor)}")
    if weights_id is not None:
        add(f"weights {weights_id}")
    return digest.hexdigest()[:16]


# --- conversion, disk cache, compilation --------------------------------------------------------------


class _Compiler:
    """Converts graphs to IR on disk (once), then compiles them for the CPU plugin (once per shape)."""

    def __init__(
        self,
        directory: Path,
        precision: Precision,
        dynamic: bool,
        blob_cache: bool,
        load: Callable[[str], nn.Module] | None = None,
    ):
        self.directory = directory
        self.precision = precision
        self.blob_cache = blob_cache
        self.dynamic = dynamic
        self.load = load  # component name -> its module with weights, for weightless stand-ins
        self.core = ov.Core()
        self.config = {
            "INFERENCE_PRECISION_HINT": precision,
            "PERFORMANCE_HINT": "LATENCY",  # one request at a time, all cores on it
        }
        if blob_cache:
            # One folder per precision: OpenVINO 2026.4 keys its blobs without the precision hint, and an
            # f32 blob imported with the bf16 hint computes garbage (U-Net step relative error > 1).
            self.config["CACHE_DIR"] = str(directory / "compiled" / precision)

    def derived(self, weights_id: str) -> _Compiler:
        """A compiler for other weights of the same models (a LoRA merged, another VAE): its IR goes to a
        sibling folder named by `weights_id`, so each set is converted once and found again on disk."""
        tag = hashlib.sha256(weights_id.encode()).hexdigest()[:12]
        return _Compiler(self.directory.with_name(f"{self.directory.name}-{tag}"), self.precision,
                         self.dynamic, self.blob_cache, self.load)  # fmt: skip

    def has_ir(self, stem: str) -> bool:
        return (self.directory / f"{stem}.xml").exists()

    def ensure_ir(self, stem: str, graph: Callable[[], nn.Module], inputs: Sequence[torch.Tensor]) -> None:
        """Convert `graph()` to the IR `<stem>.xml` unless it is on disk already."""
        if not self.has_ir(stem):
            self._convert(graph(), inputs, self.directory / f"{stem}.xml")

    def compile(self, stem: str, inputs: Sequence[torch.Tensor]) -> Any:
        """The IR `<stem>.xml` compiled for `inputs`' shapes (any shape if dynamic)."""
        release_free_heap()  # torch weights let go of (see OpenVINOModule) return to the kernel first
        model = self.core.read_model(self.directory / f"{stem}.xml")
        if not self.dynamic:
            shapes = [ov.PartialShape(list(t.shape)) for t in inputs]
            model.reshape(dict(zip(model.inputs, shapes, strict=True)))
        return self.core.compile_model(model, "CPU", self.config)

    @staticmethod
    def _convert(graph: nn.Module, inputs: Sequence[torch.Tensor], path: Path) -> None:
        # Traced here rather than inside convert_model to skip torch's trace check, which re-runs the model
        # twice (most of the conversion time); the tests compare every component with eager instead.
        # No `input=` shapes: the IR keeps dynamic shapes, so one IR serves every shape (compile()
        # reshapes it) and torch is not needed again for a new image size.
        example = tuple(t.contiguous() for t in inputs)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about Python scalars in our code: expected
            traced = torch.jit.trace(graph, example, check_trace=False, strict=False)
            model = ov.convert_model(traced, example_input=example)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Saved under a temporary name, then renamed (weights first): a process killed mid-save leaves
        # no half-written IR for the next run to trust. fp32 weights: precision is chosen at compile time.
        tmp = path.with_name(f".{path.stem}-{os.getpid()}.xml")
        ov.save_model(model, tmp, compress_to_fp16=False)
        tmp.with_suffix(".bin").replace(path.with_suffix(".bin"))
        tmp.replace(path)


class OpenVINOModule:
    """The part of an nn.Module the pipeline uses, over compiled OpenVINO models (one per input shape).

    `.to()` is a no-op (the CPU plugin runs it wherever the tensors were); `.parameters()` yields one fp32
    marker, since inputs and outputs are fp32 whatever the inference precision.
    """

    name: str
    # Whether one IR serves every call. Then the torch module is let go once that IR is on disk (at once
    # when it already is), so `Pipeline(compile_models(load_models(path)))` does not keep the fp32 weights
    # alive next to OpenVINO's: SD1.5 in bf16 peaked at 10-12 GB of RSS before.
    single_graph = True

    def __init__(self, module: nn.Module, compiler: _Compiler):
        self.config = module.config
        self.schedule = getattr(module, "schedule", None)
        self.module: nn.Module | None = module
        self._compiler = self._base_compiler = compiler
        self._prepare: Callable[[nn.Module], None] | None = None  # applied to a module loaded for rebind
        self._compiled: dict[str, Any] = {}
        if self.single_graph and compiler.has_ir(self.name):
            self.module = None  # a second run: the IR on disk is all it needs

    def rebind(self, weights_id: str | None, prepare: Callable[[nn.Module], None] | None) -> None:
        """Run other weights from now on: the checkpoint's module with `prepare(module)` applied (a LoRA
        merged into it, another VAE loaded), converted once into IR cached under `weights_id`; (None,
        None) goes back to the checkpoint's own. The weights are read again from the checkpoint, so this
        needs `compile_checkpoint` (or `compile_models(..., load=)`)."""
        if self._base_compiler.load is None:
            raise ValueError(
                f"changing the {self.name} weights (LoRA, VAE) of OpenVINO models needs them loadable again: "
                "use compile_checkpoint(path) (as `sd --backend openvino` does), or compile_models(load=)"
            )
        compiler = self._base_compiler.derived(weights_id) if weights_id else self._base_compiler
        if compiler.directory == self._compiler.directory:
            return
        self._compiler, self._prepare, self._compiled = compiler, prepare, {}
        self.module = None  # loaded (and prepared) by _graph only if this IR is not on disk yet

    def to(self, *args: object, **kwargs: object) -> OpenVINOModule:
        return self

    def eval(self) -> OpenVINOModule:
        return self

    def parameters(self) -> Iterator[torch.Tensor]:
        yield torch.zeros((), dtype=torch.float32)

    def graph(self, variant: str = "") -> nn.Module:
        """The module to trace for IR `variant`: tensors in, tensors out."""
        return self.module

    def _run(self, inputs: Sequence[torch.Tensor], variant: str = "") -> list[torch.Tensor]:
        """Run IR `<name>[-variant]` on `inputs`, compiled for their shapes at the first call with them."""
        stem = f"{self.name}-{variant}" if variant else self.name
        key = stem if self._compiler.dynamic else f"{stem} {[tuple(t.shape) for t in inputs]}"
        if key not in self._compiled:
            self._compiler.ensure_ir(stem, lambda: self._graph(variant), inputs)
            if self.single_graph:
                self.module = None
            self._compiled[key] = self._compiler.compile(stem, inputs)
        # NCHW-contiguous numpy (our tensors may be channels-last or expanded views).
        arrays = [np.ascontiguousarray(t.detach().cpu().numpy()) for t in inputs]
        # The compiled model's own call returns copies, so results survive the next call.
        return [torch.from_numpy(out) for out in self._compiled[key](arrays).to_tuple()]

    def _graph(self, variant: str) -> nn.Module:
        if self.module is None or _weightless(self.module):  # weights are read now, when needed
            if self._compiler.load is None:
                raise RuntimeError(
                    f"OpenVINO IR of {self.name} vanished from {self._compiler.directory} after its torch "
                    "module was released: call compile_models again"
                )
            self.module = self._compiler.load(self.name)
            if self._prepare is not None:
                self._prepare(self.module)
        return self.graph(variant)


class _ClipGraph(nn.Module):
    """CLIP with `clip_skip` fixed: a traced graph takes tensors only."""

    def __init__(self, clip: nn.Module, clip_skip: int):
        super().__init__()
        self.clip, self.clip_skip = clip, clip_skip

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip(tokens, clip_skip=self.clip_skip)


class _EncodeGraph(nn.Module):
    """`encoder.encode` as a graph: image -> (mean, logvar)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.encoder.encode(image)
        return dist.mean, dist.logvar


class _UNetGraph(nn.Module):
    """The diffusion model from its timestep features on: those are computed outside, in fp32, because
    a bf16 graph rounds t * freq (up to ~1000 rad) before cos/sin and so loses the timestep (U-Net step
    relative error 8-20% against 1.4% for torch's own bf16 on the TINY model)."""

    def __init__(self, diffusion: Diffusion):
        super().__init__()
        self.diffusion = diffusion

    def forward(self, latents: torch.Tensor, context: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return UNet.forward(self.diffusion, latents, self.diffusion.time_embed(features), context)


class OpenVINOCLIP(OpenVINOModule):
    name = "clip"
    single_graph = False  # one IR per clip_skip: it changes the graph

    def graph(self, variant: str = "") -> nn.Module:
        return _ClipGraph(self.module, int(variant.removeprefix("skip") or 1))

    def __call__(
        self, tokens: torch.Tensor, clip_skip: int = 1, token_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, T) int token ids -> (B, T, width)."""
        if token_embeds is not None:
            self.token_embeddings(tokens)
        if not 1 <= clip_skip <= self.config.layers:
            raise ValueError(f"clip_skip must be in 1..{self.config.layers}, got {clip_skip}")
        return self._run([tokens.long()], f"skip{clip_skip}" if clip_skip > 1 else "")[0]

    def token_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        raise ValueError(
            "textual-inversion embeddings need the torch text encoder: the OpenVINO one takes token ids "
            "only (use --backend torch, or a prompt without embeddings)"
        )


class OpenVINOEncoder(OpenVINOModule):
    name = "encoder"

    def graph(self, variant: str = "") -> nn.Module:
        return _EncodeGraph(self.module)

    def encode(self, image: torch.Tensor) -> LatentDistribution:
        """Image (B, 3, H, W) in [-1, 1] -> the latent distribution (unscaled)."""
        mean, logvar = self._run([image.float()])
        return LatentDistribution(mean, logvar)

    def __call__(self, image: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Scaled latents for `image` with the given `noise`, as the eager encoder."""
        dist = self.encode(image)
        return (dist.mean + dist.std * noise) * self.config.scaling_factor


class OpenVINODecoder(OpenVINOModule):
    name = "decoder"

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 4, h, w) -> image (B, 3, 8h, 8w) in about [-1, 1]."""
        return self._run([latents.float()])[0]


class OpenVINODiffusion(OpenVINOModule):
    name = "diffusion"

    def graph(self, variant: str = "") -> nn.Module:
        return _UNetGraph(self.module)

    def __call__(
        self,
        latents: torch.Tensor,
        context: torch.Tensor,
        timestep: torch.Tensor | float | int,
        control: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """latents (B, 4, h, w), context (B, 77, width), timestep scalar or (B,) -> noise (B, 4, h, w);
        `control` as Diffusion.forward's, which the compiled graph has no input for (None only)."""
        if control is not None:
            raise ValueError(
                "ControlNet needs the torch backend: the OpenVINO U-Net is compiled without its inputs"
            )
        t = torch.as_tensor(timestep).reshape(-1).expand(latents.shape[0])
        features = timestep_embedding(t, self.config.model_channels)  # fp32, see _UNetGraph
        return self._run([latents.float(), context.float(), features])[0]


def _weightless(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def compile_models(
    models: dict[str, nn.Module],
    precision: Precision = "bf16",
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    weights_id: str | None = None,
    dynamic: bool = False,
    blob_cache: bool = False,
    load: Callable[[str], nn.Module] | None = None,
) -> dict[str, OpenVINOModule]:
    """OpenVINO drop-ins for {"clip", "encoder", "decoder", "diffusion"} (fp32 modules, as loaded).

    `precision`: the CPU plugin's inference precision ("bf16" needs AVX512-BF16 or AMX to be fast).
    `cache_dir`: root of the IR and compiled-blob cache (default `default_cache_dir()`); each set of
    weights gets its own `<fingerprint>/` folder. `weights_id`: a checkpoint id (e.g. its hash) that
    replaces checksumming the weights. `dynamic`: compile one dynamic-shape model per component instead
    of one static-shape model per input shape. `blob_cache`: also keep OpenVINO's compiled blobs (see the
    module docstring for why that is off by default). Conversion and compilation happen lazily, at the first
    call with a given shape; the torch modules are let go once their IR is on disk (CLIP's excepted:
    a new `clip_skip` needs a new IR). `models` may be weightless (meta-device) stand-ins, as
    `load_models(path, device="meta")` gives, with `weights_id` and `load(name)`, which returns that
    component with its weights: it is called only for a component whose IR must be made.
    """
    if ov is None:
        raise RuntimeError(MISSING_MESSAGE)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if any(_weightless(models[name]) for name in COMPONENTS) and (load is None or weights_id is None):
        raise ValueError("weightless (meta-device) models need weights_id= and load=")
    for name in COMPONENTS:
        dtype = next(models[name].parameters()).dtype
        if dtype != torch.float32:
            raise ValueError(f"{name} holds {dtype} weights; pass fp32 models and choose precision= instead")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    compiler = _Compiler(root / fingerprint(models, weights_id), precision, dynamic, blob_cache, load)
    return {
        "clip": OpenVINOCLIP(models["clip"], compiler),
        "encoder": OpenVINOEncoder(models["encoder"], compiler),
        "decoder": OpenVINODecoder(models["decoder"], compiler),
        "diffusion": OpenVINODiffusion(models["diffusion"], compiler),
    }


def compile_checkpoint(
    path: str | os.PathLike[str],
    precision: Precision = "bf16",
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    weights_id: str | None = None,
    **options: Any,
) -> dict[str, OpenVINOModule]:
    """`compile_models` for a checkpoint file, whose weights are read only for components whose IR is
    not cached yet. A second run thus never holds the fp32 torch weights next to OpenVINO's (SD1.5 bf16,
    512² image: peak RSS 6.7 GB, against 7.3 GB when loading them all first, and load time 0.3 s against
    2.1 s). `weights_id` defaults to the file's `model_hash`; diffusers folders, which have none, are
    loaded whole."""
    from ..checkpoints import model_hash
    from ..weights import load_models

    weights_id = weights_id or model_hash(path)
    if weights_id is None:
        return compile_models(load_models(path), precision, cache_dir, **options)

    def load(name: str) -> nn.Module:
        return load_models(path, components=(name,))[name]

    stand_ins = load_models(path, device="meta")  # the file is checked here all the same
    return compile_models(stand_ins, precision, cache_dir, weights_id=weights_id, load=load, **options)


__all__ = [
    "MISSING_MESSAGE",
    "OpenVINOModule",
    "available",
    "compile_checkpoint",
    "compile_models",
    "default_cache_dir",
    "fingerprint",
]
