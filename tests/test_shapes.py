"""The synthetic shapes dataset: deterministic files, captions that parse back to their truth, and a
scorer that is right about clean and degraded drawings and says "wrong" to wrong captions."""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sd import shapes
from sd.shapes import Scene, Shape

ATTRIBUTES = ("background", "shape_color", "shape_kind", "size", "position")


def drawn(count: int, size: int = 64, seed: int = 1234) -> list[tuple[Image.Image, Scene]]:
    """Dataset-like images with their complete truth, as make_shapes draws them."""
    out = []
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        truth = shapes.sample_scene(rng)
        out.append((shapes.render_scene(truth, size, shapes.layout_scene(truth, rng)), truth))
    return out


def degrade(image: Image.Image, how: str, rng: np.random.Generator) -> Image.Image:
    """Mild damage: Gaussian blur radius 1, noise std 10/255, JPEG quality 75, or all three."""
    if how in ("blur", "all"):
        image = image.filter(ImageFilter.GaussianBlur(1))
    if how in ("noise", "all"):
        noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 10, (image.height, image.width, 3))
        image = Image.fromarray(np.clip(np.round(noisy), 0, 255).astype(np.uint8))
    if how in ("jpeg", "all"):
        # PIL's default halves the chroma resolution (4:2:0); on top of blur and noise that leaves too
        # little colour detail for 9-pixel shapes, so the combination quantises at full chroma resolution.
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=75, **({"subsampling": 0} if how == "all" else {}))
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return image


def perturb(scene: Scene, attribute: str, rng: np.random.Generator) -> Scene:
    """The scene with one attribute (of one random shape) changed to another valid value."""
    if attribute == "background":
        return replace(scene, background=str(rng.choice([c for c in shapes.COLORS if c != scene.background])))
    field = {"shape_color": "color", "shape_kind": "kind", "size": "size", "position": "position"}[attribute]
    vocabulary = {
        "color": shapes.PALETTE,
        "kind": shapes.KINDS,
        "size": shapes.SIZES,
        "position": shapes.POSITIONS,
    }
    index = int(rng.integers(len(scene.shapes)))
    shape = scene.shapes[index]
    options = [v for v in vocabulary[field] if v not in (getattr(shape, field), scene.background)]
    changed = list(scene.shapes)
    changed[index] = replace(shape, **{field: str(rng.choice(options))})
    return replace(scene, shapes=tuple(changed))


@pytest.fixture(scope="module")
def clean_64() -> list[tuple[Image.Image, Scene]]:
    return drawn(200)


@pytest.fixture(scope="module")
def detections_64(clean_64) -> list[tuple[shapes.Detection, Scene]]:
    return [(shapes.detect(image), truth) for image, truth in clean_64[:120]]


# --- dataset files ---------------------------------------------------------------------------------------


def folder_bytes(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_seed_same_files_and_count_extends(tmp_path):
    first = folder_bytes(shapes.make_shapes(tmp_path / "a", 12, seed=3).parent)
    again = folder_bytes(shapes.make_shapes(tmp_path / "b", 12, seed=3).parent)
    other = folder_bytes(shapes.make_shapes(tmp_path / "c", 12, seed=4).parent)
    fewer = folder_bytes(shapes.make_shapes(tmp_path / "d", 5, seed=3).parent)
    assert first == again
    assert first["00000.png"] != other["00000.png"]
    assert all(fewer[f"{i:05d}.png"] == first[f"{i:05d}.png"] for i in range(5))
    assert first["metadata.jsonl"].decode().splitlines()[:5] == fewer["metadata.jsonl"].decode().splitlines()


@pytest.mark.parametrize("fmt", ["jsonl", "txt"])
def test_make_shapes_writes_images_captions_and_truth(tmp_path, fmt):
    metadata = shapes.make_shapes(tmp_path, 6, size=48, seed=0, fmt=fmt)
    assert metadata.name == ("metadata.jsonl" if fmt == "jsonl" else "truth.jsonl")
    lines = [json.loads(line) for line in metadata.read_text().splitlines()]
    assert len(lines) == 6
    names = sorted(p.name for p in tmp_path.iterdir())
    expected = {f"{i:05d}.png" for i in range(6)} | {metadata.name}
    if fmt == "txt":
        expected |= {f"{i:05d}.txt" for i in range(6)}
    assert set(names) == expected
    for line in lines:
        assert set(line) >= {"file_name", "text", "truth"}
        with Image.open(tmp_path / line["file_name"]) as image:
            assert (image.mode, image.size) == ("RGB", (48, 48))
        if fmt == "txt":
            assert (tmp_path / line["file_name"]).with_suffix(".txt").read_text().strip() == line["text"]
    records = shapes.read_shapes(tmp_path)
    assert [r.caption for r in records] == [line["text"] for line in lines]
    assert all(r.truth.complete and r.image.is_file() for r in records)


def test_make_shapes_rejects_bad_arguments(tmp_path):
    for kwargs in (
        {"count": 0},
        {"count": 1, "size": 8},
        {"count": 1, "fmt": "csv"},
        {"count": 1, "seed": -1},
    ):
        with pytest.raises(ValueError):
            shapes.make_shapes(tmp_path, **kwargs)


def test_command_line(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="sd")
    shapes.add_make_shapes_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["make-shapes", str(tmp_path), "--count", "3", "--size", "32", "--format", "txt"]
    )
    assert args.run(args) == 0
    assert "wrote 3 images" in capsys.readouterr().out
    assert (tmp_path / "00002.txt").is_file() and (tmp_path / "truth.jsonl").is_file()
    with pytest.raises(SystemExit):
        parser.parse_args(["make-shapes", str(tmp_path), "--count", "0"])


# --- scenes and captions ---------------------------------------------------------------------------------


def test_scene_distribution_covers_the_vocabulary():
    rng = np.random.default_rng(0)
    scenes = [shapes.sample_scene(rng) for _ in range(600)]
    all_shapes = [s for scene in scenes for s in scene.shapes]
    assert {s.kind for s in all_shapes} == set(shapes.KINDS)
    assert {s.color for s in all_shapes} == set(shapes.COLORS)
    assert {s.size for s in all_shapes} == set(shapes.SIZES)
    assert {s.position for s in all_shapes} == set(shapes.POSITIONS)
    assert {len(scene.shapes) for scene in scenes} == {1, 2}
    assert all(scene.complete for scene in scenes)
    assert all(s.color != scene.background for scene in scenes for s in scene.shapes)
    two = [scene for scene in scenes if len(scene.shapes) == 2]
    assert all(a.position != b.position for a, b in (scene.shapes for scene in two))


def test_random_captions_parse_back_to_their_scene():
    rng = np.random.default_rng(1)
    captions = [shapes.random_caption(rng) for _ in range(500)]
    for caption, scene in captions:
        assert shapes.parse_caption(caption) == scene, caption
    # Some captions leave size or position out, as the prompts people write do.
    assert any(s.size is None for _, scene in captions for s in scene.shapes)
    assert any(s.position is None for _, scene in captions for s in scene.shapes)


def test_dataset_captions_agree_with_the_truth(tmp_path):
    for record in shapes.read_shapes(shapes.make_shapes(tmp_path, 200, size=16).parent):
        stated = shapes.parse_caption(record.caption)
        assert stated.background in (None, record.truth.background)
        assert len(stated.shapes) == len(record.truth.shapes)
        for said, true in zip(stated.shapes, record.truth.shapes, strict=True):
            for field in ("kind", "color", "size", "position"):
                assert getattr(said, field) in (None, getattr(true, field)), record.caption


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a red circle on a blue background", Scene((Shape("circle", "red"),), "blue")),
        (
            "A small red circle at the top left on a blue background.",
            Scene((Shape("circle", "red", "small", "top left"),), "blue"),
        ),
        (
            "a red circle at the left and a green square at the right on a white background",
            Scene((Shape("circle", "red", None, "left"), Shape("square", "green", None, "right")), "white"),
        ),
        ("an orange star in the center", Scene((Shape("star", "orange", None, "center"),))),
        (
            "big grey plus in the upper-left corner, black background",
            Scene((Shape("cross", "gray", "large", "top left"),), "black"),
        ),
        ("a triangle", Scene((Shape("triangle"),))),
    ],
)
def test_parse_prompts(text, expected):
    assert shapes.parse_caption(text) == expected


def test_parse_rejects_text_without_a_shape():
    with pytest.raises(ValueError):
        shapes.parse_caption("a landscape at sunset")


# --- scorer ----------------------------------------------------------------------------------------------


def test_scorer_is_right_about_clean_drawings(clean_64):
    images, truths = zip(*clean_64, strict=True)
    assert min(shapes.score_batch(images, truths).values()) >= 0.98
    # Against the captions (some attributes unspecified) as well as the complete truth.
    stated = [shapes.describe(truth, np.random.default_rng(i))[1] for i, truth in enumerate(truths)]
    assert min(shapes.score_batch(images, stated).values()) >= 0.98


@pytest.mark.parametrize("size", [32, 128])
def test_scorer_works_at_other_resolutions(size):
    images, truths = zip(*drawn(60, size=size, seed=size), strict=True)
    assert min(shapes.score_batch(images, truths).values()) >= 0.98


@pytest.mark.parametrize("how", ["blur", "noise", "jpeg", "all"])
def test_scorer_survives_mild_degradation(clean_64, how):
    rng = np.random.default_rng(5)
    images = [degrade(image, how, rng) for image, _ in clean_64]
    scores = shapes.score_batch(images, [truth for _, truth in clean_64])
    assert all(scores[key] >= 0.90 for key in (*ATTRIBUTES, "count")), scores


@pytest.mark.parametrize("attribute", ATTRIBUTES)
def test_scorer_rejects_wrong_captions(detections_64, attribute):
    rng = np.random.default_rng(7)
    rejected = [
        not shapes.score_detection(detection, perturb(truth, attribute, rng))[attribute]
        for detection, truth in detections_64
    ]
    assert np.mean(rejected) >= 0.95


def test_scorer_accepts_arrays_and_fails_an_empty_image():
    image, truth = drawn(1, seed=9)[0]
    expected = shapes.score_image(image, truth)
    assert all(expected.values())
    assert shapes.score_image(np.asarray(image), truth) == expected
    assert shapes.score_image(np.asarray(image, dtype=np.float32) / 255, truth) == expected
    blank = Image.new("RGB", (64, 64), shapes.PALETTE[truth.background])
    verdict = shapes.score_image(blank, truth)
    assert verdict["background"] and not any(verdict[k] for k in ("shape_color", "shape_kind", "count"))


def test_two_shapes_are_matched_regardless_of_caption_order():
    scene = Scene(
        (Shape("circle", "red", "large", "left"), Shape("square", "blue", "small", "bottom right")), "white"
    )
    image = shapes.render_scene(scene, 64)
    assert all(shapes.score_image(image, Scene(scene.shapes[::-1], scene.background)).values())
    assert not shapes.score_image(image, shapes.parse_caption("a red square and a blue circle"))["shape_kind"]
