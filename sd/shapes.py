"""Synthetic captioned shapes: a tiny text-to-image dataset whose captions can be checked from pixels.

Three parts, top to bottom:
  * the caption grammar: `Scene` is the structured truth of a caption; `random_caption` samples one,
    `describe` writes one for a scene and `parse_caption` reads one back;
  * the generator: `render_scene` draws a scene and `make_shapes` writes a dataset folder
    (`sd make-shapes`, wired by `add_make_shapes_command`);
  * the scorer: `detect` reads background and shapes from the pixels alone; `score_image` /
    `score_batch` say whether an image shows what its caption says (background colour, shape colour,
    kind, size, position, count).

Captions look like "a small red circle at the top left on a blue background" or
"a green square at the left and a large yellow star at the bottom right on a white background".
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

# ---------------------------------------------------------------------------------------------------------
# Vocabulary: what a scene can contain. Everything below is driven by these tables.

# Named colours, far apart in RGB (closest pair ~100 of 441) so the nearest palette colour of a blurred,
# noisy or badly generated pixel still names the intended colour.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 135, 0),
    "yellow": (250, 230, 40),
    "green": (30, 160, 50),
    "cyan": (0, 200, 220),
    "blue": (30, 60, 220),
    "purple": (140, 40, 190),
    "pink": (250, 130, 200),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
}
COLORS = tuple(PALETTE)
KINDS = ("circle", "square", "triangle", "diamond", "star", "cross")
# Side of the shape's bounding box as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.18, "large": 0.30}
# 3x3 grid cells as (column, row).
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "center": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}  # fmt: skip

# Where shapes are drawn inside their cell (fraction of the image side). The outer cells' centres are
# pulled in from 1/6 and 5/6 so a large shape with jitter still clears the image border by ~2 px at 64 px,
# which keeps the border pixels a clean sample of the background for the scorer.
CELL_CENTERS = (0.21, 0.5, 0.79)
SIZE_JITTER = 0.08  # relative; small and large stay far apart (ratio > 1.6)
POSITION_JITTER = 0.02  # fraction of the image side
MIN_GAP = 0.02  # two shapes never come closer than this (fraction of image side), so they stay separable
SUPERSAMPLE = 8  # antialiasing samples per pixel side: 64 coverage levels, clean edges even at 32 px


@dataclass(frozen=True)
class ShapesConfig:
    """How scenes and captions are sampled."""

    two_shapes: float = 0.4  # probability of a two-shape scene
    # Captions sometimes leave an attribute out, so the model also learns prompts like
    # "a red circle on a blue background"; the image still has some size and position.
    drop_size: float = 0.2
    drop_position: float = 0.2
    drop_background: float = 0.0


DEFAULT_CONFIG = ShapesConfig()


# ---------------------------------------------------------------------------------------------------------
# Scenes: the structured truth of a caption. None means "not specified": any value is right.


@dataclass(frozen=True)
class Shape:
    """One shape of a scene; values are keys of KINDS, PALETTE, SIZES and POSITIONS."""

    kind: str | None = None
    color: str | None = None
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class Scene:
    """What a caption says: its shapes, in caption order, and the background colour."""

    shapes: tuple[Shape, ...]
    background: str | None = None

    def to_dict(self) -> dict:
        return {"background": self.background, "shapes": [asdict(shape) for shape in self.shapes]}

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        return cls(tuple(Shape(**shape) for shape in data["shapes"]), data.get("background"))

    @property
    def complete(self) -> bool:
        """Every attribute specified, i.e. the scene can be drawn."""
        fields = [self.background] + [v for s in self.shapes for v in asdict(s).values()]
        return bool(self.shapes) and None not in fields


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _fits(a: Shape, b: Shape) -> bool:
    """Whether two shapes in their cells can never touch, whatever the jitter."""
    (ca, ra), (cb, rb) = POSITIONS[a.position], POSITIONS[b.position]
    distance = max(abs(CELL_CENTERS[ca] - CELL_CENTERS[cb]), abs(CELL_CENTERS[ra] - CELL_CENTERS[rb]))
    extent = (SIZES[a.size] + SIZES[b.size]) / 2 * (1 + SIZE_JITTER) + 2 * POSITION_JITTER
    return distance - extent >= MIN_GAP


def sample_scene(rng: np.random.Generator, config: ShapesConfig = DEFAULT_CONFIG) -> Scene:
    """A complete random scene: one or two shapes in distinct cells, none the background's colour."""
    background = _pick(rng, COLORS)
    colors = [c for c in COLORS if c != background]
    count = 2 if rng.random() < config.two_shapes else 1
    while True:  # rejection sampling: two large shapes in neighbouring cells would touch
        shapes = tuple(
            Shape(_pick(rng, KINDS), _pick(rng, colors), _pick(rng, list(SIZES)), _pick(rng, list(POSITIONS)))
            for _ in range(count)
        )
        if all(_fits(a, b) for a, b in itertools.combinations(shapes, 2)):
            return Scene(shapes, background)


# ---------------------------------------------------------------------------------------------------------
# Captions: scene -> text and text -> scene.


def _with_article(words: list[str]) -> str:
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])


def _shape_phrase(shape: Shape) -> str:
    words = [w for w in (shape.size, shape.color, shape.kind or "shape") if w]
    phrase = _with_article(words)
    if shape.position == "center":
        phrase += " in the center"
    elif shape.position:
        phrase += f" at the {shape.position}"
    return phrase


def caption_of(scene: Scene) -> str:
    """The caption that states exactly the specified attributes of `scene`."""
    text = " and ".join(_shape_phrase(shape) for shape in scene.shapes)
    if scene.background:
        text += " on " + _with_article([scene.background, "background"])
    return text


def describe(
    scene: Scene, rng: np.random.Generator, config: ShapesConfig = DEFAULT_CONFIG
) -> tuple[str, Scene]:
    """Caption a complete scene, leaving attributes out as `config` says; returns (caption, stated scene)."""
    shapes = tuple(
        Shape(
            shape.kind,
            shape.color,
            None if rng.random() < config.drop_size else shape.size,
            None if rng.random() < config.drop_position else shape.position,
        )
        for shape in scene.shapes
    )
    background = None if rng.random() < config.drop_background else scene.background
    stated = Scene(shapes, background)
    return caption_of(stated), stated


def random_caption(rng: np.random.Generator, config: ShapesConfig = DEFAULT_CONFIG) -> tuple[str, Scene]:
    """A caption from the dataset's distribution and the scene it states (left-out attributes are None)."""
    return describe(sample_scene(rng, config), rng, config)


# Words people use for the same thing; applied before parsing.
_SYNONYMS = {
    "grey": "gray", "violet": "purple", "magenta": "pink", "turquoise": "cyan",
    "big": "large", "tiny": "small", "little": "small",
    "plus": "cross", "rhombus": "diamond", "box": "square", "disc": "circle", "disk": "circle",
    "centre": "center", "middle": "center", "upper": "top", "lower": "bottom",
}  # fmt: skip
_POSITION_RE = re.compile(
    r"\b(?:at|in|on|to)\s+(?:the\s+)?"
    r"(top left|top right|bottom left|bottom right|top center|bottom center|center left|center right|"
    r"top|bottom|left|right|center)\b(?:\s+(?:corner|side|edge|of the image|of the picture))*"
)
_BACKGROUND_RE = re.compile(r"(?:\b(?:on|with|over)\s+(?:an?\s+|the\s+)?)?\b([a-z]+)\s+background\b")


def _normalize(text: str) -> str:
    text = re.sub(r"[^a-z]+", " ", text.lower().replace("-", " "))
    words = [_SYNONYMS.get(word, word) for word in text.split()]
    return " ".join(words)


def _singular(word: str) -> str:
    for suffix in ("es", "s"):
        if word.endswith(suffix) and word[: -len(suffix)] in KINDS:
            return word[: -len(suffix)]
    return word


def _parse_shape(phrase: str) -> Shape | None:
    position = None
    match = _POSITION_RE.search(phrase)
    if match:
        words = match.group(1).split()
        # "top center" is the top cell, "center left" the left one.
        words = [w for w in words if w != "center"] or ["center"]
        position = " ".join(words)
        phrase = phrase[: match.start()] + " " + phrase[match.end() :]
    found: dict[str, str] = {}
    for word in map(_singular, phrase.split()):
        for field, vocabulary in (("kind", KINDS), ("color", PALETTE), ("size", SIZES)):
            if word in vocabulary:
                found.setdefault(field, word)
    if not found and position is None:
        return None
    return Shape(found.get("kind"), found.get("color"), found.get("size"), position)


def parse_caption(text: str) -> Scene:
    """The scene a caption states; attributes it does not mention are None. ValueError without any shape."""
    text = _normalize(text)
    background = None
    match = _BACKGROUND_RE.search(text)
    if match:
        background = match.group(1) if match.group(1) in PALETTE else None
        text = text[: match.start()] + " , " + text[match.end() :]
    phrases = re.split(r"\band\b|,|\bwith\b|\bnext to\b", text)
    shapes = tuple(shape for shape in map(_parse_shape, phrases) if shape is not None)
    if not shapes:
        raise ValueError(f"no shape found in caption {text!r}")
    return Scene(shapes, background)


# ---------------------------------------------------------------------------------------------------------
# Drawing. Shapes are unit outlines (bounding box [-0.5, 0.5]^2, y down) scaled to their place.


def _star(points: int = 5, inner: float = 0.5) -> list[tuple[float, float]]:
    # A fatter star than the classic 0.38 inner radius, so its arms survive at 64 px.
    vertices = []
    for i in range(2 * points):
        radius = 1.0 if i % 2 == 0 else inner
        angle = -math.pi / 2 + i * math.pi / points
        vertices.append((radius * math.cos(angle), radius * math.sin(angle)))
    xs, ys = zip(*vertices, strict=True)
    cx, cy = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    scale = max(max(xs) - min(xs), max(ys) - min(ys))
    return [((x - cx) / scale, (y - cy) / scale) for x, y in vertices]


_ARM = 1 / 6  # half-width of the cross's arms
UNIT_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)],
    "triangle": [(0.0, -0.5), (0.5, 0.5), (-0.5, 0.5)],
    "diamond": [(0.0, -0.5), (0.5, 0.0), (0.0, 0.5), (-0.5, 0.0)],
    "star": _star(),
    "cross": [
        (-_ARM, -0.5), (_ARM, -0.5), (_ARM, -_ARM), (0.5, -_ARM), (0.5, _ARM), (_ARM, _ARM),
        (_ARM, 0.5), (-_ARM, 0.5), (-_ARM, _ARM), (-0.5, _ARM), (-0.5, -_ARM), (-_ARM, -_ARM),
    ],
}  # fmt: skip


@cache
def unit_geometry(kind: str) -> tuple[float, float, float]:
    """(area, centroid x, centroid y) of a kind's unit outline: the scorer's link from pixels to size."""
    if kind == "circle":
        return math.pi / 4, 0.0, 0.0
    points = UNIT_POLYGONS[kind]
    area = cx = cy = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1], strict=True):  # shoelace formula
        cross = x0 * y1 - x1 * y0
        area += cross / 2
        cx += (x0 + x1) * cross / 6
        cy += (y0 + y1) * cross / 6
    return abs(area), cx / area, cy / area


def _inside(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Which points of the grid u (1, n) x v (m, 1) in the unit square lie inside a kind's outline."""
    if kind == "circle":
        return u * u + v * v <= 0.25
    inside = np.zeros((v.size, u.size), dtype=bool)
    points = UNIT_POLYGONS[kind]
    for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1], strict=True):
        if y0 == y1:
            continue  # a horizontal edge is never crossed by a horizontal ray
        # Even-odd rule: count crossings of the ray from (u, v) to the right; both terms broadcast.
        crosses = (y0 > v) != (y1 > v)
        inside ^= crosses & (u < x0 + (v - y0) * (x1 - x0) / (y1 - y0))
    return inside


def coverage(kind: str, cx: float, cy: float, side: float, box: tuple[int, int, int, int]) -> np.ndarray:
    """Fraction of each pixel in box (x0, y0, x1, y1) covered by a shape, as an (y1-y0, x1-x0) array.

    The shape's bounding box has centre (cx, cy) and side `side`, in pixels (pixel i spans [i, i+1)).
    Averaging SUPERSAMPLE^2 point samples per pixel antialiases like drawing large and downsampling with a
    box filter (no ringing), and keeps sub-pixel positions, which PIL's drawing rounds away.
    """
    x0, y0, x1, y1 = box
    offsets = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    xs = (np.arange(x0, x1)[:, None] + offsets).ravel()
    ys = (np.arange(y0, y1)[:, None] + offsets).ravel()
    inside = _inside(kind, (xs[None, :] - cx) / side, (ys[:, None] - cy) / side).astype(np.float32)
    return inside.reshape(y1 - y0, SUPERSAMPLE, x1 - x0, SUPERSAMPLE).mean(axis=(1, 3))


@dataclass(frozen=True)
class Placement:
    """Where one shape is drawn: bounding-box centre and side as fractions of the image side."""

    x: float
    y: float
    side: float


def layout_scene(scene: Scene, rng: np.random.Generator | None = None) -> list[Placement]:
    """Concrete boxes for a complete scene's shapes; jittered when `rng` is given."""
    if not scene.complete:
        raise ValueError(f"cannot draw a scene with unspecified attributes: {caption_of(scene)!r}")
    placements = []
    for shape in scene.shapes:
        column, row = POSITIONS[shape.position]
        dx, dy, ds = rng.uniform(-1, 1, size=3).tolist() if rng is not None else (0.0, 0.0, 0.0)
        placements.append(
            Placement(
                CELL_CENTERS[column] + dx * POSITION_JITTER,
                CELL_CENTERS[row] + dy * POSITION_JITTER,
                SIZES[shape.size] * (1 + ds * SIZE_JITTER),
            )
        )
    return placements


def render_scene(scene: Scene, size: int = 64, placements: Sequence[Placement] | None = None) -> Image.Image:
    """Draw a complete scene as a `size` x `size` RGB image (at the nominal layout unless given one)."""
    placements = layout_scene(scene) if placements is None else placements
    pixels = np.empty((size, size, 3), dtype=np.float32)
    pixels[:] = PALETTE[scene.background]
    for shape, place in zip(scene.shapes, placements, strict=True):
        cx, cy, side = place.x * size, place.y * size, place.side * size
        half = side / 2 + 1
        box = (
            max(0, math.floor(cx - half)), max(0, math.floor(cy - half)),
            min(size, math.ceil(cx + half)), min(size, math.ceil(cy + half)),
        )  # fmt: skip
        alpha = coverage(shape.kind, cx, cy, side, box)[..., None]
        patch = pixels[box[1] : box[3], box[0] : box[2]]
        patch[:] = patch * (1 - alpha) + np.asarray(PALETTE[shape.color], dtype=np.float32) * alpha
    return Image.fromarray(np.round(pixels).astype(np.uint8))


# ---------------------------------------------------------------------------------------------------------
# Dataset folders.

FORMATS = ("jsonl", "txt")


@dataclass(frozen=True)
class ShapesRecord:
    """One image of a dataset folder with its caption and complete truth."""

    image: Path
    caption: str
    truth: Scene


def make_shapes(
    out_dir: str | Path,
    count: int,
    size: int = 64,
    seed: int = 0,
    fmt: str = "jsonl",
    config: ShapesConfig = DEFAULT_CONFIG,
) -> Path:
    """Write `count` PNGs with captions and per-image truth to `out_dir`; returns the metadata file.

    fmt "jsonl": `metadata.jsonl` lines {file_name, text, truth, layout} (the Hugging Face image folder
    convention). fmt "txt": `NNNNN.txt` caption beside each `NNNNN.png`, plus the same lines in
    `truth.jsonl`. Image i depends only on (seed, i), so a larger count extends a smaller one.
    """
    if count < 1:
        raise ValueError(f"count must be positive, got {count}")
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    digits = max(5, len(str(count - 1)))
    lines = []
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        truth = sample_scene(rng, config)
        caption, _ = describe(truth, rng, config)
        placements = layout_scene(truth, rng)
        stem = f"{index:0{digits}d}"
        render_scene(truth, size, placements).save(out_dir / f"{stem}.png")
        if fmt == "txt":
            (out_dir / f"{stem}.txt").write_text(caption + "\n")
        record = {
            "file_name": f"{stem}.png",
            "text": caption,
            "truth": truth.to_dict(),
            "layout": [{k: round(v, 4) for k, v in asdict(p).items()} for p in placements],
        }
        lines.append(json.dumps(record))
    metadata = out_dir / ("metadata.jsonl" if fmt == "jsonl" else "truth.jsonl")
    metadata.write_text("\n".join(lines) + "\n")
    return metadata


def read_shapes(folder: str | Path) -> list[ShapesRecord]:
    """The records of a `make_shapes` folder, either format."""
    folder = Path(folder)
    for name in ("metadata.jsonl", "truth.jsonl"):
        if (folder / name).is_file():
            lines = (folder / name).read_text().splitlines()
            records = [json.loads(line) for line in lines if line.strip()]
            return [
                ShapesRecord(folder / r["file_name"], r["text"], Scene.from_dict(r["truth"])) for r in records
            ]
    raise ValueError(f"no metadata.jsonl or truth.jsonl in {folder}")


# ---------------------------------------------------------------------------------------------------------
# Scoring: what the pixels show, then whether that matches a scene.

# A pixel belongs to a shape when it is this far (RGB Euclidean, 0..255 scale) from the background:
# about half the closest palette pair, and far above additive noise (std 10 gives a mean distance ~16).
FOREGROUND_DISTANCE = 50.0
# Gaussian sigmas (pixels) the shape templates are also tried at: generated and degraded images are soft.
TEMPLATE_BLURS = (0.6, 1.0, 1.5)
_PALETTE_RGB = np.array(list(PALETTE.values()), dtype=np.float32)
# Coverage is measured along the shape-minus-background colour in YCbCr with the chroma down-weighted:
# JPEG and most image pipelines keep luma sharp but blur chroma, so luma edges give the truer outline
# wherever the two colours differ in brightness (pure chroma contrast still works, the weights cancel).
_YCBCR = np.array([[0.299, 0.587, 0.114], [-0.1687, -0.3313, 0.5], [0.5, -0.4187, -0.0813]], dtype=np.float32)
_CONTRAST_METRIC = _YCBCR.T @ np.diag(np.array([1.0, 0.1, 0.1], dtype=np.float32)) @ _YCBCR
SCORE_KEYS = ("background", "shape_color", "shape_kind", "size", "position", "count")


@dataclass(frozen=True)
class Region:
    """One detected shape."""

    color: str
    kind: str
    size: str
    position: str
    area: float  # in pixels, antialiased edges counted fractionally
    centroid: tuple[float, float]  # (x, y) in pixels
    fit: float  # soft IoU with the best template, 1 = a perfect drawing


@dataclass(frozen=True)
class Detection:
    """What `detect` read from an image."""

    background: str
    regions: tuple[Region, ...]  # the largest regions, largest first
    count: int  # number of shape-sized regions, including any beyond `regions`


def nearest_color(rgb: Sequence[float] | np.ndarray) -> str:
    """The palette name closest to an RGB triple (0..255)."""
    distances = ((_PALETTE_RGB - np.asarray(rgb, dtype=np.float32)) ** 2).sum(axis=1)
    return COLORS[int(distances.argmin())]


def name_shape_color(rgb: np.ndarray, background_rgb: np.ndarray, min_mix: float = 0.7) -> str:
    """The palette colour that, blended with the background, best explains a shape's observed colour.

    The middle of a small or blurred shape is still partly background (a small white square on red looks
    pink), so each candidate may be mixed with the background at `min_mix`..1; on clean pixels this is
    the nearest palette colour.
    """
    offsets = _PALETTE_RGB - background_rgb  # (colours, 3)
    observed = np.asarray(rgb, dtype=np.float32) - background_rgb
    mix = (offsets @ observed) / np.maximum((offsets**2).sum(axis=1), 1.0)
    mix = np.clip(mix, min_mix, 1.0)
    residuals = ((observed - mix[:, None] * offsets) ** 2).sum(axis=1)
    return COLORS[int(residuals.argmin())]


def _as_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """HxWx3 float32 on 0..255 from a PIL image, a uint8 array, or a float array on 0..1."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    array = np.asarray(image)
    scale = 255.0 if np.issubdtype(array.dtype, np.floating) else 1.0
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"expected an HxWx3 image array, got shape {array.shape}")
    return array[..., :3].astype(np.float32) * scale


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as (N, 2) arrays of (row, col), largest first."""
    seen = np.zeros_like(mask)
    height, width = mask.shape
    components = []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        seen[start] = True
        queue, pixels = deque([start]), []
        while queue:
            r, c = queue.popleft()
            pixels.append((r, c))
            for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= nr < height and 0 <= nc < width and mask[nr, nc] and not seen[nr, nc]:
                    seen[nr, nc] = True
                    queue.append((nr, nc))
        components.append(np.array(pixels))
    return sorted(components, key=len, reverse=True)


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        padded = np.pad(mask, 1)
        mask = mask | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    return mask


def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """n x n matrix applying a 1-D Gaussian blur with zeros outside (M @ image blurs the columns)."""
    offsets = np.arange(n)[:, None] - np.arange(n)[None, :]
    weights = np.exp(-(offsets**2) / (2 * sigma**2))
    radius = np.arange(-n, n + 1)
    return weights / np.exp(-(radius**2) / (2 * sigma**2)).sum()


def _classify(
    alpha: np.ndarray, own: np.ndarray, window: tuple[int, int, int, int], cx: float, cy: float
) -> tuple[str, float, float]:
    """Best-fitting kind for a coverage map with centroid (cx, cy): (kind, box side in pixels, soft IoU).

    Each kind's template is drawn with the region's area and centroid (both survive blur and noise), so
    only the outline differs; the kind whose outline overlaps the region most wins. Templates are also
    tried blurred, because a blurred small square looks more like a sharp circle than a sharp square.
    Works at any scale because the templates are rasterised exactly like the dataset.
    """
    area = float(alpha.sum())
    height, width = alpha.shape
    blurs = [(np.eye(height), np.eye(width))]
    blurs += [(_blur_matrix(height, sigma), _blur_matrix(width, sigma)) for sigma in TEMPLATE_BLURS]
    best = ("circle", 0.0, -1.0)
    for kind in KINDS:
        unit_area, ux, uy = unit_geometry(kind)
        side = math.sqrt(area / unit_area)
        sharp = coverage(kind, cx - ux * side, cy - uy * side, side, window)
        for rows, cols in blurs:
            template = (rows @ sharp @ cols.T) * own
            fit = float(np.minimum(alpha, template).sum() / np.maximum(alpha, template).sum())
            if fit > best[2]:
                best = (kind, side, fit)
    return best


def _size_name(side_fraction: float) -> str:
    # Nearest nominal size on a log scale, i.e. the threshold is the geometric mean.
    return min(SIZES, key=lambda name: abs(math.log(side_fraction / SIZES[name])))


def _min_region_area(height: int, width: int) -> float:
    """A quarter of the smallest shape the generator draws; smaller blobs are noise or artefacts."""
    smallest = min(SIZES.values()) * (1 - SIZE_JITTER)
    min_fill = min(unit_geometry(kind)[0] for kind in KINDS)
    return max(2.0, 0.25 * min_fill * smallest**2 * height * width)


def detect(image: Image.Image | np.ndarray, max_regions: int = 4) -> Detection:
    """Read background colour and shapes from the pixels alone.

    Background: median of the border pixels, named by the nearest palette colour. Shapes: 4-connected
    regions of pixels far from it, largest first; colour = the palette colour that best explains the
    median of the region's core, position = grid cell of the centroid, kind and size = the drawn template
    that fits best. `image` is PIL, a uint8 HxWx3 array, or a float HxWx3 array on 0..1.
    """
    pixels = _as_rgb_array(image)
    height, width = pixels.shape[:2]
    ring = max(1, min(height, width) // 32)
    border = np.concatenate(
        [pixels[:ring].reshape(-1, 3), pixels[-ring:].reshape(-1, 3),
         pixels[:, :ring].reshape(-1, 3), pixels[:, -ring:].reshape(-1, 3)]
    )  # fmt: skip
    background_rgb = np.median(border, axis=0)
    distance = np.linalg.norm(pixels - background_rgb, axis=-1)
    min_area = _min_region_area(height, width)
    components = [c for c in _components(distance > FOREGROUND_DISTANCE) if len(c) >= min_area]

    regions = []
    for component in components[:max_regions]:
        rows, cols = component[:, 0], component[:, 1]
        # Colour from the core: edge pixels are blends with the background and would pull the median off.
        strength = distance[rows, cols]
        core = strength >= 0.75 * np.percentile(strength, 90)
        shape_rgb = np.median(pixels[rows[core], cols[core]], axis=0)

        margin = int(0.3 * max(np.ptp(rows), np.ptp(cols))) + 5  # room for blurred edges
        window = (
            max(0, int(cols.min()) - margin), max(0, int(rows.min()) - margin),
            min(width, int(cols.max()) + margin + 1), min(height, int(rows.max()) + margin + 1),
        )  # fmt: skip
        x0, y0, x1, y1 = window
        # Coverage: how far each pixel lies from the background towards the shape colour, restricted to
        # this component's neighbourhood so a second shape nearby cannot leak in.
        own = np.zeros((height, width), dtype=bool)
        own[rows, cols] = True
        own = _dilate(own, 3)[y0:y1, x0:x1]
        # Measured against the named palette colour, not the region's median: the middle of a small blurred
        # shape never reaches its full colour, and a washed-out reference would inflate the coverage.
        color = name_shape_color(shape_rgb, background_rgb)
        direction = np.asarray(PALETTE[color], dtype=np.float32) - background_rgb
        along = (pixels[y0:y1, x0:x1] - background_rgb) @ _CONTRAST_METRIC @ direction
        along /= max(float(direction @ _CONTRAST_METRIC @ direction), 1.0)
        alpha = np.clip(along, 0.0, 1.0) * own

        if alpha.sum() < 1.0:  # far from the background but not towards any palette colour: use the mask
            alpha = own & (distance[y0:y1, x0:x1] > FOREGROUND_DISTANCE)
            alpha = alpha.astype(np.float32)
        area = float(alpha.sum())
        ys, xs = np.indices(alpha.shape)
        cx = x0 + float((alpha * (xs + 0.5)).sum()) / area
        cy = y0 + float((alpha * (ys + 0.5)).sum()) / area
        kind, side, fit = _classify(alpha, own, window, cx, cy)
        column, row = min(2, int(cx / width * 3)), min(2, int(cy / height * 3))
        position = next(name for name, cell in POSITIONS.items() if cell == (column, row))
        regions.append(
            Region(color, kind, _size_name(side / math.sqrt(height * width)),
                   position, area, (cx, cy), fit)
        )  # fmt: skip
    return Detection(nearest_color(background_rgb), tuple(regions), len(components))


_SHAPE_FIELDS = {"shape_color": "color", "shape_kind": "kind", "size": "size", "position": "position"}


def _matches(shape: Shape, region: Region | None) -> dict[str, bool]:
    return {
        key: region is not None and getattr(shape, field) in (None, getattr(region, field))
        for key, field in _SHAPE_FIELDS.items()
    }


def score_detection(detection: Detection, scene: Scene) -> dict[str, bool]:
    """Per-attribute verdicts of a detection against a scene (unspecified attributes are right).

    Shapes are matched to regions by the assignment that agrees on most attributes; an attribute is
    right only if it is right for every shape in the scene.
    """
    result = {"background": scene.background in (None, detection.background)}
    candidates: list[Region | None] = [*detection.regions, *[None] * len(scene.shapes)]
    best: list[dict[str, bool]] = []
    best_agreement = -1
    for order in itertools.permutations(range(len(candidates)), len(scene.shapes)):
        verdicts = [_matches(shape, candidates[i]) for shape, i in zip(scene.shapes, order, strict=True)]
        agreement = sum(sum(v.values()) for v in verdicts)
        if agreement > best_agreement:
            best, best_agreement = verdicts, agreement
    for key in _SHAPE_FIELDS:
        result[key] = all(v[key] for v in best)
    result["count"] = detection.count == len(scene.shapes)
    return result


def score_image(image: Image.Image | np.ndarray, scene: Scene) -> dict[str, bool]:
    """Whether an image shows `scene`, attribute by attribute, judged from the pixels alone.

    Keys: background, shape_color, shape_kind, size, position, and count (as many shape-sized regions as
    the scene has shapes). Attributes the scene leaves unspecified count as right.
    """
    return score_detection(detect(image, max_regions=len(scene.shapes) + 2), scene)


def score_batch(images: Iterable[Image.Image | np.ndarray], scenes: Iterable[Scene]) -> dict[str, float]:
    """Fraction of images right per attribute, plus "all": images right on every attribute."""
    verdicts = [score_image(image, scene) for image, scene in zip(images, scenes, strict=True)]
    if not verdicts:
        raise ValueError("score_batch needs at least one image")
    fractions = {key: sum(v[key] for v in verdicts) / len(verdicts) for key in SCORE_KEYS}
    fractions["all"] = sum(all(v.values()) for v in verdicts) / len(verdicts)
    return fractions


# ---------------------------------------------------------------------------------------------------------
# Command line: `sd make-shapes DIR --count N`.


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def run_make_shapes(args: argparse.Namespace) -> int:
    metadata = make_shapes(args.out_dir, args.count, size=args.size, seed=args.seed, fmt=args.format)
    print(f"wrote {args.count} images of {args.size}x{args.size} px and captions to {metadata}")
    return 0


def add_make_shapes_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `make-shapes` to the `sd` command line; its `run` default returns the exit status."""
    parser = subparsers.add_parser(
        "make-shapes",
        help="write a synthetic dataset of captioned coloured shapes",
        description="Draw images of one or two shapes (circle, square, triangle, diamond, star, cross) in "
        "named colours, sizes and 3x3 grid positions on a coloured background, each with a caption such as "
        "'a small red circle at the top left on a blue background' and its structured truth. "
        "The same seed always gives the same images.",
        epilog="example: sd make-shapes data/shapes --count 20000 --size 64",
    )
    parser.add_argument(
        "out_dir", metavar="DIR", help="output folder (created if missing, files overwritten)"
    )
    parser.add_argument("--count", type=_positive_int, default=1000, help="number of images (default: 1000)")
    parser.add_argument("--size", type=_positive_int, default=64, help="image side in pixels (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed, >= 0 (default: 0)")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="jsonl",
        help="jsonl: metadata.jsonl with file_name, text and truth (Hugging Face image folder); "
        "txt: a caption NNNNN.txt beside each NNNNN.png, truth in truth.jsonl (default: jsonl)",
    )
    parser.set_defaults(run=run_make_shapes)
    return parser
