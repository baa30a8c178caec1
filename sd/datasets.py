"""Captioned image folders, the training data of `sd train`.

Two layouts are read, both common for text-to-image data:

* `metadata.jsonl` with one `{"file_name": ..., "text": ...}` object per line (the Hugging Face
  image-folder convention; `sd make-shapes` writes it), or
* `NAME.png` (or .jpg, .webp, ...) with its caption in `NAME.txt` beside it.

Images are made square at the training resolution by resizing the shorter side and cropping the centre,
the usual SD fine-tuning preprocessing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from .images import load_image, pil_to_tensor

METADATA_FILE = "metadata.jsonl"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class CaptionedImage:
    """One training example: an image file and its caption."""

    path: Path
    caption: str


def _read_metadata(folder: Path) -> list[CaptionedImage]:
    items = []
    for number, line in enumerate((folder / METADATA_FILE).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            items.append(CaptionedImage(folder / record["file_name"], str(record["text"])))
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(
                f"{folder / METADATA_FILE} line {number}: expected a JSON object with "
                f"'file_name' and 'text' ({error})"
            ) from None
    missing = [item.path for item in items if not item.path.is_file()]
    if missing:
        raise ValueError(f"{len(missing)} images listed in {METADATA_FILE} are missing, e.g. {missing[0]}")
    return items


def _read_caption_files(folder: Path) -> list[CaptionedImage]:
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    uncaptioned = [p for p in images if not p.with_suffix(".txt").is_file()]
    if uncaptioned:
        raise ValueError(
            f"{len(uncaptioned)} of {len(images)} images in {folder} have no caption file, "
            f"e.g. {uncaptioned[0].name} needs {uncaptioned[0].with_suffix('.txt').name}"
        )
    return [CaptionedImage(p, p.with_suffix(".txt").read_text().strip()) for p in images]


def read_captioned_folder(folder: str | Path) -> list[CaptionedImage]:
    """The (image, caption) pairs of a folder: from metadata.jsonl if there is one, else NAME.txt files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"dataset folder not found: {folder}")
    items = _read_metadata(folder) if (folder / METADATA_FILE).is_file() else _read_caption_files(folder)
    if not items:
        raise ValueError(f"no captioned images in {folder} (need {METADATA_FILE} or NAME.png + NAME.txt)")
    return items


def square_resize(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size` and crop the centre square (a no-op at the right size)."""
    if image.size == (size, size):
        return image
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


class CaptionedImages(Dataset):
    """`dataset[i]` -> (pixels (3, size, size) float32 in [-1, 1], caption)."""

    def __init__(self, items: Sequence[CaptionedImage], size: int):
        self.items = list(items)
        self.size = size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        item = self.items[index]
        pixels = pil_to_tensor(square_resize(load_image(item.path), self.size))[0]
        return pixels, item.caption

    @property
    def captions(self) -> list[str]:
        return [item.caption for item in self.items]


def shorter_side(path: str | Path) -> int:
    """The shorter side of an image file (read from its header)."""
    with Image.open(path) as image:
        return min(image.size)
