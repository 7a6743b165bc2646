"""The GPU Mixer benchmark's end-to-end check on any device (--tiny), and run_all's row for it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_mixer_gpu_tiny_runs_and_feeds_the_run_all_table(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_mixer_gpu.py"), "--tiny", "--rounds", "1",
                          "--steps", "1", "--no-timm", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["params"] == 24_090 and set(r["runs"]) == {"mixer", "rp_mixer"}
    assert all(v["step_s"] > 0 and 0 < v["mfu"] < 1 for v in r["runs"].values())
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from run_all import format_table, rows_mixer_gpu
    finally:
        sys.path.pop(0)
    rows = rows_mixer_gpu(r, {})
    names = ["mixer-b16 gpu bf16 compiled vs timm", "rp_mixer-b16 gpu bf16 vs our mixer"]
    assert [row["name"] for row in rows] == names
    assert rows[0]["ratio"] is None and rows[1]["ratio"] > 0
    assert "rp_mixer-b16" in format_table(rows)


@pytest.mark.slow
def test_bench_mixer_gpu_needs_a_gpu_unless_tiny() -> None:
    import torch

    if torch.cuda.is_available():
        return
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_mixer_gpu.py")], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "no CUDA device" in res.stderr
