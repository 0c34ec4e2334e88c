"""The six paper configs compiled for a TPU slice each, from this CPU host (``config/compiled.py``): per
stage the compiler's GiB per device beside the planner's, compile seconds with the layer loop and with
the scanned stack, FLOPs against the model formula, the train step's roofline time and the tokens/s it
bounds, and each stage's hours on that slice as a lower bound (its optimizer updates × micro-batches ×
the train step's roofline). Needs libtpu (requirements-dev.txt).

``python bench/compiled.py [--configs gpt2_dolly,...] [--loop] [--json OUT]``: one JSON line per
(config, stage, setting) appended to ``bench/results/compiled_tpu.jsonl`` as it goes (a killed run keeps
what it finished; a line already there is not measured again), then every line into ``--json``
(``bench/run_all.py`` renders it). ``--loop`` also compiles each stage without the scan (slow: the
"before" column). About an hour on 2 cores."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]

import common  # noqa: E402
import jax  # noqa: E402

from distillm_jax import pipeline  # noqa: E402
from distillm_jax.config import compiled, planner  # noqa: E402

OUT = ROOT / "bench" / "results" / "compiled_tpu.jsonl"
# A slice each: the smallest common v5e slice on which every stage fits (with rematerialisation where
# the table says so).
SLICES = {
    "gpt2_dolly": "v5e:2x2",
    "opt_dolly": "v5e:2x4",
    "t5_samsum": "v5e:2x4",
    "mt5_iwslt": "v5e:2x4",
    "openllama_dolly": "v5e:4x4",
    "qwen_dolly": "v5e:4x4",
}
# Training rows of each task, for the hours bound: the paper's Dolly split (14,000 rows after its 500
# validation and 500 test), SAMSum's 14,732, IWSLT 2017 en-de's 206,112 pairs.
ROWS = {"dolly": 14000, "samsum": 14732, "iwslt2017": 206112}


def epochs(stage) -> int:
    c = stage.config
    return int(c.optim.epochs)


def measure(name: str, stage, topology: str, scan: bool, remat: str) -> dict:
    c = stage.config
    for role in ("teacher", "student"):
        c[role].scan_layers, c[role].remat = scan, remat
    start = time.perf_counter()
    plan = compiled.plan_stage(c, topology)
    train = plan.programs[0]
    updates = epochs(stage) * math.ceil(ROWS[c.data.task] / c.optim.batch_size)
    step_s = plan.step_seconds if train.arguments else float("nan")
    return {
        "config": name,
        "stage": stage.name,
        "method": c.method,
        "topology": topology,
        "scan": scan,
        "remat": remat,
        "fits": plan.fits,
        "peak_gib": plan.peak / compiled.GIB,
        "resident_gib": plan.resident / compiled.GIB,
        "planner_gib": planner.plan(c, plan.devices)["total"] / compiled.GIB,
        "hbm_gib": plan.chip.hbm / compiled.GIB,
        "train_tflop": train.flops / 1e12,
        "formula_tflop": plan.formula_flops / 1e12,
        "train_roofline_ms": step_s * 1e3,
        "train_traffic_gb": train.traffic / 1e9,
        "tokens_per_s_bound": plan.tokens / step_s if step_s else 0.0,
        "updates": updates,
        "grad_accum": int(c.optim.grad_accum),
        "hours_bound": updates * int(c.optim.grad_accum) * step_s / 3600,
        "compile_s": {p.name: p.seconds for p in plan.programs},
        "instructions": {p.name: p.instructions for p in plan.programs},
        "peaks_gib": {p.name: p.peak(plan.resident) / compiled.GIB for p in plan.programs},
        "wall_s": time.perf_counter() - start,
        "libtpu": importlib.metadata.version("libtpu"),
        "jax": jax.__version__,
        "host_cores": os.cpu_count(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=",".join(SLICES))
    ap.add_argument("--loop", action="store_true", help="also compile without the scan (the slow 'before')")
    ap.add_argument("--loop-only", action="store_true", help="only the compiles without the scan")
    ap.add_argument("--remat", default="none", help="the scanned stacks' first remat setting (none | full)")
    ap.add_argument("--table", action="store_true", help="print the results as BENCHMARKS.md's table")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "compiled_cpu.json"))
    args = ap.parse_args()
    if args.table:
        return print(table([json.loads(line) for line in OUT.read_text().splitlines()]))
    done = set()
    if OUT.exists():
        for line in OUT.read_text().splitlines():
            r = json.loads(line)
            done.add((r["config"], r["stage"], r["scan"], r["remat"]))
    from distillm_jax import config as cfglib

    for name in args.configs.split(","):
        topology = SLICES[name]
        for stage in pipeline.stages(cfglib.load_file(str(ROOT / "configs" / f"{name}.py")), planning=True):
            settings = [] if args.loop_only else [(True, args.remat)]
            settings += [(False, "none")] if args.loop or args.loop_only else []
            for scan, remat in settings:
                if (name, stage.name, scan, remat) in done:
                    continue
                r = measure(name, stage, topology, scan, remat)
                if not r["fits"] and scan and remat == "none":  # the change that makes it fit, compiled
                    settings.append((True, "full"))
                with OUT.open("a") as f:
                    f.write(json.dumps(r) + "\n")
                print(
                    f"{name} {stage.name} scan={scan} remat={remat}: peak {r['peak_gib']:.2f} GiB "
                    f"(planner {r['planner_gib']:.2f}) fits={r['fits']} "
                    f"compile {sum(r['compile_s'].values()):.0f} s",
                    flush=True,
                )
    rows = {}  # the last measurement of each (config, stage, setting), in the order first measured
    for line in OUT.read_text().splitlines():
        r = json.loads(line)
        rows[r["config"], r["stage"], r["scan"], r["remat"]] = r
    stages = ("teacher", "student_sft", "distill")
    order = sorted(
        rows.values(),
        key=lambda r: (
            list(SLICES).index(r["config"]),
            stages.index(r["stage"]),
            r["scan"],
            r["remat"] != "none",
        ),
    )
    # The file holds every run's rows: it is reproduced by the default command (each stage scanned, then
    # with remat=full where that does not fit), plus --loop for the loop's rows.
    record = argparse.Namespace(loop=any(not r["scan"] for r in order))
    common.write_rows(args.json, record, order, slices=SLICES)


def table(rows: list[dict]) -> str:
    """One row per (config, stage, setting), in the order measured."""
    out = [
        "| config (slice) | stage | layers | peak GiB / HBM (compiler) | planner GiB | compile s: train / "
        "eval / samplers | instructions (train step) | train TFLOP: compiler / formula | roofline ms | "
        "tokens/s ≤ | stage hours ≥ |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        # The roofline as config/compiled.py's StagePlan.step_seconds takes it (the larger of the
        # compiler's and the formula's FLOPs): rows recorded before it took the compiler's alone.
        peak = compiled.chip(r["topology"]).flops
        step_ms = max(r["train_roofline_ms"], max(r["train_tflop"], r["formula_tflop"]) * 1e15 / peak)
        scale = step_ms / r["train_roofline_ms"] if r["train_roofline_ms"] else 1.0
        r = {**r, "train_roofline_ms": step_ms, "tokens_per_s_bound": r["tokens_per_s_bound"] / scale}
        r["hours_bound"] = r["hours_bound"] * scale
        c = r["compile_s"]
        samplers = sum(v for k, v in c.items() if "sampler" in k)
        layers = ("scan" if r["scan"] else "loop") + (
            "" if r["remat"] == "none" else f" + remat {r['remat']}"
        )
        fits = "" if r["fits"] else " **does not fit**"
        refused = r["train_tflop"] == 0
        out.append(
            f"| {r['config']} ({r['topology']}) | {r['stage']} ({r['method']}) | {layers} | "
            f"{r['peak_gib']:.2f} / {r['hbm_gib']:.2f}{fits} | {r['planner_gib']:.2f} | "
            f"{c.get('train step', 0):.0f} / {c.get('eval step', 0):.0f} / {samplers:.0f} | "
            f"{r['instructions'].get('train step', 0):,} | "
            + ("refused (HBM) | – | – | – |" if refused else (
                f"{r['train_tflop']:.1f} / {r['formula_tflop']:.1f} | {r['train_roofline_ms']:.0f} | "
                f"{r['tokens_per_s_bound']:,.0f} | {r['hours_bound']:.2f} |"
            ))
        )  # fmt: skip
    return "\n".join(out)


if __name__ == "__main__":
    main()
