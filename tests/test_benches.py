"""The benchmarks run end to end on tiny shapes, and their two sides agree."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_losses_quick(tmp_path):
    out = tmp_path / "rows.json"
    cmd = [sys.executable, "bench/losses.py", "--quick", "--divergences", "srkl", "tvd", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| 300 | srkl |" in proc.stdout  # the markdown table is printed
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4
    for name in ("srkl", "tvd"):
        plain, chunked = (
            next(r for r in rows if r["divergence"] == name and r["form"] == f) for f in ("plain", "chunked")
        )
        assert abs(chunked["value"] - plain["value"]) <= 1e-5 * abs(plain["value"])
        assert chunked["temp_mib"] < plain["temp_mib"]
        assert plain["ms"] > 0 and chunked["ms"] > 0


def test_bench_forward_quick(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "rows.json"
    cmd = [sys.executable, "bench/forward.py", "--quick", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == ["gpt2", "llama"] and all(r["ratio"] > 0 for r in rows)
