"""Smoke test of benchmarks/bench.py: a tiny-model quick run produces every row with numeric ratios.

It checks the plumbing (building each contender, timing, ratios, tables, JSON), not speed. OpenVINO is left
out (`--peers diffusers`) so the test does not depend on it being installed; one thread keeps a busy
machine's timings from stalling on thread barriers.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REFERENCE_DIR

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
QUICK_ROWS = {
    "unet64": "U-Net step, 2×4×64×64",
    "unet32": "U-Net step, 2×4×32×32",
    "decode512": "VAE decode → 512²",
    "decode256": "VAE decode → 256²",
    "encode512": "VAE encode 512²",
    "encode256": "VAE encode 256²",
    "text": "text encoder",
    "txt2img256": "txt2img 256²",
    "cold": "cold start",
}

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_tiny_quick_run(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    if not (REFERENCE_DIR / "sd15-diffusers-configs.json").exists():
        pytest.skip(f"reference data not found in {REFERENCE_DIR} (set SD_REFERENCE_DIR)")
    out = tmp_path / "bench.json"
    args = ["--config", "tiny", "--quick", "--peers", "diffusers", "--threads", "1", "--json", str(out)]
    proc = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout

    report = json.loads(out.read_text())
    assert [row["key"] for row in report["rows"]] == list(QUICK_ROWS)
    assert set(report["peak_gflops"]) == {"fp32", "bf16"}
    for row in report["rows"]:
        precisions = ("fp32",) if row["key"] == "cold" else ("fp32", "bf16")
        for precision in precisions:
            ratio = row["ratios"][f"ours {precision}"][f"diffusers {precision}"]
            assert isinstance(ratio, float) and ratio > 0, (row["key"], precision, ratio)
        if row["kind"] in ("unet", "decode", "encode", "text"):
            assert row["flops"] > 0 and row["gflops"]["ours fp32"]["gflops"] > 0
        if row["key"] == "cold":
            assert all(r["peak_rss_gb"] > 0.1 for r in row["results"])
    assert not any("failed" in r["note"] for row in report["rows"] for r in row["results"])

    # The markdown table: a line per row title, with a numeric ours ÷ diffusers ratio on it.
    for key, title in QUICK_ROWS.items():
        line = next((ln for ln in table.splitlines() if ln.startswith(f"| {title}")), None)
        assert line is not None, f"no table line for {key}:\n{table}"
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert re.fullmatch(r"\d+\.\d\d", cells[4]), f"{key}: ratio cell {cells[4]!r} in {line}"
    assert "OpenVINO" in table and "peak RSS" in table
