"""Shared test fixtures: where the reference data lives."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sd.config import ModelConfig

REFERENCE_DIR = Path(
    os.environ.get("SD_REFERENCE_DIR", Path(__file__).resolve().parents[2] / "shared" / "reference")
)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not (REFERENCE_DIR / "sd15-ldm-checkpoint.json").exists():
        pytest.skip(f"reference data not found in {REFERENCE_DIR} (set SD_REFERENCE_DIR)")
    return REFERENCE_DIR


def load_reference(name: str) -> dict:
    path = REFERENCE_DIR / name
    if not path.exists():
        pytest.skip(f"reference file {path} not found (set SD_REFERENCE_DIR)")
    return json.loads(path.read_text())


@dataclass
class World:
    """Our models and the reference's, holding the same random weights (loaded from `path`)."""

    name: str
    config: ModelConfig
    ours: dict
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    path: Path


def schedule_buffers() -> dict[str, torch.Tensor]:
    values = load_reference("sd15-ldm-schedule-buffers.json")["values"]
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()}


@pytest.fixture(scope="session", params=["tiny", pytest.param("sd15", marks=pytest.mark.slow)])
def world(request, tmp_path_factory) -> World:
    """One random checkpoint in the original layout, written to disk; ours loads it with our loader,
    the reference gets it through diffusers' single-file converters. Session-wide: the full-size one
    costs ~9 GB and half a minute, so every test that needs it shares it."""
    from sd.config import SD15, TINY
    from sd.keymap import diffusers_configs
    from sd.testing import ldm_state_dict, random_models
    from sd.weights import load_models

    from reference import reference_models

    name = request.param
    config = {"tiny": TINY, "sd15": SD15}[name]
    dconf = load_reference("sd15-diffusers-configs.json") if name == "sd15" else diffusers_configs(TINY)

    state = ldm_state_dict(random_models(config, seed=1234))
    # A file as the real one is: position_ids (int64) and the 12 schedule buffers included.
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state.update(schedule_buffers())
    if name == "sd15":
        expected = load_reference("sd15-ldm-checkpoint.json")["keys"]
        got = {k: {"shape": list(v.shape), "dtype": str(v.dtype)[6:]} for k, v in state.items()}
        assert got == expected, "random checkpoint must have exactly the real SD1.5 keys, shapes, dtypes"

    path = tmp_path_factory.mktemp(name) / "model.safetensors"
    # Non-SD1.5 sizes say what they are in the file's metadata (as our own saver writes it).
    save_file(state, str(path), metadata=None if name == "sd15" else {"sd_config": config.to_json()})
    unet, vae, text_encoder = reference_models(state, dconf)
    del state
    yield World(name, config, load_models(path), unet, vae, text_encoder, path)


def pytest_terminal_summary(terminalreporter) -> None:
    """What the suite cost in memory (CI prints it beside --durations): the suite must fit these machines."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
    # (Subprocesses are left out: a forked child's peak starts at its parent's size, so it would mislead.)
    terminalreporter.write_line(f"peak RSS of the test process: {peak:.2f} GiB")
