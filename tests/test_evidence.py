"""bench/evidence.py's statistics: paired intervals over training seeds, and an ordering written only
where the interval excludes 0."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
evidence = pytest.importorskip("evidence")


def test_interval_is_the_t_interval_of_the_paired_differences():
    mean, lo, hi = evidence.interval([1.0, 2.0, 3.0])  # sd 1, t(0.975, 2) = 4.303
    assert mean == 2.0 and math.isclose(hi - mean, 4.303 / math.sqrt(3), rel_tol=1e-6)
    assert math.isclose(mean - lo, hi - mean)
    assert evidence.interval([0.5])[1:] == (-math.inf, math.inf)  # one pair says nothing


def test_verdict_needs_the_interval_clear_of_zero():
    assert evidence.verdict(0.1, 0.9, "a", "b") == "a > b holds"
    assert evidence.verdict(-0.9, -0.1, "a", "b") == "b > a holds"
    assert evidence.verdict(-0.1, 0.9, "a", "b") == "no ordering holds"


def _row(arm, seed, lr, test, best_val, curve):
    src = {"data": 10, "sgo": 0, "replay": 0}
    steps = [(k, "data", False, 1.0, 0.5, None) for k in range(1, 7)]
    return dict(
        arm=arm,
        seed=seed,
        lr=lr,
        test=test,
        best_val=best_val,
        curve=curve,
        sources=src,
        steps=steps,
        phi_path=[],
        buffer_batches=4,
        train_seconds=curve[-1][1],
        gen_seconds=0.0,
    )


def test_tables_pair_by_seed_at_the_chosen_rate():
    """Seeds pair across arms; the other grid rates do not enter; a seed an arm lacks is left out; the
    speed-up is the other arm's seconds to its best over DistiLLM's to the same score."""
    curve_a = [(0, 0.0, 10.0, 3.0), (10, 5.0, 20.0, 2.5), (20, 10.0, 30.0, 2.4)]  # step, s, ROUGE-L, CE
    curve_b = [(0, 0.0, 10.0, 3.0), (10, 8.0, 20.0, 2.6), (20, 16.0, 25.0, 2.7)]
    rows = [
        _row("distillm", 0, 1e-3, 30.0, 30.0, curve_a),
        _row("distillm", 1, 1e-3, 31.0, 30.0, curve_a),
        _row("distillm", 2, 1e-3, 32.0, 30.0, curve_a),
        _row("sft", 0, 1e-3, 20.0, 20.0, curve_b),
        _row("sft", 1, 1e-3, 20.5, 20.0, curve_b),
        _row("sft", 0, 1e-2, 99.0, 19.0, curve_b),  # a grid rate not chosen: not in the table
    ]
    text = evidence.tables({"lr": {"distillm": 1e-3, "sft": 1e-3}, "eval_seeds": [10, 20], "rows": rows})
    assert "training seeds [0, 1]" in text and "99.00" not in text
    line = next(x for x in text.splitlines() if x.startswith("sft") and "[" in x)
    assert "+10.25" in line and "holds" in line and "1.60x (2/2)" in line  # 8 s / 5 s to score 20
    md = evidence.tables(
        {"lr": {"distillm": 1e-3, "sft": 1e-3}, "eval_seeds": [10], "rows": rows}, markdown=True
    )
    row = next(x for x in md.splitlines() if x.startswith("| distillm | 0.001"))
    assert row.endswith("| 10 (0) | 0.62 |")  # DistiLLM's seconds (generating), over SFT's 16 s


def test_staleness_is_the_mean_age_of_what_the_buffer_holds():
    """A FIFO of the last 2 sampled batches; a replay draws uniformly from it."""
    steps = [(1, "sgo", True), (2, "data", False), (3, "sgo", True), (4, "replay", False), (5, "sgo", True)]
    steps += [(6, "replay", False), (7, "replay", True)]  # GKD's way: sample into the buffer, then replay
    run = {"buffer_batches": 2, "steps": [(*x, 1.0, 1.0, 10) for x in steps]}
    # step 4: holds 1, 3 -> ages 3, 1; step 6: holds 3, 5 -> 3, 1; step 7: holds 5, 7 -> 2, 0
    assert evidence.staleness(run) == (2 + 2 + 1) / 3
    assert evidence.staleness({"buffer_batches": 2, "steps": [(1, "data", False, 1.0, 1.0, None)]}) is None


def test_width_and_saved_rates(tmp_path):
    """``--width`` sets the student's shape at 32 dimensions a head; ``--rates-from`` takes each arm's rate
    from a saved result (no search); wrong values are refused in one line, before any training."""
    saved = tmp_path / "r.json"
    saved.write_text('{"lr": {"sft": 0.003, "distillm": 0.001}}')
    args = evidence.parse_args(["--width", "64", "--rates-from", str(saved), "--arms", "sft", "distillm"])
    assert args.rates == {"sft": 0.003, "distillm": 0.001}
    student = evidence.base_config(args).student.config
    assert (student.d_model, student.num_heads, student.d_kv, student.d_ff) == (64, 2, 32, 256)
    wrong = [["--width", "48"], ["--rates-from", str(saved), "--arms", "distillm", "gkd"]]
    for bad in [*wrong, ["--rates-from", str(tmp_path / "none.json")]]:
        with pytest.raises(SystemExit):
            evidence.parse_args(bad)
