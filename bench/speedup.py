"""DistiLLM's efficiency claim on the demo task: wall-clock to reach the best ROUGE-L of on-policy GKD (the
paper's slow baseline: fresh student samples every step), and ROUGE-L at equal wall-clock, for DistiLLM's
adaptive off-policy (paper mode and overlap mode) against on-policy GKD (ours, λ 1, and TRL's
``GKDTrainer`` on the decoder-only pair), GKD at λ 0.5 as the DistiLLM authors run it (with probability λ
fresh SGOs into the buffer and a step on a buffer sample), ImitKD (the same every step, FKL),
SRKL on ground truth only (``kd``: DistiLLM with φ held at 0) and, on T5, MiniLLM with its authors'
recipe (at its relative rate and at the demo's) — the same step budget, SFT'd student init, teacher and
data. More arms by ``--arms``: on-policy SRKL, DistiLLM-2, DistiLLM on LoRA.

The setting is the demo's (``configs/demo.py``: 32 training rows, 300 steps of 32 at a constant 5e-3,
buffer 128 rows), chosen there because it is where DistiLLM's scheduler turns to SGOs: each table shows
every arm's steps on ground truth / fresh SGOs / replayed SGOs, and the headline ratio counts only
DistiLLM runs whose sources include SGO and replay steps. Every evaluation point is the mean ± std of
``--draws`` sampled generations of the validation rows (temperature 1, the paper's protocol; the seeds
differ per draw and step and are the same for every arm). Wall-clock is training only (steps and
generation; evaluation and checkpoints are left out), read from each run's ``metrics.jsonl``. Run from
the repository root:

    python bench/speedup.py                      # the T5 demo pair
    python bench/speedup.py --family gpt2        # decoder-only demo pair, with TRL's GKDTrainer
    python bench/speedup.py --quick              # the tiny demo, seconds: checks the script itself
    python bench/speedup.py --json out.json --plot out.png

``--family gpt2`` uses ``configs/demo.py:gpt2`` (its teacher trained on the spot the first time, on the
4000 rows) and TRL's ``GKDTrainer`` with lmbda 1 and position ids from the attention mask
(``bench/trl_gkd.py``; ``trl_gkd`` is TRL as shipped, which does not learn on left-padded GPT-2 rows).
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
from distillm_jax.run.folder import RunDir  # noqa: E402

# DistiLLM on LoRA adapters: r 16, α 64 on every projection of the (d_model 64) student, at 5× the full
# fine-tuning rate, as LoRA usually needs (at 1e-3 on q and v only it barely moved: 33.4 -> 34.9).
LORA = {
    "student__lora__rank": 16,
    "student__lora__alpha": 64.0,
    "student__lora__targets": ("q", "k", "v", "o", "up", "down"),
    "optim__lr": 5e-3,
}
# MiniLLM's recipe (paper.minillm: rounds of 8 batches of rollouts x 4 PPO passes, its advantages and
# optimizer) on the demo's batch and step budget (run_arm). Its rate is 1/100 of DistiLLM's in the authors'
# runs (5e-6 vs 5e-4), so 5e-5 here, 100 warmup steps of its ~2000 scaled to 15 of 300; ``minillm_lr``
# runs at the demo's 5e-3.
MINILLM = {
    "optim__epochs": 0,
    "optim__warmup_steps": 15,
    "optim__lr": 5e-5,
    "optim__end_lr": 5e-5,
}
ARMS = {  # name: (paper method, overrides)
    "distillm": ("distillm", {}),
    "kd": ("kd", {"loss__name": "srkl"}),  # DistiLLM's loss with φ held at 0: ground truth only
    "distillm_overlap": ("distillm", {"offpolicy__overlap": True}),
    "gkd": ("gkd", {}),
    "imitkd": ("imitkd", {}),
    "onpolicy": ("onpolicy", {}),
    "onpolicy_overlap": ("onpolicy", {"offpolicy__overlap": True}),
    "gkd_onpolicy": ("gkd_onpolicy", {"offpolicy__gkd_lambda": 1.0}),
    "trl_gkd": ("gkd_onpolicy", {"offpolicy__gkd_lambda": 1.0}),  # TRL's GKDTrainer, bench/trl_gkd.py
    "trl_gkd_positions": ("gkd_onpolicy", {"offpolicy__gkd_lambda": 1.0}),  # the same, position ids fixed
    "minillm": ("minillm", MINILLM),  # policy gradient, rollouts from 0.2·teacher + 0.8·student
    "minillm_lr": ("minillm", {**MINILLM, "optim__lr": 5e-3, "optim__end_lr": 5e-3}),
    "distillm2": ("distillm2", {}),  # contrastive SKL / SRKL on responses generated once by both models
    "distillm_lora": ("distillm", LORA),
}
FAMILY_ARMS = {
    "t5": ["distillm", "distillm_overlap", "kd", "gkd_onpolicy", "gkd", "imitkd", "minillm", "minillm_lr"],
    "gpt2": ["distillm", "kd", "gkd_onpolicy", "imitkd", "trl_gkd_positions"],
}
TARGETS = {"t5": "gkd_onpolicy", "gpt2": "trl_gkd_positions"}  # on-policy GKD: the paper's slow baseline


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the tiny demo config, a few steps")
    p.add_argument("--family", choices=list(FAMILY_ARMS), default="t5", help="the demo pair's architecture")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), help="default: the family's arms")
    p.add_argument("--target", help="the arm whose best ROUGE-L is the target (default: on-policy GKD)")
    p.add_argument("--steps", type=int, default=0, help="default: the demo's distillation steps")
    p.add_argument("--rows", type=int, default=0, help="training rows (default: the demo's)")
    p.add_argument("--eval-every", type=int, default=0, help="default: the demo's eval.interval")
    p.add_argument("--draws", type=int, default=3, help="sampled generations (seeds) per evaluation point")
    p.add_argument("--out", help="run folders (default: runs/bench_speedup[_gpt2])")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--plot", help="ROUGE-L against training wall-clock, PNG")
    args = p.parse_args(argv)
    args.arms = args.arms or FAMILY_ARMS[args.family]
    if any(a.startswith("trl_gkd") for a in args.arms) and args.family != "gpt2":
        p.error("the trl_gkd arms need --family gpt2 (TRL's GKDTrainer is decoder-only)")
    default = TARGETS[args.family]
    args.target = args.target or (default if default in args.arms else args.arms[-1])
    args.out = args.out or "runs/bench_speedup" + ("_gpt2" if args.family == "gpt2" else "")
    return args


def base_config(args: argparse.Namespace):
    """The demo config (its data, steps, rate and scheduler settings) with the student's SFT init made
    once and reused by every arm."""
    variant = ",".join(v for v, on in (("tiny", args.quick), ("gpt2", args.family == "gpt2")) if on)
    c = cfglib.load_file(os.path.join(ROOT, "configs", "demo.py"), variant)
    c.run_dir, c.resume, c.compare, c.compare_sft = args.out, True, (), False
    args.steps = args.steps or c.optim.steps
    args.eval_every = args.eval_every or c.eval.interval
    args.rows = args.rows or c.data.max_train_rows or c.data.demo_rows
    if args.quick:  # near-random tiny teacher and student: the script's path is what is checked
        args.steps, args.eval_every, args.draws = (
            min(args.steps, 4),
            min(args.eval_every, 2),
            min(args.draws, 2),
        )
        # TRL loads both from HF checkpoints: one SFT step writes them
        c.teacher.train_steps = c.student.train_steps = int(any(a.startswith("trl") for a in args.arms))
    c.data.demo_rows = max(c.data.demo_rows, args.rows)
    c.data.max_train_rows = args.rows  # the first rows of the generator's: the demo's student's
    for role in ("teacher", "student"):  # resume=True: made once, then reused
        if c[role].train_steps and not c[role].path:
            c = pipeline.sft_first(c, role, {})
    c.optim.steps, c.eval.interval, c.checkpoint.interval = args.steps, args.eval_every, args.steps
    c.eval.draws = args.draws
    return c


def run_arm(c, name: str, out: str) -> dict:
    """One method from the shared start, in a fresh ``out/name``."""
    method, changes = ARMS[name]
    batch = (c.optim.batch_size, c.optim.grad_accum)
    c = trainer.override(paper.method(trainer.override(c), method), **changes)
    if method == "minillm":  # the same batches as every arm; a round is 8 of them (256 rows on the demo)
        (c.optim.batch_size, c.optim.grad_accum), c.minillm.rollouts = batch, 8 * batch[0]
    if name.startswith("trl_gkd"):
        import trl_gkd

        return trl_gkd.run_arm(c, out, name, fix_positions=name == "trl_gkd_positions")
    c.run_dir, c.resume = os.path.join(out, name), False
    shutil.rmtree(c.run_dir, ignore_errors=True)
    summary = trainer.train(c)
    evals = [r for r in reporting.read_rows(RunDir(c.run_dir).metrics) if r["kind"] == "eval"]
    curve = [(r["step"], r["train_s"], r["rougeL"], r.get("rougeL_std", 0.0)) for r in evals]
    return {
        "arm": name,
        "method": method,
        "loss": c.loss.name,
        "steps": summary["steps"],
        "train_seconds": summary["train_seconds"],
        "gen_seconds": summary["gen_seconds"],
        "sources": summary["sources"],
        "phi": summary.get("phi"),
        "phi_path": summary.get("phi_path"),
        "curve": curve,
        "final_rougeL": curve[-1][2],
        "best_rougeL": max(p[2] for p in curve),
    }


def time_to(curve: list, target: float) -> float | None:
    """Training seconds at the first evaluation whose mean ROUGE-L reaches ``target`` (None: never)."""
    return next((p[1] for p in curve if p[2] >= target), None)


def at_time(curve: list, seconds: float) -> tuple[float, float]:
    """(mean, std) ROUGE-L at the last evaluation within ``seconds`` of training."""
    point = [p for p in curve if p[1] <= seconds + 1e-9][-1]
    return point[2], point[3] if len(point) > 3 else 0.0


def _pm(point: tuple) -> str:
    return f"{point[2]:.2f} ± {point[3]:.2f}" if len(point) > 3 else f"{point[2]:.2f}"


def table(rows: list[dict], target: float, target_arm: str = "gkd", draws: int = 1) -> str:
    ref = next((r for r in rows if r["arm"] == target_arm), None)
    base = time_to(ref["curve"], target) if ref else None
    budget = min(r["train_seconds"] for r in rows)  # equal wall-clock: what every arm had by then
    out = [
        f"target ROUGE-L {target:.2f} ({target_arm}'s best; each point the mean ± std of {draws} sampled "
        "generations of the validation rows)",
        f"| method | loss | steps | train s | s / 100 steps | blocked on generation s | to target s "
        f"| speed-up vs {target_arm} | ROUGE-L at {budget:.0f} s | final ROUGE-L | best "
        "| steps data / SGO / replay | final φ |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        t = time_to(r["curve"], target)
        ratio = f"{base / t:.2f}x" if t and base else "—"
        src, best = r["sources"], max(r["curve"], key=lambda p: p[2])
        equal = at_time(r["curve"], budget)
        phi = r.get("phi") if r["method"] == "distillm" else None  # the adaptive scheduler's
        out.append(
            f"| {r['arm']} | {r['loss']} | {r['steps']} | {r['train_seconds']:.0f} "
            f"| {100 * r['train_seconds'] / r['steps']:.1f} | {r['gen_seconds']:.0f} "
            f"| {'never' if t is None else f'{t:.0f}'} | {ratio} | {_pm((0, 0, *equal))} "
            f"| {_pm(r['curve'][-1])} | {_pm(best)} | {src['data']} / {src['sgo']} / {src['replay']} "
            f"| {'' if phi is None else f'{phi:g}'} |"
        )
    return "\n".join(out)


def plot(rows: list[dict], target: float, path: str, target_arm: str = "gkd") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        secs = [p[1] for p in r["curve"]]
        vals = [p[2] for p in r["curve"]]
        errs = [p[3] if len(p) > 3 else 0.0 for p in r["curve"]]
        ax.errorbar(secs, vals, yerr=errs, marker="o", capsize=2, label=r["arm"])
    ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"target ({target_arm}'s best)")
    ax.set_xlabel("training wall-clock (s)")
    ax.set_ylabel("validation ROUGE-L (sampled, mean ± std)")
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
    print(table(rows, target, args.target, args.draws))
    write_rows(args.json, args, rows, target=target)
    if args.plot:
        plot(rows, target, args.plot, args.target)


if __name__ == "__main__":
    main()
