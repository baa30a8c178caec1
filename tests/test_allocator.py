"""sd.allocator: malloc is tuned once per process on glibc, and SD_MALLOC_TUNING=0 leaves it alone.

What the tuning is for, counted in page faults: a freed 64 MiB buffer is reused by the next one (no new
pages), except inside large_buffers_from_kernel, where a new large one is mapped afresh as glibc does by
default."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

CHECK = "import sd.allocator as a; print(a.tune_malloc(), a._tuned)"

# Page faults of the second of two buffers allocated and filled in turn: about one per 4 KiB page when it
# gets fresh pages from the kernel, ~0 when it reuses the first one's memory. Inside the context manager the
# buffers (512 MiB) are larger than all the heap has free, as the VAE's are: those are mapped. (A block that
# fits a free heap chunk is still served from it there, and freed 64 MiB chunks can coalesce.)
FAULTS = """
import resource, torch, sd.allocator as a

def refill(numel):
    first = torch.ones(numel)
    del first
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    second = torch.ones(numel)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def settled(numel):  # where the heap's chunks lie after the first few allocations varies: take the third
    return [refill(numel) for _ in range(3)][-1]

a.tune_malloc()
reused = settled(2**24)
with a.large_buffers_from_kernel():
    with a.large_buffers_from_kernel():  # nested: the outer one decides
        inner = refill(2**27)
    mapped = refill(2**27)
print(reused, inner, mapped, settled(2**24))
"""


def run_with(value: str | None, code: str = CHECK) -> str:
    env = {k: v for k, v in os.environ.items() if k != "SD_MALLOC_TUNING"}
    if value is not None:
        env["SD_MALLOC_TUNING"] = value
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_tuned_by_default_and_switched_off_by_the_environment():
    assert run_with(None).split() == ["True", "True"]
    assert run_with("0").split() == ["False", "False"]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_large_buffers_are_reused_except_around_the_vae():
    reused, inner, mapped, reused_again = map(int, run_with(None, FAULTS).split())
    assert reused < 1000 and reused_again < 1000
    assert inner > 130000 and mapped > 130000  # 512 MiB: 131,072 pages
    # Untuned, glibc maps every such block afresh, inside the context manager or not.
    assert [int(n) > 15000 for n in run_with("0", FAULTS).split()] == [True] * 4


def test_loading_on_the_cpu_tunes_it(tmp_path):
    from sd import TINY, allocator, save_checkpoint
    from sd.testing import random_models
    from sd.weights import load_models

    path = tmp_path / "tiny.safetensors"
    save_checkpoint(random_models(TINY), path, TINY)
    allocator._tuned = None  # as in a fresh process
    load_models(path)
    assert allocator._tuned is not None


def test_the_pipeline_runs_the_vae_with_large_buffers_from_the_kernel(monkeypatch):
    """Only the VAE's calls run inside large_buffers_from_kernel; the text encoder and U-Net do not."""
    import contextlib

    from PIL import Image

    import sd.pipeline
    from sd import TINY
    from sd.testing import random_models

    models = random_models(TINY)
    inside = []

    @contextlib.contextmanager
    def recording():
        inside.append(True)
        yield
        inside.pop()

    calls = []

    def record(name: str) -> None:
        calls.append((name, bool(inside)))

    for name in ("clip", "decoder", "diffusion"):
        models[name].register_forward_pre_hook(lambda module, args, name=name: record(name))
    encode = models["encoder"].encode  # the pipeline calls encode(), not forward()

    def recorded_encode(pixels):
        record("encoder")
        return encode(pixels)

    models["encoder"].encode = recorded_encode
    monkeypatch.setattr(sd.pipeline, "large_buffers_from_kernel", recording)
    pipe = sd.pipeline.Pipeline(models)
    image = Image.new("RGB", (64, 64), (200, 40, 40))
    pipe.img2img(image, "a red square", strength=0.5, width=64, height=64, steps=2, seed=0)
    assert set(calls) == {("clip", False), ("encoder", True), ("diffusion", False), ("decoder", True)}
