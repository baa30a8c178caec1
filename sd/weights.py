"""Reading and writing SD1.x checkpoints: original .ckpt / .safetensors files and diffusers folders.

Our modules are named after the original CompVis/LDM checkpoint keys, so loading an original file is
"strip a prefix, check every key and shape, assign". Everything a user may point us at that is not a
loadable SD1.x checkpoint ends in one `CheckpointError` whose message is one line saying what the file is.

Memory: modules are built on the meta device and each tensor is read, converted and assigned one at a
time, so loading peaks near the final model size. Files are mapped privately (.ckpt by
torch.load(mmap=True)); each tensor is copied out into memory of its own and its pages are then dropped
from the mapping, so mapped pages never add up, and the loaded modules keep no reference to the file.

Safety: .ckpt files are pickles. They are only ever opened with torch.load(weights_only=True); pickled
training leftovers (pytorch_lightning callbacks, numpy scalars) become inert placeholder classes, and a
file that needs anything else (os.system, builtins.exec, ...) is refused without running it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import math
import os
import pickle
import pickletools
import re
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .allocator import tune_malloc
from .config import SD15, SD15_INPAINTING, ModelConfig, ScheduleConfig
from .keymap import (
    LDM_COMPONENT_PREFIXES,
    LDM_SCHEDULE_BUFFERS,
    TEXT_ENCODER_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    config_from_diffusers,
    diffusers_key_map,
    normalize_diffusers_key,
    split_ldm_key,
    vae_reshape_keys,
)
from .models import CHANNELS_LAST, COMPONENTS, build_models, prefer_channels_last

__all__ = [
    "SUPPORTED",
    "CheckpointError",
    "CheckpointInfo",
    "checkpoint_layout",
    "describe",
    "format_description",
    "load_models",
    "save_checkpoint",
    "schedule_buffers",
]

SUPPORTED = "supported: SD1.x original checkpoints (.ckpt/.safetensors) and SD1.x diffusers folders"
CONFIG_METADATA_KEY = "sd_config"  # safetensors metadata / .ckpt top-level key holding ModelConfig JSON

POSITION_IDS = TEXT_ENCODER_PREFIX + "text_model.embeddings.position_ids"
EMA_PREFIX = "model_ema."
# Keys of real SD1.x files that are not weights of our modules: schedule buffers (recomputed from the
# config), EMA bookkeeping, the training loss' logvar, and position_ids (regenerated, never trusted).
IGNORED_KEYS = frozenset(
    {
        *LDM_SCHEDULE_BUFFERS,
        "lvlb_weights",
        "logvar",
        "model_ema.decay",
        "model_ema.num_updates",
        POSITION_IDS,
        TEXT_ENCODER_PREFIX + "embeddings.position_ids",  # very old transformers (no text_model level)
    }
)
# EMA copies (used for the U-Net when complete, else ignored) and the VAE's training loss (LPIPS,
# discriminator) that some files carry from the autoencoder's training checkpoint.
IGNORED_PREFIXES = (EMA_PREFIX, VAE_PREFIX + "loss.")


class CheckpointError(ValueError):
    """A path that cannot be loaded as an SD1.x model. `str()` is always a single line.

    `family` / `format` say what the path was recognised as, when known (used by `describe`).
    """

    def __init__(self, message: str, *, family: str | None = None, format: str | None = None):
        super().__init__(re.sub(r"\s*[\r\n]+\s*", " ", str(message)).strip())
        self.family = family
        self.format = format


FORMAT_SAFETENSORS = "safetensors"
FORMAT_CKPT = "ckpt (PyTorch zip pickle)"


@contextlib.contextmanager
def _tagged(**tags: str) -> Iterator[None]:
    """Fill in `family`/`format` of CheckpointErrors raised inside, where the raiser did not know them."""
    try:
        yield
    except CheckpointError as error:
        for name, value in tags.items():
            if getattr(error, name) is None:
                setattr(error, name, value)
        raise


def _one_line(text: object, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _fmt_keys(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (", ..." if len(keys) > n else "")


# ---------------------------------------------------------------------------------------------------------
# Lazy tensor entries: what a file holds, readable one tensor at a time
# ---------------------------------------------------------------------------------------------------------


def _no_release(tensor: torch.Tensor) -> None:
    del tensor


@dataclass(frozen=True)
class _Entry:
    """One tensor of a file: its shape/dtype from the header, and how to read it.

    `read()` returns (tensor, owned): owned tensors were freshly read into their own memory and may be
    kept as they are; others are views of a mapping and must be copied, then passed to `release`.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], tuple[torch.Tensor, bool]]
    release: Callable[[torch.Tensor], None] = _no_release

    def reshaped(self, shape: tuple[int, ...]) -> _Entry:
        read = self.read
        return _Entry(shape, self.dtype, lambda: _reshape_read(read, shape), self.release)


def _reshape_read(read: Callable[[], tuple[torch.Tensor, bool]], shape: tuple[int, ...]):
    tensor, owned = read()
    return tensor.reshape(shape), owned


@dataclass
class _Source:
    """A path opened lazily: tensors by key (original LDM keys, or the file's own keys when unknown)."""

    path: str
    format: str
    entries: dict[str, _Entry]
    config: ModelConfig | None = None  # stored with the file (our metadata) or from diffusers configs
    config_origin: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    size_bytes: int = 0


# ---------------------------------------------------------------------------------------------------------
# Sniffing: what is this file?
# ---------------------------------------------------------------------------------------------------------

_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # pickled magic number
_MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library's own limit
_NOT_A_MODEL_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"GGUF", "a GGUF file (llama.cpp-style quantized model)"),
    (b"\x89HDF", "an HDF5 file (Keras-style weights)"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"%PDF", "a PDF document"),
    (b"7z\xbc\xaf", "a 7-zip archive"),
    (b"Rar!", "a RAR archive"),
)


def _sniff(head: bytes, size: int) -> str:
    """Container kind from the first bytes: safetensors, zip, or a description of what it is instead."""
    if size == 0:
        return "an empty file"
    if len(head) >= 9 and head[8:9] == b"{":
        n = int.from_bytes(head[:8], "little")
        if 2 <= n <= _MAX_SAFETENSORS_HEADER:
            return "safetensors"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if head.startswith(_LEGACY_TORCH_MAGIC):
        return "a legacy (pre-1.6, non-zip) PyTorch file; re-save it with torch.save in a current PyTorch"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a bare pickle, not a PyTorch zip checkpoint"
    for magic, what in _NOT_A_MODEL_MAGIC:
        if head.startswith(magic):
            return what
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    stripped = head.lstrip()
    if stripped[:1] in (b"{", b"["):
        return "a JSON file"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "not a recognised model file (neither safetensors nor a PyTorch zip checkpoint)"
    return "a text file"


# ---------------------------------------------------------------------------------------------------------
# safetensors: header parsing, plain reads, and a streaming writer
# ---------------------------------------------------------------------------------------------------------

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def _read_exact(path: str, offset: int, out: memoryview) -> None:
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        done = 0
        while done < len(out):
            n = f.readinto(out[done:])
            if not n:  # the file shrank since its header was checked
                raise CheckpointError(f"{path}: unexpected end of file at byte {offset + done}")
            done += n


def _open_safetensors(path: str, size: int) -> _Source:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if 8 + n > size:
            raise CheckpointError(
                f"{path}: truncated safetensors file (header claims {n} bytes, file has {size})"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise TypeError("header is not an object")
    except (UnicodeDecodeError, ValueError, TypeError) as error:
        raise CheckpointError(f"{path}: corrupt safetensors header ({_one_line(error, 80)})") from None
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
    data_start, data_size = 8 + n, size - 8 - n
    entries: dict[str, _Entry] = {}
    data = _SafetensorsData(path, size)
    end_max = 0
    for key, info in header.items():
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {key!r}") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if min(shape, default=0) < 0 or begin < 0 or end - begin != nbytes:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {key!r}")
        end_max = max(end_max, end)
        reader = data.reader(data_start + begin, nbytes, dtype, shape)
        entries[key] = _Entry(shape, dtype, reader, data.release)
    if end_max > data_size:
        raise CheckpointError(
            f"{path}: truncated safetensors file (tensor data ends at byte {data_start + end_max}, "
            f"file has {size})"
        )
    config, origin = None, ""
    if CONFIG_METADATA_KEY in metadata:
        config, origin = _config_from_json(path, metadata[CONFIG_METADATA_KEY]), "file metadata"
    return _Source(path, FORMAT_SAFETENSORS, entries, config, origin, dict(metadata), size)


class _SafetensorsData:
    """The tensor data of one safetensors file, mapped on the first read (so `describe` never maps it).

    Tensors are views of a private mapping, prefetched and released page-wise like a .ckpt's (see
    `_FileMapping`): copying out of a mapping measured about twice as fast as read() into fresh buffers.
    """

    def __init__(self, path: str, size: int):
        self.path, self.size = path, size
        self.storage: torch.UntypedStorage | None = None
        self.pages: _FileMapping | None = None

    def reader(self, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]):
        return functools.partial(self.read, offset, nbytes, dtype, shape)

    def read(self, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]):
        if sys.byteorder != "little":  # safetensors data is little-endian
            raise CheckpointError(f"{self.path}: big-endian hosts are not supported")
        if offset % dtype.itemsize:  # a view needs aligned data: read an (owned) copy instead
            buf = torch.empty(nbytes, dtype=torch.uint8)
            _read_exact(self.path, offset, memoryview(buf.numpy()))
            return buf.view(dtype).reshape(shape), True
        if self.storage is None:
            self.storage = torch.UntypedStorage.from_file(self.path, shared=False, nbytes=self.size)
            self.pages = _FileMapping(self.path)
        raw = torch.empty(0, dtype=torch.uint8).set_(self.storage, offset, (nbytes,))
        return self.pages.read(raw.view(dtype).reshape(shape))

    def release(self, tensor: torch.Tensor) -> None:
        if self.pages is not None:
            self.pages.release(tensor)


def _write_safetensors(
    path: Path, items: list[tuple[str, torch.Tensor]], metadata: dict[str, str], dtype: torch.dtype | None
) -> None:
    """Stream tensors (cast to `dtype` when floating) to a safetensors file one at a time: no whole-file
    buffer and no full converted copy in memory."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for key, tensor in items:
        out_dtype = _cast_dtype(tensor, dtype)
        nbytes = tensor.numel() * out_dtype.itemsize
        header[key] = {
            "dtype": _ST_NAMES[out_dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as the reference writer does
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for _, tensor in items:
                data = _cast(tensor.detach().to("cpu"), dtype).contiguous().reshape(-1)
                f.write(memoryview(data.view(torch.uint8).numpy()))
                del data
        os.replace(tmp, path)  # a crash never leaves a half-written file under the real name
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


# ---------------------------------------------------------------------------------------------------------
# .ckpt: torch.load(weights_only=True, mmap=True), with inert placeholders for training leftovers
# ---------------------------------------------------------------------------------------------------------

# Globals that real SD1.x training checkpoints pickle next to the tensors (Lightning callback states,
# numpy scalars in them, hparams). They are replaced by placeholders, never imported.
_LEFTOVER_MODULES = ("pytorch_lightning", "lightning", "lightning_fabric", "omegaconf")
_LEFTOVER_GLOBALS = frozenset(
    {
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.dtype",
        "numpy.ndarray",
        "builtins.set",
        "builtins.frozenset",
        "builtins.slice",
        "builtins.range",
        "argparse.Namespace",
        "collections.defaultdict",
        "typing.Any",
        "pathlib.PosixPath",
        "pathlib.WindowsPath",
        "pathlib._local.PosixPath",
        "pathlib._local.WindowsPath",
    }
)


def _is_leftover(module: str, name: str) -> bool:
    full = f"{module}.{name}"
    if full in _LEFTOVER_GLOBALS:
        return True
    if module == "numpy.dtypes" and name.endswith("DType"):  # numpy 2 dtype classes
        return True
    return any(module == m or module.startswith(m + ".") for m in _LEFTOVER_MODULES)


class _Placeholder:
    """Inert stand-in for a class or function pickled in a checkpoint: stores its arguments and state,
    runs nothing. Subclasses carry the original `__module__`/`__qualname__` for readable reprs."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Placeholder:
        del args, kwargs
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any):
        self.args = args
        self.kwargs = kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<placeholder for {type(self).__module__}.{type(self).__qualname__}>"


def _empty_dict(*args: Any) -> dict:
    # defaultdict is rebuilt by REDUCE then SETITEMS, which the safe unpickler allows only on real dicts.
    del args
    return {}


def _placeholder(module: str, name: str) -> Any:
    if f"{module}.{name}" == "collections.defaultdict":
        return _empty_dict
    cls = type(name.rpartition(".")[2] or "Placeholder", (_Placeholder,), {})
    cls.__module__ = module
    cls.__qualname__ = name
    return cls


def _pickle_globals(data: bytes) -> list[tuple[str, str]]:
    """Every (module, name) a pickle references, found by disassembly only (nothing is imported).

    GLOBAL carries its names; STACK_GLOBAL (protocol 4+) takes the two strings last pushed, which we
    track through the memo well enough to name them in an error message.
    """
    from torch._utils import IMPORT_MAPPING, NAME_MAPPING  # the renames torch's unpickler applies

    found: list[tuple[str, str]] = []
    strings: list[str] = []
    memo: dict[int, Any] = {}
    last: Any = None
    try:
        for op, arg, _ in pickletools.genops(data):
            value: Any = None
            if op.name == "GLOBAL":
                module, name = str(arg).split(" ", 1)
                if (module, name) in NAME_MAPPING:
                    module, name = NAME_MAPPING[(module, name)]
                elif module in IMPORT_MAPPING:
                    module = IMPORT_MAPPING[module]
                found.append((module, name))
            elif op.name == "STACK_GLOBAL":
                found.append((strings[-2], strings[-1]) if len(strings) >= 2 else ("?", "?"))
            elif op.name in {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
                             "BINSTRING", "STRING"}:  # fmt: skip
                value = arg.decode("latin-1") if isinstance(arg, bytes) else str(arg)
                strings.append(value)
            elif op.name in {"PUT", "BINPUT", "LONG_BINPUT"}:
                memo[arg] = last
                value = last
            elif op.name == "MEMOIZE":
                memo[len(memo)] = last
                value = last
            elif op.name in {"GET", "BINGET", "LONG_BINGET"}:
                value = memo.get(arg)
                if isinstance(value, str):
                    strings.append(value)
            last = value
    except (ValueError, IndexError, KeyError):  # truncated or malformed: report what was seen
        pass
    return list(dict.fromkeys(found))


def _torch_allowed_globals() -> set[str]:
    allowed: set[str] = set()
    with contextlib.suppress(Exception):  # private API: fall back to "everything is unknown"
        from torch import _weights_only_unpickler

        allowed |= set(_weights_only_unpickler._get_allowed_globals())
        allowed |= set(_weights_only_unpickler._get_user_allowed_globals())
    return allowed


def _torch_reason(error: BaseException) -> str:
    """The informative line of torch's multi-paragraph weights_only error."""
    text = str(error)
    match = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if match:
        return _one_line(match.group(1))
    return _one_line(text.strip().splitlines()[0] if text.strip() else repr(error))


def _data_pkl(path: str) -> tuple[zipfile.ZipFile, str]:
    """Open a torch zip checkpoint with Python's zipfile to give precise errors before torch sees it."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as error:
        raise CheckpointError(f"{path}: truncated or corrupt zip archive ({_one_line(error, 80)})") from None
    names = archive.namelist()
    pkl = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
    if not pkl:
        archive.close()
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            raise CheckpointError(f"{path}: a TorchScript archive, not a checkpoint; {SUPPORTED}")
        shown = _fmt_keys(names) if names else "nothing"
        raise CheckpointError(
            f"{path}: a zip archive of other files ({shown}), not a PyTorch checkpoint; {SUPPORTED}"
        )
    size = os.path.getsize(path)
    for info in archive.infolist():
        if info.header_offset + info.compress_size > size:
            archive.close()
            raise CheckpointError(f"{path}: truncated zip archive ({info.filename} runs past the end)")
    return archive, min(pkl, key=len)


def _safe_torch_load(path: str) -> Any:
    """The only way a pickle is ever opened here."""
    with warnings.catch_warnings():
        # Protocol != 2 files: torch warns, then either loads them or fails with the reason we report.
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _torch_load(path: str) -> Any:
    """torch.load(weights_only=True, mmap=True); known training leftovers load as inert placeholders,
    anything else that is not plain data is refused by name without running it."""
    archive, pkl = _data_pkl(path)
    archive.close()
    try:
        return _safe_torch_load(path)
    except pickle.UnpicklingError as error:
        first_error = error
    except Exception as error:  # zip/record errors from torch's reader
        raise CheckpointError(f"{path}: cannot read PyTorch checkpoint ({_one_line(error, 120)})") from None

    with zipfile.ZipFile(path) as archive:
        data = archive.read(pkl)
    allowed = _torch_allowed_globals()
    unknown = [(m, n) for m, n in _pickle_globals(data) if f"{m}.{n}" not in allowed]
    refused = [f"{m}.{n}" for m, n in unknown if not _is_leftover(m, n)]
    if refused:
        raise CheckpointError(
            f"{path}: refusing to unpickle: needs {_fmt_keys(refused)} (could run arbitrary code; "
            "only tensors and known training leftovers are loaded)",
            family="unsafe pickle",
        )
    if not unknown:
        raise CheckpointError(f"{path}: cannot unpickle safely: {_torch_reason(first_error)}")
    stand_ins = [(_placeholder(m, n), f"{m}.{n}") for m, n in unknown]
    try:
        with torch.serialization.safe_globals(stand_ins):
            return _safe_torch_load(path)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{path}: cannot unpickle safely: {_torch_reason(error)}") from None
    except Exception as error:
        raise CheckpointError(f"{path}: cannot read PyTorch checkpoint ({_one_line(error, 120)})") from None


def load_torch_file(path: str | os.PathLike[str]) -> Any:
    """Any small PyTorch pickle (an embedding, a LoRA .pt), opened only with torch.load(weights_only=True):
    CheckpointError (one line) for a file that needs code to load, which is never run."""
    return _torch_load(str(path))


def read_tensor_file(
    path: str | os.PathLike[str], what: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of a small weights file (a LoRA, a VAE): `.safetensors` by its
    suffix, anything else through load_torch_file, a `state_dict` wrapper unwrapped. CheckpointError (one
    line, naming the file as the `what` it should be) when it cannot be read."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                return {k: f.get_tensor(k) for k in f.keys()}, metadata  # noqa: SIM118 (not a dict)
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{path}: cannot read safetensors ({error})") from None
    data = load_torch_file(path)
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping):
        held = type(data).__name__
        raise CheckpointError(f"{path}: not a {what} file (holds a {held}, not a dict of tensors)")
    return {str(k): v for k, v in data.items() if isinstance(v, torch.Tensor)}, {}


class _FileMapping:
    """Page-level help for reading tensors out of torch.load's private mapping of a .ckpt file.

    `prefetch` maps a tensor's pages in one call (MADV_POPULATE_READ) instead of one page fault at a
    time; `release` drops the pages of a tensor already copied (MADV_DONTNEED). Without the latter the
    mapped file pages count in the process RSS until the whole load ends, doubling the peak. Dropping
    clean pages of a private file mapping only forgets them: a later read refaults the same bytes from
    the file, so it is safe even for a page shared with a tensor not yet copied. Only addresses inside a
    mapping of this very file are touched; elsewhere (or off Linux) both are no-ops.
    """

    _MADV_DONTNEED = 4
    _MADV_POPULATE_READ = 22  # Linux >= 5.14; older kernels answer EINVAL, which is ignored

    def __init__(self, path: str):
        self.ranges: list[tuple[int, int]] = []
        self.madvise: Any = None
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        if not sys.platform.startswith("linux"):
            return
        target = os.path.realpath(path)
        with contextlib.suppress(OSError, ValueError), open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.rstrip("\n").split(maxsplit=5)
                if len(parts) == 6 and parts[5] == target:
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    self.ranges.append((start, end))
        if self.ranges:
            with contextlib.suppress(OSError, AttributeError):
                libc = ctypes.CDLL(None, use_errno=True)
                libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                self.madvise = libc.madvise

    def _advise(self, tensor: torch.Tensor, advice: int) -> None:
        if self.madvise is None or tensor.device.type != "cpu" or tensor.numel() == 0:
            return
        start = tensor.untyped_storage().data_ptr() + tensor.storage_offset() * tensor.element_size()
        end = start + tensor.numel() * tensor.element_size()
        start, end = start // self.page * self.page, -(-end // self.page) * self.page
        if any(lo <= start and end <= hi for lo, hi in self.ranges):
            self.madvise(start, end - start, advice)

    def read(self, tensor: torch.Tensor) -> tuple[torch.Tensor, bool]:
        self._advise(tensor, self._MADV_POPULATE_READ)
        return tensor, False

    def release(self, tensor: torch.Tensor) -> None:
        self._advise(tensor, self._MADV_DONTNEED)


def _flatten_tensors(obj: Mapping, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            out[name] = value
        elif isinstance(value, Mapping):
            out.update(_flatten_tensors(value, name + "."))
    return out


def _open_ckpt(path: str, size: int) -> _Source:
    obj = _torch_load(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: a pickled {type(obj).__name__}, not a state dict; {SUPPORTED}")
    state = obj["state_dict"] if isinstance(obj.get("state_dict"), Mapping) else obj
    tensors = _flatten_tensors(state)
    mapping = _FileMapping(path)
    entries = {
        k: _Entry(tuple(t.shape), t.dtype, functools.partial(mapping.read, t), mapping.release)
        for k, t in tensors.items()
    }
    config, origin = None, ""
    if isinstance(obj.get(CONFIG_METADATA_KEY), str):
        config, origin = _config_from_json(path, obj[CONFIG_METADATA_KEY]), "file metadata"
    return _Source(path, FORMAT_CKPT, entries, config, origin, {}, size)


def _config_from_json(path: str, text: str) -> ModelConfig:
    try:
        return ModelConfig.from_json(text)
    except (ValueError, TypeError, KeyError) as error:
        message = f"{path}: unreadable {CONFIG_METADATA_KEY} metadata ({_one_line(error, 80)})"
        raise CheckpointError(message) from None


# ---------------------------------------------------------------------------------------------------------
# diffusers folders
# ---------------------------------------------------------------------------------------------------------

_DIFFUSERS_COMPONENTS = ("unet", "vae", "text_encoder")
_SHARD = re.compile(r"-\d+-of-\d+$")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"{path}: unreadable JSON ({_one_line(error, 80)})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


def _weight_files(folder: Path) -> list[Path]:
    """The weight files to load, all shards of the chosen group: like diffusers without a `variant`, the
    plain files (safetensors, else .bin) first; then the fp16 variant (lossless for loading), then any
    other variant such as non_ema."""
    groups: dict[tuple[int, int, str], list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix not in (".safetensors", ".bin") or not p.is_file():
            continue
        stem = _SHARD.sub("", p.name[: -len(p.suffix)])
        variant = stem.partition(".")[2]
        rank = (0 if not variant else 1 if variant == "fp16" else 2, 0 if p.suffix == ".safetensors" else 1)
        groups.setdefault((*rank, variant), []).append(p)
    return groups[min(groups)] if groups else []


def _is_diffusers_folder(folder: Path) -> bool:
    return (folder / "model_index.json").is_file() or all(
        (folder / c / "config.json").is_file() for c in _DIFFUSERS_COMPONENTS
    )


def _diffusers_family(index: dict[str, Any], configs: dict[str, dict[str, Any]]) -> str:
    name = str(index.get("_class_name", ""))
    unet = configs.get("unet", {})
    if "XL" in name or "text_encoder_2" in index or unet.get("addition_embed_type"):
        return "SDXL"
    cross = unet.get("cross_attention_dim")
    # Anything else is judged by config_from_diffusers, which names the unsupported field.
    base = "SD2.x" if cross == 1024 or unet.get("use_linear_projection") else "SD1.x"
    channels = unet.get("in_channels", 4)
    if channels == 9 or "Inpaint" in name:
        return f"{base} inpainting"
    if channels == 5 and base == "SD2.x":
        return "SD2.x depth"
    return base


def _open_diffusers(path: str) -> _Source:
    folder = Path(path)
    index = _read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    configs: dict[str, dict[str, Any]] = {}
    for comp in _DIFFUSERS_COMPONENTS:
        if (folder / comp / "config.json").is_file():
            configs[comp] = _read_json(folder / comp / "config.json")
    family = _diffusers_family(index, configs)
    if family not in ("SD1.x", "SD1.x inpainting"):
        raise CheckpointError(
            f"{path}: this is {_article(family)} {family} diffusers folder; {SUPPORTED}", family=family
        )
    absent = [c for c in _DIFFUSERS_COMPONENTS if c not in configs]
    if absent:
        files = ", ".join(c + "/config.json" for c in absent)
        raise CheckpointError(f"{path}: diffusers folder without {files}")
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler = _read_json(scheduler_file) if scheduler_file.is_file() else None
    try:
        config = config_from_diffusers(configs["unet"], configs["vae"], configs["text_encoder"], scheduler)
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}; {SUPPORTED}") from None

    keymap = diffusers_key_map(config)
    reshape = vae_reshape_keys(config)
    entries: dict[str, _Entry] = {}
    formats: set[str] = set()
    size = 0
    for comp in _DIFFUSERS_COMPONENTS:
        files = _weight_files(folder / comp)
        if not files:
            raise CheckpointError(
                f"{path}: no weights in {comp}/ (expected *.safetensors or *.bin next to config.json)"
            )
        for file in files:
            sub = _open_file(str(file))
            formats.add(file.name.rpartition(".")[2])
            size += sub.size_bytes
            for key, entry in sub.entries.items():
                norm = normalize_diffusers_key(comp, key)
                ldm = keymap[comp].get(norm)
                if ldm is None:  # left under its own name so the plan reports it as unexpected
                    ldm = f"{comp}/{key}"
                elif norm in reshape and len(entry.shape) == 2:  # linear -> 1x1 conv, same data order
                    entry = entry.reshaped((*entry.shape, 1, 1))
                if ldm in entries:
                    raise CheckpointError(f"{path}: {comp} weight {key!r} appears twice")
                entries[ldm] = entry
    fmt = f"diffusers folder ({'/'.join(sorted(formats))})"
    return _Source(path, fmt, entries, config, "diffusers config.json files", {}, size)


def _article(phrase: str) -> str:
    # "an SD1.x ...", "an SDXL ...", "a LoRA", "a VAE": SD is read "ess-dee".
    return "an" if phrase.startswith("SD") or phrase[:1].lower() in "aeiou" else "a"


# ---------------------------------------------------------------------------------------------------------
# Opening any path
# ---------------------------------------------------------------------------------------------------------


def _open_file(path: str) -> _Source:
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read ({error.strerror or error})") from None
    kind = _sniff(head, size)
    if kind == "safetensors":
        with _tagged(format=FORMAT_SAFETENSORS, family="unreadable"):
            return _open_safetensors(path, size)
    if kind == "zip":
        with _tagged(format=FORMAT_CKPT, family="unreadable"):
            return _open_ckpt(path, size)
    what = kind
    if kind == "a JSON file" and os.path.basename(path) in ("config.json", "model_index.json"):
        what += " (a diffusers config: pass the whole diffusers folder instead)"
    raise CheckpointError(
        f"{path}: {what}, not a model checkpoint; {SUPPORTED}", family="not a model", format=kind
    )


def _open(path: str | os.PathLike) -> _Source:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory", format="missing")
    if os.path.isdir(path):
        folder = Path(path)
        if _is_diffusers_folder(folder):
            with _tagged(format="diffusers folder"):
                return _open_diffusers(path)
        if (folder / "config.json").is_file() and _weight_files(folder):
            raise CheckpointError(
                f"{path}: a single diffusers component folder; pass the pipeline folder with "
                f"model_index.json instead; {SUPPORTED}",
                family="diffusers component",
                format="directory",
            )
        raise CheckpointError(
            f"{path}: a directory but not a diffusers folder (no model_index.json); {SUPPORTED}",
            family="not a model",
            format="directory",
        )
    return _open_file(path)


# ---------------------------------------------------------------------------------------------------------
# Recognising what a state dict is
# ---------------------------------------------------------------------------------------------------------

_LORA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lycoris_")
_LORA_PARTS = (
    ".lora_down.",
    ".lora_up.",
    "lora_A.",
    "lora_B.",
    ".lora.down.",
    ".lora.up.",
    ".hada_w1_",
    ".lokr_w1",
)
_VAE_ONLY_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "loss.", EMA_PREFIX)
_NOT_FULL = ", not a full checkpoint"
_PASS_FOLDER = (
    ", a single diffusers component: pass the whole diffusers folder (with model_index.json) instead"
)


@dataclass(frozen=True)
class _Family:
    name: str  # "SD1.x", "SD1.x inpainting", "SD2.x", "SDXL", "LoRA", "VAE", ..., "unknown"
    problem: str | None = None  # why it cannot be loaded as SD1.x; None when it is an SD1.x checkpoint


def _refuse(name: str, phrase: str, evidence: str, extra: str = "") -> _Family:
    """A family we recognise but do not load, with a one-line reason naming the evidence."""
    what = f"this is {_article(phrase)} {phrase}"
    return _Family(name, f"{what} ({_one_line(evidence, 120)}){extra}; {SUPPORTED}")


def _identify(shapes: Mapping[str, tuple[int, ...]]) -> _Family:
    """Model family from key names and a few shapes (no tensor data needed)."""
    keys = list(shapes)
    if not keys:
        return _Family("unknown", f"contains no tensors; {SUPPORTED}")

    def first(pred: Callable[[str], bool]) -> str | None:
        return next((k for k in keys if pred(k)), None)

    if key := first(lambda k: k.startswith(_LORA_PREFIXES) or any(p in k for p in _LORA_PARTS)):
        return _refuse("LoRA", "LoRA", f"key {key}", ", an add-on for a base model, not a full checkpoint")
    if (key := first(lambda k: k.startswith(("string_to_param", "emb_params")))) and len(keys) <= 4:
        return _refuse("textual inversion", "textual inversion embedding", f"key {key}", _NOT_FULL)
    if key := first(lambda k: k.startswith(("conditioner.embedders.", UNET_PREFIX + "label_emb."))):
        return _refuse("SDXL", "SDXL checkpoint", f"key {key}")
    if key := first(
        lambda k: (
            k.startswith("control_model.")
            or any(p in k for p in ("input_hint_block.", "zero_convs.", "controlnet_cond_embedding."))
        )
    ):
        return _refuse("ControlNet", "ControlNet", f"key {key}", _NOT_FULL)

    unet_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    in_channels = unet_in[1] if unet_in is not None and len(unet_in) == 4 else None
    context = next(
        (s[1] for k, s in shapes.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")),
        None,
    )
    openclip = first(lambda k: k.startswith("cond_stage_model.model."))
    if openclip or context == 1024:
        evidence = f"OpenCLIP text encoder key {openclip}" if openclip else "1024-dim cross-attention"
        name = "SD2.x" + {9: " inpainting", 5: " depth"}.get(in_channels or 4, "")
        return _refuse(name, f"{name} checkpoint", evidence)

    has_unet = first(lambda k: k.startswith(UNET_PREFIX)) is not None
    has_clip = first(lambda k: k.startswith(TEXT_ENCODER_PREFIX)) is not None
    has_vae = first(lambda k: k.startswith(VAE_PREFIX)) is not None
    if has_unet or (has_clip and has_vae):
        if in_channels == 9:
            return _Family("SD1.x inpainting")  # latents, mask, masked-image latents (sd.inpaint_sampling)
        if in_channels is not None and in_channels != 4:
            name = {9: "SD1.x inpainting", 8: "SD1.x InstructPix2Pix"}.get(
                in_channels, f"SD1.x {in_channels}-channel"
            )
            evidence = f"U-Net input_blocks.0.0.weight takes {in_channels} input channels, not 4"
            return _refuse(name, f"{name} checkpoint", evidence)
        return _Family("SD1.x")

    if has_vae and all(k.startswith((VAE_PREFIX, EMA_PREFIX)) or k in IGNORED_KEYS for k in keys):
        return _refuse("VAE", "standalone VAE", "only first_stage_model.* keys", _NOT_FULL)
    if all(k.startswith(_VAE_ONLY_PREFIXES) for k in keys) and first(
        lambda k: k.startswith(("encoder.", "decoder."))
    ):
        diffusers = first(lambda k: ".down_blocks." in k or ".up_blocks." in k)
        layout = "diffusers layout" if diffusers else "original layout"
        evidence = f"encoder.*/decoder.* keys without the first_stage_model. prefix, {layout}"
        return _refuse("VAE", "standalone VAE", evidence, _NOT_FULL)
    if has_clip and all(k.startswith(TEXT_ENCODER_PREFIX) for k in keys):
        return _refuse("text encoder", "standalone text encoder", "only cond_stage_model.* keys", _NOT_FULL)
    if "conv_in.weight" in shapes and first(lambda k: k.startswith(("down_blocks.", "mid_block."))):
        evidence = "down_blocks.*/mid_block.* keys"
        return _refuse("diffusers U-Net", "diffusers U-Net file", evidence, _PASS_FOLDER)
    if first(lambda k: k.startswith(("text_model.encoder.layers.", "encoder.layers."))) and first(
        lambda k: k.endswith("embeddings.token_embedding.weight")
    ):
        return _refuse("CLIP text encoder", "CLIP text encoder file", "encoder.layers.* keys", _PASS_FOLDER)
    shown = _fmt_keys(sorted(keys))
    return _Family("unknown", f"no Stable Diffusion weights recognised (keys {shown}); {SUPPORTED}")


# ---------------------------------------------------------------------------------------------------------
# Matching a file against the modules: the plan
# ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _expected_shapes(config: ModelConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    """Per component: module state-dict key -> shape, from modules built on the meta device."""
    models = build_models(config, device="meta")
    return {c: {k: tuple(v.shape) for k, v in m.state_dict().items()} for c, m in models.items()}


def _ldm_key(component: str, key: str) -> str:
    """Our module key -> original checkpoint key (inverse of keymap.split_ldm_key)."""
    for ldm_prefix, our_prefix in LDM_COMPONENT_PREFIXES[component]:
        if key.startswith(our_prefix):
            return ldm_prefix + key[len(our_prefix) :]
    raise AssertionError(f"no LDM prefix for {component} key {key}")


def _ema_key(ldm_key: str) -> str:
    # LitEma names: 'model.' dropped, remaining dots removed (buffer names cannot contain dots).
    return EMA_PREFIX + ldm_key[len("model.") :].replace(".", "")


def _is_vae_attention_reshape(component: str, key: str, got: tuple[int, ...], want: tuple[int, ...]) -> bool:
    # Files converted from diffusers may store the VAE mid attention as linear [C, C] weights.
    return component in ("encoder", "decoder") and ".mid.attn_1." in key and want == (*got, 1, 1)


_COMPONENT_LABELS = {
    "clip": "text encoder (cond_stage_model.*)",
    "encoder": "VAE encoder (first_stage_model.encoder.*)",
    "decoder": "VAE decoder (first_stage_model.decoder.*)",
    "diffusion": "U-Net (model.diffusion_model.*)",
}


@dataclass
class _Plan:
    config: ModelConfig
    tensors: dict[str, dict[str, _Entry]]  # component -> module key -> entry (already reshaped)
    ema: bool


def _plan(source: _Source, config: ModelConfig, use_ema: bool = True) -> _Plan:
    """Check every key and shape of `source` against the modules `config` builds; no tensor is read."""
    shapes = {k: e.shape for k, e in source.entries.items()}
    family = _identify(shapes)
    if family.problem:
        raise CheckpointError(f"{source.path}: {family.problem}", family=family.name, format=source.format)
    expected = _expected_shapes(config)
    entries = dict(source.entries)

    ema_used = False
    unet_keys = [_ldm_key("diffusion", k) for k in expected["diffusion"]]
    ema_keys = [_ema_key(k) for k in unet_keys]
    if use_ema and all(k in entries for k in ema_keys):
        for key, ema in zip(unet_keys, ema_keys, strict=True):
            entries[key] = entries[ema]
        ema_used = True

    tensors: dict[str, dict[str, _Entry]] = {c: {} for c in expected}
    unexpected: list[str] = []
    mismatched: dict[str, str] = {}  # LDM key -> "expected [..] got [..]"
    for key, entry in entries.items():
        if key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES):
            continue
        split = split_ldm_key(key)
        if split is not None and split[0] == "clip" and not split[1].startswith("text_model."):
            split = ("clip", "text_model." + split[1])  # saved by an old transformers without that level
        if split is None or split[1] not in expected[split[0]]:
            unexpected.append(key)
            continue
        component, module_key = split
        want = expected[component][module_key]
        if entry.shape != want:
            if not _is_vae_attention_reshape(component, module_key, entry.shape, want):
                mismatched[key] = f"expected {list(want)} got {list(entry.shape)}"
                continue
            entry = entry.reshaped(want)
        tensors[component][module_key] = entry

    layout = _config_name(config)
    hint = " (a different model size? no config is stored with the file)" if source.config is None else ""
    missing = [
        _ldm_key(c, k)
        for c, keys in expected.items()
        for k in keys
        if k not in tensors[c] and _ldm_key(c, k) not in mismatched
    ]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys ({_fmt_keys(missing)})")
            absent = [_COMPONENT_LABELS[c] for c in expected if expected[c] and not tensors[c]]
            if absent:
                parts.append(f"the file has no {' and no '.join(absent)} weights")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys ({_fmt_keys(unexpected)})")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches{hint}")
        raise CheckpointError(
            f"{source.path}: does not match the {layout} layout: {'; '.join(parts)}",
            family=family.name,
            format=source.format,
        )
    if mismatched:
        shown = "; ".join(f"{k} {v}" for k, v in list(mismatched.items())[:2])
        more = "; ..." if len(mismatched) > 2 else ""
        raise CheckpointError(
            f"{source.path}: {len(mismatched)} shape mismatches for the {layout} layout: {shown}{more}{hint}",
            family=family.name,
            format=source.format,
        )
    return _Plan(config, tensors, ema_used)


def _default_config(source: _Source) -> ModelConfig:
    """SD1.5 for a file that stores no config; SD1.5 inpainting for one whose U-Net takes 9 channels."""
    unet_in = source.entries.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if unet_in is not None and len(unet_in.shape) == 4 and unet_in.shape[1] == 9:
        return SD15_INPAINTING
    return SD15


def _config_name(config: ModelConfig) -> str:
    if config == SD15_INPAINTING:
        return "SD1.5 inpainting"
    return "SD1.5" if config == SD15 else "custom-size SD1.x"


def _materialize(
    plan: _Plan, models: dict[str, nn.Module], device: torch.device | str, dtype: torch.dtype | None
) -> dict[str, nn.Module]:
    """Fill meta-device `models`: read, convert and assign tensor by tensor (peak ~ final size)."""
    device = torch.device(device)
    target = dtype or torch.float32
    for component, module in models.items():
        state: dict[str, torch.Tensor] = {}
        for key, entry in plan.tensors[component].items():
            tensor, owned = entry.read()
            want = target if tensor.is_floating_point() else tensor.dtype
            # Conv weights are copied straight into the layout they will run in (models.CHANNELS_LAST),
            # so prefer_channels_last below has nothing left to copy.
            layout = torch.channels_last if component in CHANNELS_LAST and tensor.dim() == 4 else None
            if owned and tensor.dtype == want and tensor.device == device and layout is None:
                value = tensor
            else:
                # copy=True: the result owns its memory, never a view of the file mapping.
                layout = layout or torch.contiguous_format
                value = tensor.to(device=device, dtype=want, copy=True, memory_format=layout)
                entry.release(tensor)
            del tensor
            state[key] = value
        module.load_state_dict(state, strict=True, assign=True)
        del state
        _fill_non_persistent_buffers(plan.config, component, module, device, target)
        prefer_channels_last(component, module).eval().requires_grad_(False)
    return models


def _fill_non_persistent_buffers(
    config: ModelConfig, component: str, module: nn.Module, device: torch.device, dtype: torch.dtype
) -> None:
    """Non-persistent buffers are in no file, so after a meta build they are still meta. None exist today;
    should one be added, its value comes from a regular (allocating) build, at a cost paid only then."""
    missing = [name for name, buf in module.named_buffers() if buf.is_meta]
    if not missing:
        return
    with torch.random.fork_rng(devices=[]):  # the throwaway build must not move the global RNG
        fresh = dict(build_models(config)[component].named_buffers())
    for name in missing:
        owner_name, _, attr = name.rpartition(".")
        value = fresh[name]
        value = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
        module.get_submodule(owner_name).register_buffer(attr, value, persistent=False)


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def load_models(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    *,
    config: ModelConfig | None = None,
    use_ema: bool = True,
    components: Sequence[str] = COMPONENTS,
) -> dict[str, nn.Module]:
    """Load {"clip", "encoder", "decoder", "diffusion"} (eval mode) from an SD1.x checkpoint.

    `path`: original .ckpt / .safetensors file (format detected from content) or diffusers folder.
    `device="meta"` checks the file as usual but reads no weights: the modules come back weightless, for
    callers that may not need them (the OpenVINO backend with its IR cached).
    `dtype`: floating-point dtype of the weights (default float32, whatever the file stores).
    `config`: architecture to build; default the one stored with the file (our saver's metadata, a
    diffusers folder's config.json files), else SD1.5. `use_ema`: prefer EMA U-Net weights when present.
    `components`: the ones to return (the whole file is checked either way).
    Raises CheckpointError (one line) for anything that is not a loadable SD1.x checkpoint.
    """
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"unknown components {unknown}; choose from {list(COMPONENTS)}")
    if torch.device(device).type == "cpu":
        tune_malloc()  # before the weights: they are allocated once, the activations every step
    source = _open(path)
    plan = _plan(source, config or source.config or _default_config(source), use_ema)
    del source  # the plan's entries hold what is needed; the file mapping goes when they do
    built = build_models(plan.config, device="meta", dtype=dtype)
    models = {name: built[name] for name in components}
    if torch.device(device).type == "meta":
        return models  # checked, and nothing read
    return _materialize(plan, models, device, dtype)


def schedule_buffers(schedule: ScheduleConfig) -> dict[str, torch.Tensor]:
    """The 12 LatentDiffusion.register_schedule buffers of the original file (float32).

    Same arithmetic as ldm/models/diffusion/ddpm.py: betas from torch.linspace in float64, the rest in
    float64 numpy, each cast to float32 at the end.
    """
    start, end, steps = schedule.beta_start**0.5, schedule.beta_end**0.5, schedule.num_train_timesteps
    betas = (torch.linspace(start, end, steps, dtype=torch.float64) ** 2).numpy()
    alphas = 1.0 - betas
    ac = np.cumprod(alphas, axis=0)
    ac_prev = np.append(1.0, ac[:-1])
    posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)  # v_posterior = 0
    values = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
    }
    return {k: torch.tensor(values[k], dtype=torch.float32) for k in LDM_SCHEDULE_BUFFERS}


def _cast_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    # Only floating-point tensors change dtype (position_ids stays int64).
    return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(_cast_dtype(tensor, dtype))


def _checkpoint_items(models: Mapping[str, nn.Module], config: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """(original key, tensor) pairs of a full SD1.x file, sorted by key; tensors are the modules' own
    (no copies; may be meta), so a caller casts one at a time."""
    if set(models) != set(COMPONENTS):
        raise ValueError(f"models must have exactly the components {list(COMPONENTS)}, got {sorted(models)}")
    expected = _expected_shapes(config)
    items: dict[str, torch.Tensor] = {}
    for component in COMPONENTS:
        state = models[component].state_dict()
        want = expected[component]
        bad = [k for k in state if k not in want or tuple(state[k].shape) != want[k]]
        bad += [k for k in want if k not in state]
        if bad:
            raise ValueError(
                f"models[{component!r}] does not match the config ({len(bad)} keys differ, e.g. {bad[0]})"
            )
        for key, tensor in state.items():
            items[_ldm_key(component, key)] = tensor
    items.update(schedule_buffers(config.schedule))
    items[POSITION_IDS] = torch.arange(config.clip.max_length, dtype=torch.int64)[None]
    return sorted(items.items())


def checkpoint_layout(
    config: ModelConfig = SD15, dtype: torch.dtype | None = None
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key -> (shape, dtype) of the file `save_checkpoint` writes for `config` (nothing is allocated)."""
    models = build_models(config, device="meta")
    return {k: (tuple(t.shape), _cast_dtype(t, dtype)) for k, t in _checkpoint_items(models, config)}


def save_checkpoint(
    models: Mapping[str, nn.Module],
    path: str | os.PathLike,
    config: ModelConfig = SD15,
    dtype: torch.dtype | None = None,
) -> None:
    """Write `models` as one original-layout (LDM) checkpoint; `load_models` reads it back bit-exact.

    The file has exactly the key set of the real SD1.5 file (weights with their LDM prefixes, the 12
    schedule buffers, position_ids) and carries `config` as JSON (safetensors metadata "sd_config").
    `.ckpt`/`.pt`/`.pth` paths get a torch.save zip ({"state_dict": ..., "sd_config": ...}); any other
    path a .safetensors file, streamed one tensor at a time. `dtype` casts floating-point tensors.
    """
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    path = Path(path)
    items = _checkpoint_items(models, config)
    if path.suffix in (".ckpt", ".pt", ".pth"):
        state = {k: _cast(t.detach().to("cpu"), dtype).contiguous() for k, t in items}
        torch.save({"state_dict": state, CONFIG_METADATA_KEY: config.to_json()}, path)
    else:
        _write_safetensors(path, items, {"format": "pt", CONFIG_METADATA_KEY: config.to_json()}, dtype)


@dataclass
class CheckpointInfo:
    """What `describe` found at a path (the `sd info` report)."""

    path: str
    format: str = "unknown"  # "safetensors", "ckpt (PyTorch zip pickle)", "diffusers folder (...)", ...
    family: str = "unknown"  # "SD1.x", "SD1.x inpainting", "SD2.x", "SDXL", "LoRA", "VAE", ..., "not a model"
    usable: bool = False
    reason: str | None = None  # why it cannot be loaded (one line); None when usable
    components: dict[str, int] = field(default_factory=dict)  # label -> parameter count
    dtypes: dict[str, int] = field(default_factory=dict)  # dtype name -> number of tensors
    tensors: int = 0
    size_bytes: int = 0
    ema: bool = False  # EMA copies of U-Net weights present (model_ema.*)
    ema_used: bool = False  # ... and complete, so loading uses them
    config: str | None = None  # architecture that would be built, and where it comes from
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors metadata (config JSON left out)


_GROUPS = (
    (UNET_PREFIX, "U-Net"),
    (VAE_PREFIX, "VAE"),
    (TEXT_ENCODER_PREFIX, "text encoder"),
    ("cond_stage_model.", "text encoder (OpenCLIP)"),
    ("conditioner.", "text encoders (SDXL conditioner)"),
    (EMA_PREFIX, "EMA copy of the U-Net"),
)


def _component_label(key: str) -> str | None:
    if key in IGNORED_KEYS:  # schedule buffers, position_ids, EMA counters, logvar: not parameters
        return None
    for prefix, label in _GROUPS:
        if key.startswith(prefix):
            return label
    if "/" in key:  # unmapped diffusers key, "<component>/<key>"
        return key.split("/", 1)[0] + " (unrecognised keys)"
    head = key.split(".", 1)[0]
    if head.startswith("lora_"):  # lora_unet_down_blocks_0_... -> lora_unet
        return "_".join(head.split("_")[:2])
    return head


def _component_counts(source: _Source) -> dict[str, int]:
    counts: dict[str, int] = {label: 0 for _, label in _GROUPS}  # fixes the display order
    for key, entry in source.entries.items():
        label = _component_label(key)
        if label is not None and entry.dtype.is_floating_point:
            counts[label] = counts.get(label, 0) + math.prod(entry.shape)
    return {label: n for label, n in counts.items() if n}


def describe(path: str | os.PathLike, *, config: ModelConfig | None = None) -> CheckpointInfo:
    """Say what `path` is without loading it: family, format, components with parameter counts, dtypes,
    EMA presence, and why it is not usable when it is not (checked against `config` as `load_models`
    would). Reads headers only (safetensors) or maps the file without reading tensor data (.ckpt).
    Never raises CheckpointError: see `.reason`."""
    info = CheckpointInfo(path=os.fspath(path))
    try:
        source = _open(path)
    except CheckpointError as error:
        info.reason = str(error)
        info.family = error.family or "unknown"
        info.format = error.format or "unknown"
        with contextlib.suppress(OSError):
            info.size_bytes = os.path.getsize(path) if os.path.isfile(path) else 0
        return info
    info.format = source.format
    info.size_bytes = source.size_bytes
    info.metadata = {k: v for k, v in source.metadata.items() if k != CONFIG_METADATA_KEY}
    info.tensors = len(source.entries)
    for entry in source.entries.values():
        name = str(entry.dtype).removeprefix("torch.")
        info.dtypes[name] = info.dtypes.get(name, 0) + 1
    info.components = _component_counts(source)
    info.ema = any(k.startswith(EMA_PREFIX) and k not in IGNORED_KEYS for k in source.entries)
    info.family = _identify({k: e.shape for k, e in source.entries.items()}).name
    chosen = config or source.config or _default_config(source)
    origin = "given" if config else f"from {source.config_origin}" if source.config else "default"
    predicts = "v" if chosen.schedule.prediction_type == "v_prediction" else "noise"
    info.config = f"{_config_name(chosen)} ({origin}): {chosen.native_size} px images, predicts {predicts}"
    try:
        plan = _plan(source, chosen)
    except CheckpointError as error:
        info.reason = str(error)
    else:
        info.usable = True
        info.ema_used = plan.ema
    return info


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def format_description(info: CheckpointInfo) -> str:
    """Multi-line human report of `describe`'s result (what `sd info` prints)."""
    status = "usable" if info.usable else "NOT usable"
    lines = [f"{info.path}: {info.family} ({status})"]
    fmt = info.format
    if info.size_bytes:
        fmt += f", {_human_bytes(info.size_bytes)}"
    if info.tensors:
        fmt += f", {info.tensors} tensors"
    lines.append(f"  format:      {fmt}")
    if info.dtypes:
        dtypes = ", ".join(f"{k} ({v})" for k, v in sorted(info.dtypes.items(), key=lambda kv: -kv[1]))
        lines.append(f"  dtypes:      {dtypes}")
    if info.components:
        lines.append("  parameters:")
        width = max(len(k) for k in info.components)
        lines += [f"    {label:<{width}}  {count:>13,}" for label, count in info.components.items()]
    if info.tensors:
        ema = "yes, used for the U-Net" if info.ema_used else "incomplete (ignored)" if info.ema else "no"
        lines.append(f"  EMA weights: {ema}")
    if info.usable and info.config:
        lines.append(f"  config:      {info.config}")
    if info.reason:
        lines.append(f"  reason:      {info.reason}")
    return "\n".join(lines)
