"""sd.allocator: malloc is tuned once per process on glibc, and SD_MALLOC_TUNING=0 leaves it alone.

What the tuning is for, counted in page faults: a freed 64 MiB buffer is reused by the next one (no new
pages), except inside large_buffers_from_kernel, where each is mapped afresh as glibc does by default."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

CHECK = "import sd.allocator as a; print(a.tune_malloc(), a._tuned)"

# Page faults of the second of two 64 MiB buffers allocated and filled in turn: ~16,384 (4 KiB pages)
# when it gets fresh pages from the kernel, ~0 when it reuses the first one's memory.
FAULTS = """
import resource, torch, sd.allocator as a

def refill():
    first = torch.ones(2**24)
    del first
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    second = torch.ones(2**24)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def settled():  # where the heap's chunks lie after the first few allocations varies: take the third
    return [refill() for _ in range(3)][-1]

a.tune_malloc()
reused = settled()
with a.large_buffers_from_kernel():
    with a.large_buffers_from_kernel():  # nested: the outer one decides
        inner = settled()
    mapped = settled()
print(reused, inner, mapped, settled())
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
    assert inner > 15000 and mapped > 15000
    # Untuned, glibc maps every 64 MiB block afresh, inside the context manager or not.
    assert all(int(n) > 15000 for n in run_with("0", FAULTS).split())


def test_loading_on_the_cpu_tunes_it(tmp_path):
    from sd import TINY, allocator, save_checkpoint
    from sd.testing import random_models
    from sd.weights import load_models

    path = tmp_path / "tiny.safetensors"
    save_checkpoint(random_models(TINY), path, TINY)
    allocator._tuned = None  # as in a fresh process
    load_models(path)
    assert allocator._tuned is not None
