"""sd.allocator: malloc is tuned once per process on glibc, and SD_MALLOC_TUNING=0 leaves it alone."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

CHECK = "import sd.allocator as a; print(a.tune_malloc(), a._tuned)"


def run_with(value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "SD_MALLOC_TUNING"}
    if value is not None:
        env["SD_MALLOC_TUNING"] = value
    return subprocess.run(
        [sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, check=True
    ).stdout


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_tuned_by_default_and_switched_off_by_the_environment():
    assert run_with(None).split() == ["True", "True"]
    assert run_with("0").split() == ["False", "False"]


def test_loading_on_the_cpu_tunes_it(tmp_path):
    from sd import TINY, allocator, save_checkpoint
    from sd.testing import random_models
    from sd.weights import load_models

    path = tmp_path / "tiny.safetensors"
    save_checkpoint(random_models(TINY), path, TINY)
    allocator._tuned = None  # as in a fresh process
    load_models(path)
    assert allocator._tuned is not None
