"""k-diffusion 0.1.1.post1's `sampling.py` and `external.py`, the reference of the A1111 samplers.

Installed from PyPI with --no-deps (README); its package __init__ imports its training dependencies, so the
two modules are loaded from their files under a stub package holding the one helper they use
(a1111-semantics.md §h). Nothing else of k-diffusion runs.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from importlib import metadata
from pathlib import Path

import pytest
import torch


def load() -> tuple[types.ModuleType, types.ModuleType]:
    """(sampling, external); skips the test when k-diffusion is not installed."""
    try:
        folder = Path(metadata.distribution("k-diffusion").locate_file("k_diffusion"))
    except metadata.PackageNotFoundError:
        pytest.skip("k-diffusion is not installed: pip install --no-deps k-diffusion==0.1.1.post1")
    package = types.ModuleType("k_diffusion")
    package.__path__ = [str(folder)]
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    package.utils = utils
    names = ("k_diffusion", "k_diffusion.utils", "k_diffusion.sampling", "k_diffusion.external")
    saved = {name: sys.modules.get(name) for name in names}
    sys.modules.update({"k_diffusion": package, "k_diffusion.utils": utils})
    try:
        loaded = []
        for name in ("sampling", "external"):
            spec = importlib.util.spec_from_file_location(f"k_diffusion.{name}", folder / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[f"k_diffusion.{name}"] = module
            spec.loader.exec_module(module)
            setattr(package, name, module)
            loaded.append(module)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return loaded[0], loaded[1]


class RandnFromStreams:
    """torch, except that randn_like is the next draw of every image's stream (A1111's TorchHijack)."""

    def __init__(self, noise):
        self.noise = noise

    def __getattr__(self, name):
        return getattr(torch, name)

    def randn_like(self, x, *args, **kwargs):
        return self.noise.next().to(x)
