"""What the server can list, in A1111's shapes: checkpoints, VAEs, LoRAs, embeddings, memory.

Folders follow A1111's layout inside our model folder (sd.checkpoints.default_model_dir): checkpoints
directly in it or under `Stable-diffusion/`, VAEs under `VAE/`, LoRAs in the pipeline's `lora_dir`.
Listings are read from disk on every call, so /refresh-* have nothing to do.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoints import CHECKPOINT_SUFFIXES, file_sha256
from ..networks.library import lora_files

VAE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint as A1111 lists it: title "name.ext [hash]" (the hash once known), model_name the
    stem, filename the path."""

    path: Path
    name: str  # relative to its folder, with the extension (A1111's "name")
    hash: str | None = None
    sha256: str | None = None

    @property
    def model_name(self) -> str:
        return Path(self.name).with_suffix("").as_posix() if self.path.is_file() else self.name

    @property
    def title(self) -> str:
        return f"{self.name} [{self.hash}]" if self.hash else self.name

    def item(self) -> dict[str, Any]:
        return {"title": self.title, "model_name": self.model_name, "hash": self.hash,
                "sha256": self.sha256, "filename": str(self.path), "config": None}  # fmt: skip

    def matches(self, wanted: str) -> bool:
        """A1111's checkpoint aliases: the title, the name, the stem, the short hash, the path."""
        names = {self.title, self.name, self.model_name, str(self.path), self.path.name}
        return wanted in names or (self.hash is not None and wanted == self.hash)


def _cached_sha256(path: Path) -> str | None:
    """The sha256 only if sd.checkpoints already hashed the file (a listing must not read 4 GB files)."""
    cache_file = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sd" / "hashes.json"
    try:
        cache = json.loads(cache_file.read_text())
        stat = path.resolve().stat()
    except (OSError, ValueError):
        return None
    digest = cache.get(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}")
    return digest if isinstance(digest, str) and len(digest) == 64 else None


def checkpoint_of(path: Path, folder: Path | None = None, hashed: bool = False) -> Checkpoint:
    """`path` as listed (relative to `folder`); `hashed`: compute its hash if not cached."""
    name = path.relative_to(folder).as_posix() if folder is not None else path.name
    digest = file_sha256(path) if hashed else _cached_sha256(path)
    return Checkpoint(path, name, digest[:10] if digest else None, digest)


def checkpoints(models_dir: Path | None) -> list[Checkpoint]:
    """Checkpoint files (and diffusers folders) in `models_dir` and `models_dir/Stable-diffusion/**`."""
    if models_dir is None or not models_dir.is_dir():
        return []
    found: list[Checkpoint] = []

    def usable(path: Path) -> bool:
        return path.suffix.lower() in CHECKPOINT_SUFFIXES or (path / "model_index.json").is_file()

    for path in sorted(models_dir.iterdir()):
        if usable(path):
            found.append(checkpoint_of(path, models_dir))
    a1111 = models_dir / "Stable-diffusion"
    if a1111.is_dir():
        for path in sorted(a1111.rglob("*")):
            if usable(path) and not any(p.suffix == "" and (p / "model_index.json").is_file()
                                        for p in path.parents if a1111 in p.parents):  # fmt: skip
                found.append(checkpoint_of(path, a1111))
    return found


def vae_files(folder: Path | None) -> list[Path]:
    """VAE files under `folder` (A1111's models/VAE), sorted."""
    try:
        from ..vae_swap import vae_files as swap_files  # the pipeline's own listing, where it exists
    except ImportError:
        if folder is None or not folder.is_dir():
            return []
        return [p for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix.lower() in VAE_SUFFIXES]
    return swap_files(folder)


def vae_items(folder: Path | None) -> list[dict[str, str]]:
    """A1111's /sd-vae: model_name (the file's name relative to the folder) and filename (its path)."""
    return [{"model_name": p.relative_to(folder).as_posix(), "filename": str(p)} for p in vae_files(folder)]


def _safetensors_metadata(path: Path) -> dict[str, Any]:
    """A safetensors header's metadata, JSON values parsed as A1111 parses them."""
    if path.suffix.lower() != ".safetensors":
        return {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError):
        return {}
    for key, value in metadata.items():
        if isinstance(value, str) and value[:1] == "{":
            with contextlib.suppress(ValueError):  # not JSON after all: kept as text
                metadata[key] = json.loads(value)
    return metadata


def lora_items(folder: Path | None) -> list[dict[str, Any]]:
    """A1111's /sdapi/v1/loras: name (the stem), alias (ss_output_name, else the name), path, metadata."""
    if folder is None or not Path(folder).is_dir():
        return []
    items = []
    for path in lora_files(folder):
        metadata = _safetensors_metadata(path)
        alias = metadata.get("ss_output_name")
        items.append({"name": path.stem, "alias": alias if isinstance(alias, str) and alias else path.stem,
                      "path": str(path), "metadata": metadata})  # fmt: skip
    return items


def embedding_items(embeddings: Any) -> dict[str, dict[str, Any]]:
    """A1111's /embeddings: loaded ones with their vector count and width; skipped files by name."""
    loaded = {
        name: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
               "shape": int(getattr(e, "width", 0) or e.vectors.shape[-1]), "vectors": len(e)}
        for name, e in embeddings.by_name.items()
    }  # fmt: skip
    skipped = {
        Path(file).stem: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 0,
                          "vectors": 0}
        for file in embeddings.skipped
    }  # fmt: skip
    return {"loaded": loaded, "skipped": skipped}


def memory() -> dict[str, Any]:
    """A1111's /memory: RAM in bytes (free, used, total) and CUDA's, as far as this machine can say."""
    ram: dict[str, Any]
    try:
        page, pages = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_PHYS_PAGES")
        free = os.sysconf("SC_AVPHYS_PAGES") * page
        ram = {"free": free, "used": pages * page - free, "total": pages * page}
    except (ValueError, OSError, AttributeError):
        ram = {"error": "unknown on this system"}
    cuda: dict[str, Any] = {"error": "unavailable"}
    try:
        import torch

        if torch.cuda.is_available():
            free_b, total_b = torch.cuda.mem_get_info()
            stats = torch.cuda.memory_stats()
            cuda = {
                "system": {"free": free_b, "used": total_b - free_b, "total": total_b},
                "active": {"current": stats.get("active_bytes.all.current", 0),
                           "peak": stats.get("active_bytes.all.peak", 0)},
                "allocated": {"current": stats.get("allocated_bytes.all.current", 0),
                              "peak": stats.get("allocated_bytes.all.peak", 0)},
                "reserved": {"current": stats.get("reserved_bytes.all.current", 0),
                             "peak": stats.get("reserved_bytes.all.peak", 0)},
            }  # fmt: skip
    except Exception as error:  # a broken driver must not break /memory
        cuda = {"error": str(error).splitlines()[0] if str(error) else type(error).__name__}
    return {"ram": ram, "cuda": cuda}
