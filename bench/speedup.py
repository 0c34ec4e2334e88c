"""DistiLLM's efficiency claim on the demo task: wall-clock to reach a target student ROUGE-L, and the final
ROUGE-L, for DistiLLM's adaptive off-policy (paper mode and overlap mode) against the SGO baselines — GKD
(λ = 0.5 on-policy, JSD β = 0.1), ImitKD (fresh SGOs into the buffer every step, FKL) and on-policy
SGOs every step (SRKL) — and the paper's other baselines and settings: MiniLLM (policy gradient on the
reverse KL), DistiLLM-2 (contrastive skew KLs on teacher and student responses generated once) and
DistiLLM training LoRA adapters (r 16, α 64, every projection, lr 5e-3) instead of the whole student —
with the same step budget, the same SFT'd student init and the same teacher.

The student distils on 500 training rows for 300 steps of 32 (19 epochs, as the paper's 20 on Dolly):
long enough to overfit, which is when DistiLLM's scheduler turns to SGOs. The target is the best ROUGE-L
the GKD run reaches (the paper's on-policy baseline). Wall-clock is
training only (steps and generation; evaluation and checkpoints are left out) and is read from each run's
``metrics.jsonl``. Each evaluation samples the validation responses (temperature 1, the paper's protocol)
with one seed. Run from the repository root:

    python bench/speedup.py                      # the demo: 300 steps per method, evaluated every 30
    python bench/speedup.py --quick              # the tiny demo, seconds: checks the script itself
    python bench/speedup.py --json out.json --plot out.png
    python bench/speedup.py --family gpt2        # decoder-only demo pair, against TRL's GKDTrainer too

``--family gpt2`` runs the demo task with a GPT-2-shaped pair (``configs/demo.py:gpt2``, teacher trained
on the spot the first time) and adds two on-policy GKD arms, ours (``gkd`` with lmbda 1) and TRL's
``GKDTrainer`` with lmbda 1 (``bench/trl_gkd.py``) as shipped and with its position ids fixed; the best
ROUGE-L of the latter is then the target.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence

import numpy as np
from common import machine_note, write_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import paper  # noqa: E402
from distillm_jax import config as cfglib  # noqa: E402
from distillm_jax import pipeline, reporting, trainer  # noqa: E402

# DistiLLM on LoRA adapters: r 16, α 64 on every projection of the (d_model 64) student, at 5× the full
# fine-tuning rate, as LoRA usually needs (at 1e-3 on q and v only it barely moved: 33.4 -> 34.9).
LORA = {
    "student__lora__rank": 16,
    "student__lora__alpha": 64.0,
    "student__lora__targets": ("q", "k", "v", "o", "up", "down"),
    "optim__lr": 5e-3,
}
ARMS = {  # name: (paper method, overrides)
    "distillm": ("distillm", {}),
    "distillm_overlap": ("distillm", {"offpolicy__overlap": True}),
    "gkd": ("gkd", {}),
    "imitkd": ("imitkd", {}),
    "onpolicy": ("onpolicy", {}),
    "onpolicy_overlap": ("onpolicy", {"offpolicy__overlap": True}),
    "gkd_onpolicy": ("gkd", {"offpolicy__gkd_lambda": 1.0}),
    "trl_gkd": ("gkd", {"offpolicy__gkd_lambda": 1.0}),  # TRL's GKDTrainer, bench/trl_gkd.py
    "trl_gkd_positions": ("gkd", {"offpolicy__gkd_lambda": 1.0}),  # the same, position ids fixed
    "minillm": ("minillm", {}),  # policy gradient, rollouts from 0.2·teacher + 0.8·student, 4 PPO epochs
    "distillm2": ("distillm2", {}),  # contrastive SKL / SRKL on responses generated once by both models
    "distillm_lora": ("distillm", LORA),
}
FAMILY_ARMS = {
    "t5": [
        "distillm",
        "distillm_overlap",
        "gkd",
        "imitkd",
        "onpolicy",
        "onpolicy_overlap",
        "minillm",
        "distillm2",
        "distillm_lora",
    ],
    "gpt2": ["distillm", "gkd", "gkd_onpolicy", "trl_gkd", "trl_gkd_positions"],
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the tiny demo config, a few steps")
    p.add_argument("--family", choices=list(FAMILY_ARMS), default="t5", help="the demo pair's architecture")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), help="default: the family's arms")
    p.add_argument(
        "--target", help="the arm whose best ROUGE-L is the target (default: the last TRL arm, else gkd)"
    )
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rows", type=int, default=500, help="training rows: 300 steps of 32 = 19 epochs")
    p.add_argument("--eval-every", type=int, default=30)
    p.add_argument("--out", help="run folders (default: runs/bench_speedup[_gpt2])")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--plot", help="ROUGE-L against training wall-clock, PNG")
    args = p.parse_args(argv)
    args.arms = args.arms or FAMILY_ARMS[args.family]
    trl = [a for a in args.arms if a.startswith("trl_gkd")]
    if trl and args.family != "gpt2":
        p.error("the trl_gkd arms need --family gpt2 (TRL's GKDTrainer is decoder-only)")
    args.target = args.target or (trl[-1] if trl else "gkd")
    args.out = args.out or "runs/bench_speedup" + ("_gpt2" if args.family == "gpt2" else "")
    return args


def base_config(args: argparse.Namespace):
    """The demo config with the student's SFT init made once (and reused by every arm)."""
    variant = ",".join(v for v, on in (("tiny", args.quick), ("gpt2", args.family == "gpt2")) if on)
    c = cfglib.load_file(os.path.join(ROOT, "configs", "demo.py"), variant)
    c.run_dir, c.resume, c.compare_sft = args.out, True, False
    if args.quick:  # near-random tiny teacher and student: the script's path is what is checked
        args.steps, args.eval_every = min(args.steps, 4), min(args.eval_every, 2)
        # TRL loads both from HF checkpoints: one SFT step writes them
        c.teacher.train_steps = c.student.train_steps = int(any(a.startswith("trl") for a in args.arms))
    for role in ("teacher", "student"):  # resume=True: made once, then reused
        if c[role].train_steps and not c[role].path:
            c = pipeline.sft_first(c, role, {})
    c.optim.steps, c.eval.interval, c.checkpoint.interval = args.steps, args.eval_every, args.steps
    c.data.max_train_rows = 0 if args.quick else args.rows
    return c


def run_arm(c, name: str, out: str) -> dict:
    """One method from the shared start, in a fresh ``out/name``."""
    method, changes = ARMS[name]
    c = paper.method(trainer.override(c, **changes), method)
    if name.startswith("trl_gkd"):
        import trl_gkd

        return trl_gkd.run_arm(c, out, name, fix_positions=name == "trl_gkd_positions")
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


def at_time(curve: list, seconds: float) -> float:
    """ROUGE-L at the last evaluation within ``seconds`` of training."""
    return [v for _, s, v in curve if s <= seconds + 1e-9][-1]


def table(rows: list[dict], target: float, target_arm: str = "gkd") -> str:
    ref = next((r for r in rows if r["arm"] == target_arm), None)
    base = time_to(ref["curve"], target) if ref else None
    budget = min(r["train_seconds"] for r in rows)  # equal wall-clock: what every arm had by then
    out = [
        f"target ROUGE-L {target:.2f} ({target_arm}'s best)",
        f"| method | loss | steps | train s | s / 100 steps | blocked on generation s | to target s "
        f"| speed-up vs {target_arm} | ROUGE-L at {budget:.0f} s | final ROUGE-L | best "
        "| sources data/sgo/replay |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        t = time_to(r["curve"], target)
        ratio = f"{base / t:.2f}x" if t and base else "—"
        src = r["sources"]
        out.append(
            f"| {r['arm']} | {r['loss']} | {r['steps']} | {r['train_seconds']:.0f} "
            f"| {100 * r['train_seconds'] / r['steps']:.1f} | {r['gen_seconds']:.0f} "
            f"| {'never' if t is None else f'{t:.0f}'} | {ratio} | {at_time(r['curve'], budget):.2f} "
            f"| {r['final_rougeL']:.2f} | "
            f"{r['best_rougeL']:.2f} | {src['data']}/{src['sgo']}/{src['replay']} |"
        )
    return "\n".join(out)


def plot(rows: list[dict], target: float, path: str, target_arm: str = "gkd") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        _, secs, vals = zip(*r["curve"], strict=True)
        ax.plot(secs, vals, marker="o", label=r["arm"])
    ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"target ({target_arm}'s best)")
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
    ref = next((r for r in rows if r["arm"] == args.target), None)
    target = ref["best_rougeL"] if ref else float(np.max([r["best_rougeL"] for r in rows]))
    print(machine_note())
    print(table(rows, target, args.target))
    write_rows(args.json, args, rows, target=target)
    if args.plot:
        plot(rows, target, args.plot, args.target)


if __name__ == "__main__":
    main()
