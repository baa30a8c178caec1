"""LoRA files on disk: found by name in a folder as A1111 finds them, read once, and hashed for the PNG.

A1111 indexes its Lora folder recursively by file stem, and also by the alias a kohya file records
(`ss_output_name`). `Lora hashes` in the infotext are "name: h12, ..." with h12 the first 12 hex digits of
the file's `sshs_model_hash` metadata, else of the "addnet" hash (safetensors: sha256 of the data after
the 8-byte length and the JSON header; other files: sha256 of the whole file); names lose ':' and ','.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterable
from pathlib import Path

from ..checkpoints import file_sha256
from ..config import ModelConfig
from .lora import LORA_SUFFIXES, LoraFile, load_lora
from .merge import ActiveLora


def lora_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Every LoRA file under `folder` (recursively, sorted, following links)."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        found.extend(Path(root) / f for f in sorted(files) if Path(f).suffix.lower() in LORA_SUFFIXES)
    return found


def _alias(path: Path) -> str | None:
    """The `ss_output_name` of a safetensors file, from its header alone."""
    if path.suffix.lower() != ".safetensors":
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("ss_output_name")
    except (SafetensorError, OSError):
        return None


def find_lora(folder: str | os.PathLike[str], name: str) -> Path | None:
    """The file a `<lora:name:...>` tag means: by stem, else by alias; None when there is none."""
    files = lora_files(folder)
    for path in files:
        if path.stem == name:
            return path
    for path in files:
        if _alias(path) == name:
            return path
    return None


def addnet_hash(path: str | os.PathLike[str]) -> str:
    """sha256 (hex) of a safetensors file's tensor data: everything after the header."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + header_size)
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


_hashes: dict[tuple[str, int, int], str] = {}


def lora_shorthash(file: LoraFile) -> str:
    """The 12 hex digits A1111 writes for a LoRA file."""
    recorded = file.metadata.get("sshs_model_hash")
    if recorded:
        return recorded[:12]
    if file.stamp not in _hashes:
        is_safetensors = file.path.suffix.lower() == ".safetensors"
        _hashes[file.stamp] = addnet_hash(file.path) if is_safetensors else (file_sha256(file.path) or "")
    return _hashes[file.stamp][:12]


def lora_hashes(loras: Iterable[ActiveLora]) -> str | None:
    """A1111's `Lora hashes` value, "name: h12, ...", for the files of a set; None for none."""
    table = str.maketrans("", "", ":,")
    parts = [f"{lora.name.translate(table)}: {lora_shorthash(lora.file)}" for lora in loras]
    return ", ".join(parts) or None


class LoraCache:
    """Files read once: a file is read again only when it changes on disk (size or mtime)."""

    def __init__(self) -> None:
        self._files: dict[tuple[str, ModelConfig], LoraFile] = {}

    def load(self, path: str | os.PathLike[str], config: ModelConfig) -> LoraFile:
        path = Path(path).expanduser()
        key = (str(path.resolve()), config)
        cached = self._files.get(key)
        if cached is not None and path.is_file():
            stat = path.stat()
            if cached.stamp[1:] == (stat.st_size, stat.st_mtime_ns):
                return cached
        self._files[key] = loaded = load_lora(path, config)
        return loaded

    def keep_only(self, files: Iterable[LoraFile]) -> None:
        """Forget every file but these (their tensors are the memory a set costs)."""
        keep = {id(f) for f in files}
        self._files = {k: f for k, f in self._files.items() if id(f) in keep}
