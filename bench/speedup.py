"""DistiLLM's efficiency claim on the demo task: wall-clock to reach a target student ROUGE-L, and the final
ROUGE-L, for DistiLLM's adaptive off-policy (paper mode and overlap mode) against the SGO baselines — GKD
(λ = 0.5 on-policy, JSD β = 0.1), ImitKD (fresh SGOs into the buffer every step, FKL) and on-policy
SGOs every step (SRKL) — with the same step budget, the same SFT'd student init and the same teacher.

The student distils on 500 training rows for 300 steps of 32 (19 epochs, as the paper's 20 on Dolly):
long enough to overfit, which is when DistiLLM's scheduler turns to SGOs. The target is the best ROUGE-L
the GKD run reaches (the paper's on-policy baseline). Wall-clock is
training only (steps and generation; evaluation and checkpoints are left out) and is read from each run's
``metrics.jsonl``. Each evaluation samples the validation responses (temperature 1, the paper's protocol)
with one seed. Run from the repository root:

    python bench/speedup.py                      # the demo: 300 steps per method, evaluated every 30
    python bench/speedup.py --quick              # the tiny demo, seconds: checks the script itself
    python bench/speedup.py --json out.json --plot out.png
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence

import numpy as np
from common import machine_note

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import paper  # noqa: E402
from distillm_jax import config as cfglib  # noqa: E402
from distillm_jax import reporting, trainer  # noqa: E402

ARMS = {  # name: (paper method, overrides)
    "distillm": ("distillm", {}),
    "distillm_overlap": ("distillm", {"offpolicy__overlap": True}),
    "gkd": ("gkd", {}),
    "imitkd": ("imitkd", {}),
    "onpolicy": ("onpolicy", {}),
    "onpolicy_overlap": ("onpolicy", {"offpolicy__overlap": True}),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the tiny demo config, a few steps")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rows", type=int, default=500, help="training rows: 300 steps of 32 = 19 epochs")
    p.add_argument("--eval-every", type=int, default=30)
    p.add_argument("--out", default="runs/bench_speedup", help="run folders")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--plot", help="ROUGE-L against training wall-clock, PNG")
    return p.parse_args(argv)


def base_config(args: argparse.Namespace):
    """The demo config with the student's SFT init made once (and reused by every arm)."""
    c = cfglib.load_file(os.path.join(ROOT, "configs", "demo.py"), "tiny" if args.quick else "")
    c.run_dir, c.resume, c.compare_sft = args.out, True, False
    if args.quick:  # random tiny teacher and student: the script's path is what is checked
        args.steps, args.eval_every = min(args.steps, 4), min(args.eval_every, 2)
        c.teacher.train_steps = c.student.train_steps = 0
    for role in ("teacher", "student"):  # resume=True: made once, then reused
        if c[role].train_steps and not c[role].path:
            c = trainer.sft_first(c, role, {})
    c.optim.steps, c.eval.interval, c.checkpoint.interval = args.steps, args.eval_every, args.steps
    c.data.max_train_rows = 0 if args.quick else args.rows
    return c


def run_arm(c, name: str, out: str) -> dict:
    """One method from the shared start, in a fresh ``out/name``."""
    method, changes = ARMS[name]
    c = paper.method(trainer.override(c, **changes), method)
    c.run_dir, c.resume = os.path.join(out, name), False
    shutil.rmtree(c.run_dir, ignore_errors=True)
    summary = trainer.train(c)
    evals = [r for r in reporting.read_rows(os.path.join(c.run_dir, "metrics.jsonl")) if r["kind"] == "eval"]
    return {
        "arm": name,
        "method": method,
        "loss": c.loss.name,
        "steps": summary["steps"],
        "train_seconds": summary["train_seconds"],
        "gen_seconds": summary["gen_seconds"],
        "sources": summary["sources"],
        "phi": summary.get("phi"),
        "curve": [(r["step"], r["train_s"], r["rougeL"]) for r in evals],
        "final_rougeL": evals[-1]["rougeL"],
        "best_rougeL": max(r["rougeL"] for r in evals),
    }


def time_to(curve: list, target: float) -> float | None:
    """Training seconds at the first evaluation reaching ``target`` (None: never)."""
    return next((s for _, s, v in curve if v >= target), None)


def table(rows: list[dict], target: float) -> str:
    gkd = next((r for r in rows if r["arm"] == "gkd"), None)
    base = time_to(gkd["curve"], target) if gkd else None
    out = [
        f"target ROUGE-L {target:.2f} (GKD's best)",
        "| method | loss | steps | train s | blocked on generation s | to target s | speed-up vs GKD | "
        "final ROUGE-L | best | sources data/sgo/replay |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        t = time_to(r["curve"], target)
        ratio = f"{base / t:.2f}x" if t and base else "—"
        src = r["sources"]
        out.append(
            f"| {r['arm']} | {r['loss']} | {r['steps']} | {r['train_seconds']:.0f} | "
            f"{r['gen_seconds']:.0f} | "
            f"{'never' if t is None else f'{t:.0f}'} | {ratio} | {r['final_rougeL']:.2f} | "
            f"{r['best_rougeL']:.2f} | {src['data']}/{src['sgo']}/{src['replay']} |"
        )
    return "\n".join(out)


def plot(rows: list[dict], target: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        _, secs, vals = zip(*r["curve"], strict=True)
        ax.plot(secs, vals, marker="o", label=r["arm"])
    ax.axhline(target, color="gray", linestyle="--", linewidth=1, label="target (GKD best)")
    ax.set_xlabel("training wall-clock (s)")
    ax.set_ylabel("validation ROUGE-L (sampled)")
    ax.set_title("demo task: student ROUGE-L against wall-clock")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    c = base_config(args)
    rows = [run_arm(c, name, args.out) for name in args.arms]
    gkd = next((r for r in rows if r["arm"] == "gkd"), None)
    target = gkd["best_rougeL"] if gkd else float(np.max([r["best_rougeL"] for r in rows]))
    print(machine_note())
    print(table(rows, target))
    if args.json:
        with open(args.json, "w") as f:
            result = {"machine": machine_note(), "args": vars(args), "target": target, "rows": rows}
            json.dump(result, f, indent=1)
    if args.plot:
        plot(rows, target, args.plot)


if __name__ == "__main__":
    main()
