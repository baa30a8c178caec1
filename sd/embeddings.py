"""Textual-inversion embeddings ("EasyNegative", ...): files in, token-level matching for the chunker.

A1111's rules (textual_inversion.py): every file in the embeddings folder, searched recursively, is one
embedding named by its file stem; its vectors replace the token slots of that name wherever the name's
CLIP tokens appear in a prompt (so matching is case-insensitive), longest name first. Formats:

    A1111 .pt / .bin     {"string_to_param": {"*": (N, 768)}, "name": ...}   torch.load(weights_only=True)
    .safetensors         {"emb_params": (N, 768)} or any single tensor
    diffusers .bin       {"<token>": (768,) or (N, 768)}
    A1111 .png / .webp   an "sd-ti-embedding" text chunk (base64 JSON, tensors as {"TORCHTENSOR": lists})

Only embeddings as wide as the text encoder (768 for SD1) are used; SDXL (clip_g + clip_l) and SD2 (1024)
ones are skipped with the reason, as A1111 skips them.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoints import file_sha256
from .weights import CheckpointError, load_torch_file

log = logging.getLogger("sd")

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors", ".png", ".webp", ".avif", ".jxl")
_IMAGE_SUFFIXES = (".png", ".webp", ".avif", ".jxl")
MAX_VECTORS = 75  # an embedding is never split across chunks, so one must fit in a chunk


class EmbeddingError(ValueError):
    """A file that is not a usable embedding; the message is one line."""


@dataclass(frozen=True, eq=False)
class Embedding:
    name: str
    vectors: torch.Tensor  # (N, width), float32
    path: Path | None = None

    @property
    def width(self) -> int:
        return self.vectors.shape[-1]

    def __len__(self) -> int:
        return self.vectors.shape[0]

    @property
    def shorthash(self) -> str | None:
        """What A1111 writes in `TI hashes`: the file's sha256, 12 hex digits."""
        digest = file_sha256(self.path) if self.path is not None else None
        return digest[:12] if digest else None


def _tensor_from_data(data: Any, where: str) -> torch.Tensor:
    """The (N, width) vectors of a loaded embedding file, by A1111's create_embedding_from_data rules."""
    if not isinstance(data, Mapping):
        raise EmbeddingError(f"{where}: not an embedding (a {type(data).__name__}, not a dict of tensors)")
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)
        if not isinstance(params, Mapping) or len(params) != 1:
            raise EmbeddingError(f"{where}: string_to_param must hold exactly one tensor")
        vectors = next(iter(params.values()))
    elif "clip_g" in data and "clip_l" in data:
        raise EmbeddingError(f"{where}: an SDXL embedding (clip_g + clip_l), not for SD1.x")
    elif len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        vectors = next(iter(data.values()))
    else:
        keys = ", ".join(list(map(str, data))[:4])
        raise EmbeddingError(f"{where}: not an embedding (keys: {keys})")
    if not isinstance(vectors, torch.Tensor) or vectors.ndim not in (1, 2) or not vectors.is_floating_point():
        raise EmbeddingError(f"{where}: the embedding is not a 1-D or 2-D float tensor")
    vectors = vectors.detach().to("cpu", torch.float32)
    return vectors[None] if vectors.ndim == 1 else vectors


def _tensors_in_json(value: Any) -> Any:
    if isinstance(value, dict):
        if "TORCHTENSOR" in value:
            return torch.tensor(value["TORCHTENSOR"], dtype=torch.float32)
        return {k: _tensors_in_json(v) for k, v in value.items()}
    return value


def _read_image_embedding(path: Path) -> tuple[str, Any]:
    from PIL import Image

    with Image.open(path) as image:
        text = getattr(image, "text", {}).get("sd-ti-embedding")
    if text is None:
        # A1111 can also hide the data in the pixels (image_embedding.py); that encoding is not read here.
        raise EmbeddingError(f"{path}: an image without an sd-ti-embedding text chunk (pixel-encoded "
                             "embeddings are not supported)")  # fmt: skip
    try:
        data = _tensors_in_json(json.loads(base64.b64decode(text)))
    except ValueError as error:
        raise EmbeddingError(f"{path}: bad sd-ti-embedding chunk ({error})") from None
    return str(data.get("name", path.stem)) if isinstance(data, dict) else path.stem, data


def load_embedding(path: str | os.PathLike[str]) -> Embedding:
    """One embedding file, named by its stem (images: by the name stored in them). Pickles are opened
    only with torch.load(weights_only=True): a file that needs code to load is refused, unrun."""
    path = Path(path)
    suffix = path.suffix.lower()
    name = path.stem
    if suffix in (".pt", ".bin"):
        try:
            data = load_torch_file(path)
        except CheckpointError as error:
            raise EmbeddingError(str(error)) from None
    elif suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            data = load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as error:
            raise EmbeddingError(f"{path}: cannot read safetensors ({error})") from None
    elif suffix in _IMAGE_SUFFIXES:
        name, data = _read_image_embedding(path)
    else:
        raise EmbeddingError(f"{path}: not an embedding file ({', '.join(EMBEDDING_SUFFIXES)})")
    return Embedding(name, _tensor_from_data(data, str(path)), path)


@dataclass
class Embeddings:
    """The embeddings a prompt can use, indexed by their names' CLIP tokens."""

    tokenize: Any  # str -> list[int], the prompt tokenizer without start/end tokens
    width: int = 768
    by_name: dict[str, Embedding] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # file -> why it is not used
    _by_first_token: dict[int, list[tuple[tuple[int, ...], Embedding]]] = field(default_factory=dict)

    def add(self, embedding: Embedding) -> None:
        """Register `embedding` (a later one of the same name replaces the earlier, as in A1111)."""
        if embedding.width != self.width:
            kind = {1024: "an SD2", 1280: "an SDXL"}.get(embedding.width, "a")
            raise EmbeddingError(f"{embedding.path or embedding.name}: {kind} embedding of width "
                                 f"{embedding.width}; this text encoder needs {self.width}")  # fmt: skip
        if len(embedding) > MAX_VECTORS:
            where = embedding.path or embedding.name
            raise EmbeddingError(f"{where}: {len(embedding)} vectors; a prompt chunk holds {MAX_VECTORS}")
        ids = tuple(self.tokenize(embedding.name))
        if not ids:
            raise EmbeddingError(f"{embedding.path or embedding.name}: the name has no tokens")
        old = self.by_name.pop(embedding.name, None)
        if old is not None:
            for entries in self._by_first_token.values():
                entries[:] = [e for e in entries if e[1] is not old]
        self.by_name[embedding.name] = embedding
        entries = self._by_first_token.setdefault(ids[0], [])
        entries.append((ids, embedding))
        entries.sort(key=lambda entry: len(entry[0]), reverse=True)  # stable: longest name first

    def match(self, tokens: Sequence[int], position: int) -> tuple[Embedding, int] | None:
        """The embedding whose name's tokens start at `tokens[position]`, and how many tokens it covers."""
        for ids, embedding in self._by_first_token.get(tokens[position], ()):
            if tuple(tokens[position : position + len(ids)]) == ids:
                return embedding, len(ids)
        return None

    def __len__(self) -> int:
        return len(self.by_name)

    def load_folder(self, folder: str | os.PathLike[str]) -> None:
        """Every embedding file under `folder` (recursively; A1111's order: os.walk, files sorted)."""
        for path in _embedding_files(Path(folder)):
            try:
                self.add(load_embedding(path))
            except EmbeddingError as error:
                self.skipped[str(path)] = str(error)
                log.warning("embedding skipped: %s", error)

    @classmethod
    def from_files(
        cls, paths: Iterable[str | os.PathLike[str]], tokenize: Any, width: int = 768
    ) -> Embeddings:
        found = cls(tokenize, width)
        for path in paths:
            path = Path(path)
            if path.is_dir():
                found.load_folder(path)
            else:
                found.add(load_embedding(path))
        return found


def ti_hashes(embeddings: Iterable[Embedding]) -> str | None:
    """A1111's `TI hashes` infotext value, "name: hash, ..." (names lose ':' and ','), None for none."""
    parts = []
    for embedding in embeddings:
        shorthash = embedding.shorthash
        if shorthash:
            parts.append(f"{embedding.name.replace(':', '').replace(',', '')}: {shorthash}")
    return ", ".join(parts) or None


def _embedding_files(folder: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            suffix = path.suffix.lower()
            if suffix not in EMBEDDING_SUFFIXES or path.stat().st_size == 0:
                continue
            if suffix in _IMAGE_SUFFIXES and Path(path.stem).suffix.lower() == ".preview":
                continue  # a preview picture of a model, not an embedding
            found.append(path)
    return found


__all__ = ["EMBEDDING_SUFFIXES", "Embedding", "EmbeddingError", "Embeddings", "load_embedding", "ti_hashes"]
