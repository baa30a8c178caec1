"""Where checkpoints are found, and the short hash that identifies one in PNG parameters."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CHECKPOINT_ENV = "SD_CHECKPOINT"
DEFAULT_NAMES = ("v1-5-pruned-emaonly.safetensors", "v1-5-pruned-emaonly.ckpt")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
# A small model trained on sd.shapes' synthetic dataset ships with the package, so that everything
# works on the first command; it draws coloured shapes, not photographs.
BUILTIN_MODEL = Path(__file__).parent / "data" / "shapes-builtin.safetensors"


def builtin_notice() -> str:
    return (
        "no checkpoint given: using the built-in shapes model (coloured shapes on plain backgrounds); for "
        f"SD1.5 pass --ckpt PATH, set {CHECKPOINT_ENV}, or put {DEFAULT_NAMES[0]} in {default_model_dir()}"
    )


def default_model_dir() -> Path:
    """$SD_HOME/models, else $XDG_DATA_HOME/sd/models, else ~/.local/share/sd/models."""
    if "SD_HOME" in os.environ:
        return Path(os.environ["SD_HOME"]) / "models"
    data_home = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    return data_home / "sd" / "models"


def default_embeddings_dir() -> Path | None:
    """`embeddings` in the default model folder (A1111's layout), if it exists."""
    folder = default_model_dir() / "embeddings"
    return folder if folder.is_dir() else None


def find_checkpoint(path: str | os.PathLike[str] | None = None) -> Path | None:
    """The checkpoint to use: `path`, else $SD_CHECKPOINT, else one in the default folder; None if none.

    In the default folder the official file names win; otherwise a single checkpoint file or diffusers
    folder there is taken. An explicit path that does not exist is an error, not a fallback.
    """
    for given, source in ((path, "--ckpt"), (os.environ.get(CHECKPOINT_ENV), f"${CHECKPOINT_ENV}")):
        if given:
            given = Path(given).expanduser()
            if not given.exists():
                raise FileNotFoundError(f"checkpoint not found: {given} (from {source})")
            return given
    folder = default_model_dir()
    if not folder.is_dir():
        return None
    for name in DEFAULT_NAMES:
        if (folder / name).exists():
            return folder / name
    candidates = sorted(
        p for p in folder.iterdir() if p.suffix in CHECKPOINT_SUFFIXES or (p / "model_index.json").exists()
    )
    return candidates[0] if len(candidates) == 1 else None


def missing_checkpoint_message() -> str:
    return (
        f"no checkpoint found: pass --ckpt PATH, set {CHECKPOINT_ENV}, or put "
        f"{DEFAULT_NAMES[0]} (or .ckpt, or a diffusers folder) in {default_model_dir()}"
    )


def model_hash(path: str | os.PathLike[str]) -> str | None:
    """A1111's short model hash: the first 10 hex digits of the file's sha256 (None for folders)."""
    digest = file_sha256(path)
    return None if digest is None else digest[:10]


def file_sha256(path: str | os.PathLike[str]) -> str | None:
    """The sha256 of a file, in hex (None for folders).

    Hashing 4 GB takes seconds, so results are cached by (path, size, mtime) under ~/.cache/sd.
    """
    path = Path(path).resolve()
    if not path.is_file():
        return None
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sd" / "hashes.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if len(cache.get(key, "")) != 64:  # absent, or a 10-digit entry of an older version
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        cache[key] = digest.hexdigest()
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_text(json.dumps(cache))
        except OSError:
            pass  # a read-only home only costs the cache
    return cache[key]
