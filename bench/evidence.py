"""Every arm of the comparison over several training seeds, each at its own learning rate, in the
long-response regime (``configs/demo.py:long``), reported with paired intervals.

The protocol, for every comparison we publish:

- **Training seeds, paired.** Seed ``s`` sets ``seed`` and ``student.seed``: the student's SFT init (its
  data order and dropout), then every arm's data order, dropout masks and SGO draws. All arms of seed
  ``s`` start from seed ``s``'s init, so arm differences are taken seed by seed.
- **Each arm at its own rate**, chosen on the dev split: every arm runs the whole ``--grid`` at the first
  seed; the rate with the best validation ROUGE-L (sampled, as ``best/`` is picked) is the arm's for all
  seeds. The first seed's runs at that rate are reused, so its test scores share the selection (every
  arm alike).
- **Test**: each run's ``best/`` on the test rows over the sampling seeds ``eval.seeds``; a run's score
  is the mean over them. Per arm: mean ± std over training seeds. Per pair: the mean paired difference
  with a 95 % t interval over training seeds; an ordering **holds** only when the interval excludes 0.
- **Wall-clock**: training seconds (steps and generation, compiles included, evaluation left out) for
  DistiLLM to reach each other arm's best validation ROUGE-L, against the seconds that arm took.

Each finished run leaves ``evidence.json`` in its folder: the script continues where it stopped.

    python bench/evidence.py                         # the whole protocol (see BENCHMARKS.md for time)
    python bench/evidence.py --quick                 # the tiny form: checks the script, a minute or two
    python bench/evidence.py --render bench/results/evidence_cpu.json    # tables from a saved result
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
from collections.abc import Sequence

import numpy as np
from common import machine_note, write_rows
from speedup import time_to

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import paper  # noqa: E402
from distillm_jax import config as cfglib  # noqa: E402
from distillm_jax import pipeline, reporting, trainer  # noqa: E402

ARMS = {  # name: (paper method, overrides) — every arm from the same init of its seed
    "sft": ("sft", {}),
    "kd": ("kd", {}),  # FKL on ground truth
    "srkl": ("kd", {"loss__name": "srkl", "loss__alpha": 0.1}),  # DistiLLM with φ held at 0
    "distillm": ("distillm", {}),  # SRKL + adaptive off-policy SGOs
    "srkl_onpolicy": ("onpolicy", {}),  # SRKL on fresh SGOs every step
    "gkd": ("gkd", {}),  # the DistiLLM authors' mixed-jsd: λ 0.5 fresh SGOs into the buffer, replayed
    "imitkd": ("imitkd", {}),  # FKL on fresh SGOs every step
    "distillm_jsd": ("distillm", {"loss__name": "jsd", "loss__beta": 0.1}),  # the scheduler, GKD's loss
}
HEAD = "distillm"
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the tiny long-response config, a few steps")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), help="default: all (--quick: sft, distillm, gkd)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (paired)")
    p.add_argument("--grid", nargs="+", type=float, default=[1e-3, 3e-3, 1e-2], help="learning rates")
    p.add_argument("--out", default="runs/bench_evidence", help="run folders (continued if present)")
    p.add_argument("--json", default="", help="write the rows here")
    p.add_argument("--render", metavar="JSON", help="print the tables of a saved result and stop")
    p.add_argument("--width", type=int, help="the student's d_model (heads d/32, d_ff 4d); default 128")
    p.add_argument(
        "--rates-from",
        metavar="JSON",
        help="take each arm's rate from a saved result instead of searching the grid (the width curve)",
    )
    args = p.parse_args(argv)
    args.arms = args.arms or (["sft", "distillm", "gkd"] if args.quick else list(ARMS))
    if HEAD not in args.arms:
        p.error(f"--arms must include {HEAD}: every interval is against it")
    if args.width is not None and (args.width < 32 or args.width % 32):
        p.error(f"--width {args.width}: give a multiple of 32 (one head per 32 dimensions)")
    if args.rates_from:
        try:
            with open(args.rates_from) as f:
                saved = json.load(f)["lr"]
        except (OSError, ValueError, KeyError) as e:
            p.error(
                f"--rates-from {args.rates_from}: not a saved result of this script ({type(e).__name__}: {e})"
            )
        missing = [a for a in args.arms if a not in saved]
        if missing:
            p.error(f"{args.rates_from} has no rate for {', '.join(missing)}: leave them out of --arms")
        args.rates = {a: saved[a] for a in args.arms}
    else:
        args.rates = {}
    if args.quick:
        args.seeds, args.grid = args.seeds[:2], args.grid[:2]
        args.out = args.out if args.out != "runs/bench_evidence" else "runs/bench_evidence_quick"
    return args


def base_config(args: argparse.Namespace):
    c = cfglib.load_file(os.path.join(ROOT, "configs", "demo.py"), "tiny,long" if args.quick else "long")
    c.compare, c.compare_sft, c.resume = (), False, True
    c.checkpoint.interval, c.log_interval = c.optim.steps, 1
    if args.quick:  # a tiny teacher trained on the spot; the path of every stage is what is checked
        c.teacher.train_steps = 2
    if args.width:
        w = args.width
        c.student.config.update(d_model=w, d_kv=32, num_heads=w // 32, d_ff=4 * w)
    return c


def init_for(c, seed: int, out: str):
    """Seed ``seed``'s student init (made once, then reused) and the config that starts from it."""
    c = trainer.override(c, seed=seed, student__seed=seed, run_dir=os.path.join(out, f"seed{seed}"))
    if c.teacher.train_steps and not c.teacher.path:
        c = pipeline.sft_first(trainer.override(c, run_dir=os.path.join(out, "teacher")), "teacher", {})
        c.run_dir = os.path.join(out, f"seed{seed}")
    return pipeline.sft_first(c, "student", {})


def run_arm(c, arm: str, lr: float, out: str) -> dict:
    """One arm at one rate from the seed's init, in ``out`` (reused when it finished before)."""
    done = os.path.join(out, "evidence.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    method, changes = ARMS[arm]
    c = trainer.override(paper.method(trainer.override(c), method), **changes)
    c = trainer.override(c, optim__lr=lr, optim__end_lr=lr, run_dir=out, resume=False)
    shutil.rmtree(out, ignore_errors=True)
    summary = trainer.train(c)
    rows = reporting.read_rows(os.path.join(out, "metrics.jsonl"))
    evals = [r for r in rows if r["kind"] == "eval"]
    steps = [r for r in rows if r["kind"] == "train"]
    test = trainer.evaluate_model(
        trainer.override(
            c,
            student__path=os.path.join(out, "best"),
            method="sft",
            data__valid_split=c.data.test_split,
            data__max_valid_rows=0,  # every test row (the split says how many)
        ),
        tuple(c.eval.seeds),
    )
    result = {
        "arm": arm,
        "method": method,
        "loss": c.loss.name if method != "sft" else "ce",
        "seed": int(c.seed),
        "lr": lr,
        "test": test["rougeL"],
        "test_std": test["rougeL_std"],
        "test_scores": test["scores"],
        "test_ce": test["val_ce"],
        "best_val": summary["best"],
        "best_step": summary["best_step"],
        "train_seconds": summary["train_seconds"],
        "gen_seconds": summary["gen_seconds"],
        "sources": summary["sources"],
        "phi_path": summary.get("phi_path"),
        "curve": [(r["step"], r["train_s"], r["rougeL"], r["val_ce"]) for r in evals],
        # every step (log_interval 1): what fed it, whether it sampled (over 1 ms generating), loss, gradient
        # norm, SGO length
        "steps": [
            (r["step"], _fed(r), r.get("gen_s", 0.0) > 1e-3, r["loss"], r["grad_norm"], r.get("sgo_len"))
            for r in steps
            if "loss" in r
        ],
        "buffer_batches": c.offpolicy.capacity // c.optim.batch_size,
    }
    with open(done + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(done + ".tmp", done)
    return result


def _fed(row: dict) -> str:
    """What fed a one-step log row: data, sgo (fresh) or replay."""
    return max(("data", "sgo", "replay"), key=lambda k: row.get(f"src_{k}", 1.0 if k == "data" else 0.0))


def staleness(run: dict) -> float | None:
    """Mean age in steps of the rows replayed: the buffer (FIFO) holds the last ``buffer_batches``
    sampled batches, and a replay draws uniformly from it (None: the run never replayed)."""
    held, ages = collections.deque(maxlen=run["buffer_batches"]), []
    for step, fed, sampled, *_ in run["steps"]:
        if sampled:
            held.append(step)
        if fed == "replay" and held:
            ages.append(np.mean([step - s for s in held]))
    return float(np.mean(ages)) if ages else None


def interval(diffs: Sequence[float]) -> tuple[float, float, float]:
    """Mean of paired differences and its two-sided 95 % t interval (half-width inf with one pair)."""
    d = np.asarray(diffs, dtype=float)
    if len(d) < 2:
        return float(d.mean()), -np.inf, np.inf
    half = T95[min(len(d) - 2, len(T95) - 1)] * d.std(ddof=1) / np.sqrt(len(d))
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def verdict(lo: float, hi: float, a: str, b: str) -> str:
    return f"{a} > {b} holds" if lo > 0 else f"{b} > {a} holds" if hi < 0 else "no ordering holds"


def _table(rows: list[tuple], markdown: bool) -> str:
    if not markdown:
        return reporting.table(rows)
    line = lambda r: "| " + " | ".join(str(x) for x in r) + " |"  # noqa: E731
    return "\n".join([line(rows[0]), line(["---"] * len(rows[0])), *map(line, rows[1:])])


def tables(result: dict, markdown: bool = False) -> str:
    """The paired table, the rate search, the pairs' intervals and the diagnosis (``markdown``: as
    markdown tables, for BENCHMARKS.md)."""
    rows, head = result["rows"], HEAD
    caveat = [f"note: {result['note']}"] if result.get("note") else []
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    final = {a: {r["seed"]: r for r in rows if r["arm"] == a and r["lr"] == result["lr"][a]} for a in arms}
    seeds = sorted(set.intersection(*(set(v) for v in final.values())))
    out = [
        *caveat,
        f"training seeds {seeds}; test ROUGE-L of best/, each the mean over "
        f"{len(result['eval_seeds'])} sampling seeds",
    ]
    t = [
        (
            "arm",
            "lr",
            "test mean ± std over seeds",
            *(f"seed {s}" for s in seeds),
            "steps data / SGO / replay",
            "train s (generating)",
            "× SFT's s",
        )
    ]
    secs = {a: np.mean([final[a][s]["train_seconds"] for s in seeds]) for a in arms}
    for a in arms:
        v = [final[a][s]["test"] for s in seeds]
        src = [final[a][s]["sources"] for s in seeds]
        fed = " / ".join(str(round(np.mean([x[k] for x in src]))) for k in ("data", "sgo", "replay"))
        t.append(
            (
                a,
                f"{result['lr'][a]:g}",
                f"{np.mean(v):.2f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.2f}",
                *(f"{x:.2f}" for x in v),
                fed,
                f"{secs[a]:.0f} ({np.mean([final[a][s]['gen_seconds'] for s in seeds]):.0f})",
                f"{secs[a] / secs['sft']:.2f}" if "sft" in secs else "",
            )
        )
    out.append(_table(t, markdown))
    if result.get("rates_from"):
        out.append(f"each arm at the rate it chose in {result['rates_from']} (no search at this width)")
    else:
        out.append(grid(rows, arms, markdown))
    p = [
        (
            f"{head} − arm",
            "mean",
            "95 % interval",
            "verdict",
            f"to arm's best: speed-up of {head} (seeds reaching)",
        )
    ]
    for a in arms:
        if a == head:
            continue
        m, lo, hi = interval([final[head][s]["test"] - final[a][s]["test"] for s in seeds])
        ratios = []
        for s in seeds:
            target = final[a][s]["best_val"]
            mine, theirs = time_to(final[head][s]["curve"], target), time_to(final[a][s]["curve"], target)
            if mine is not None and theirs:
                ratios.append(theirs / mine)
        speed = (
            f"{np.median(ratios):.2f}x ({len(ratios)}/{len(seeds)})" if ratios else f"never (0/{len(seeds)})"
        )
        p.append((a, f"{m:+.2f}", f"[{lo:+.2f}, {hi:+.2f}]", verdict(lo, hi, head, a), speed))
    out.append(_table(p, markdown))
    out.append(diagnosis(final, seeds, markdown))
    return "\n\n".join(out)


def grid(rows: list[dict], arms: list[str], markdown: bool = False) -> str:
    """The rate search: each arm's best validation ROUGE-L (dev split) at each rate of the first seed."""
    first = min(r["seed"] for r in rows)
    rates = sorted({r["lr"] for r in rows if r["seed"] == first})
    best = {(r["arm"], r["lr"]): r["best_val"] for r in rows if r["seed"] == first}
    t = [("dev ROUGE-L at rate", *(f"{g:g}" for g in rates))]
    for a in arms:
        t.append((a, *(f"{best[a, g]:.2f}" if (a, g) in best else "" for g in rates)))
    title = f"the rate search (training seed {first}; each arm keeps its best rate):\n"
    return title + ("\n" if markdown else "") + _table(t, markdown)


def diagnosis(final: dict, seeds: list[int], markdown: bool = False) -> str:
    """What each arm did, seed by seed: steps that sampled, replay staleness, gradient norms early and
    late, SGO length, and (the scheduler's arms) where φ rose against the validation CE it followed."""
    t = [
        (
            "arm",
            "steps sampling",
            "replay age (steps)",
            "grad norm: first / last third",
            "SGO tokens",
            "φ rises (step: val CE before → at), per seed",
        )
    ]
    for arm, runs in final.items():
        rs = [runs[s] for s in seeds]
        third = lambda r, part: np.mean([x[4] for x in r["steps"]][part])  # noqa: E731
        n = len(rs[0]["steps"]) // 3
        ages = [a for a in (staleness(r) for r in rs) if a is not None]
        lens = [x[5] for r in rs for x in r["steps"] if x[2] and x[5]]
        rises = []
        for r in rs:
            ce = {p[0]: p[3] for p in r["curve"]}
            before = {p[0]: q[3] for q, p in zip(r["curve"], r["curve"][1:], strict=False)}
            rises.append(", ".join(f"{at}: {before[at]:.2f} → {ce[at]:.2f}" for at, _ in r["phi_path"] or []))
        t.append(
            (
                arm,
                f"{np.mean([sum(x[2] for x in r['steps']) for r in rs]):.0f}",
                f"{np.mean(ages):.1f}" if ages else "",
                f"{np.mean([third(r, slice(0, n)) for r in rs]):.3f} / "
                f"{np.mean([third(r, slice(-n, None)) for r in rs]):.3f}",
                f"{np.mean(lens):.0f}" if lens else "",
                "; ".join(f"s{s}: {x or '—'}" for s, x in zip(seeds, rises, strict=True))
                if any(r["phi_path"] for r in rs)
                else "",
            )
        )
    return _table(t, markdown)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.render:
        with open(args.render) as f:
            print(tables(json.load(f)))
        return
    c, rows, lr, inits = base_config(args), [], dict(args.rates), {}

    def chosen(arm: str) -> float:  # the arm's rate: given, or the best on the dev split at the first seed
        if arm not in lr:
            lr[arm] = max((r for r in rows if r["arm"] == arm), key=lambda r: r["best_val"])["lr"]
        return lr[arm]

    first = args.seeds[0]
    plan = [(first, a, g) for a in args.arms if a not in lr for g in args.grid] + [
        (s, a, None) for s in args.seeds for a in args.arms if s != first or a in lr
    ]
    for k, (seed, arm, rate) in enumerate(plan):
        if seed not in inits:
            inits[seed] = init_for(c, seed, args.out)
        rate = chosen(arm) if rate is None else rate
        print(f"[{k + 1}/{len(plan)}] {arm} at lr {rate:g}, training seed {seed}", flush=True)
        rows.append(
            run_arm(inits[seed], arm, rate, os.path.join(args.out, f"seed{seed}", f"{arm}_lr{rate:g}"))
        )
    for arm in args.arms:
        chosen(arm)
    extra = {
        "lr": lr,
        "eval_seeds": list(c.eval.seeds),
        "config": "configs/demo.py:" + ("tiny,long" if args.quick else "long"),
        "width": int(c.student.config.d_model),
        "rates_from": args.rates_from or "",
    }
    print(machine_note())
    print(tables({**extra, "rows": rows}))
    write_rows(args.json, args, rows, **extra)


if __name__ == "__main__":
    main()
