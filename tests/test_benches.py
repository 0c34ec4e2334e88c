"""The benchmarks run end to end on tiny shapes, and their two sides agree."""

import json
import os
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


def test_bench_train_step_quick(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "rows.json"
    cmd = [sys.executable, "bench/train_step.py", "--quick", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| ours tok/s | transformers tok/s |" in proc.stdout  # the markdown table is printed
    (row,) = json.loads(out.read_text())["rows"]
    # Same weights, same batch: the first step's SRKL agrees, and so does the loss after the AdamW
    # updates (same clipping, decay and learning rate on both sides).
    ours, theirs = row["ours_losses"], row["torch_losses"]
    assert len(ours) == len(theirs) == row["warmup"] + row["repeats"]
    assert ours[0] > 0 and abs(ours[0] - theirs[0]) <= 1e-4 * abs(theirs[0])
    assert abs(ours[-1] - theirs[-1]) <= 1e-3 * abs(theirs[-1]) and ours[-1] < ours[0]
    assert row["ours_tok_s"] > 0 and row["torch_tok_s"] > 0 and row["ratio"] > 0
    assert 0 < row["ours_flop_s"] < 10 * row["peak_flop_s"]


def test_bench_speedup_quick(tmp_path):
    out, png = tmp_path / "rows.json", tmp_path / "curve.png"
    cmd = [sys.executable, "bench/speedup.py", "--quick", "--arms", "gkd", "imitkd"]
    cmd += ["--out", str(tmp_path / "runs"), "--json", str(out), "--plot", str(png)]
    env = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| method | loss | steps |" in proc.stdout
    result = json.loads(out.read_text())
    gkd, imitkd = result["rows"]
    assert result["target"] == gkd["best_rougeL"]
    assert sum(gkd["sources"].values()) == sum(imitkd["sources"].values()) == 4
    assert imitkd["sources"]["replay"] == 4 and imitkd["gen_seconds"] > 0
    assert [s for s, _, _ in gkd["curve"]] == [0, 2, 4] and gkd["loss"] == "jsd" and imitkd["loss"] == "fkl"
    assert png.stat().st_size > 1000
