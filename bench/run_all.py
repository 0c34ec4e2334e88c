"""Run every benchmark of ``bench/`` on this machine and write ``BENCHMARKS.md`` from the results.

Each benchmark runs in its own process and writes ``bench/results/<name>_<machine><variant>.json`` (and
its plot, if it draws one); ``BENCHMARKS.md`` is then rendered from every results file there, this
machine's and those recorded on others (an accelerator run copies its files in), each with its
machine, date and versions, every figure a ratio against a peer measured in the same run. Hand-written
findings (profiles, what a shortfall comes from) live in ``bench/notes/<name>.md`` and are included
under their benchmark, marked as such. Run from the repository root, with the peers installed
(``pip install -r bench/requirements.txt``):

    python bench/run_all.py                    # everything this machine runs (2-core CPU: ~80 minutes)
    python bench/run_all.py --only train_step  # some benchmarks, then render all results
    python bench/run_all.py --render           # no runs: render BENCHMARKS.md from bench/results/
    python bench/run_all.py --quick --results /tmp/r --out /tmp/B.md   # tiny shapes: checks the script
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import glob
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT]  # the benchmark scripts and configs/ (run from anywhere)


@dataclasses.dataclass(frozen=True)
class Bench:
    name: str
    script: str
    title: str
    cpu: tuple = ()  # runs on a CPU host: (variant suffix, arguments)
    accelerator: tuple = ()  # runs on a GPU / TPU
    quick: tuple = (("", ("--quick",)),)  # what --quick runs (any machine)
    plot: bool = False  # the script takes --plot PNG
    target: str = ""  # the target, quoted above the tables
    need: float = 0.0  # the headline ratio the target asks for (0: judged otherwise, or not at all)


GRID = ("--batch", "1", "--seq", "256", "512", "1024", "2048", "--vocab", "32000", "65536", "151936")
GRID += ("--divergences", "srkl")

BENCHES = (
    Bench(
        "losses",
        "losses.py",
        "Divergences: plain vs chunked",
        cpu=(
            ("_v32000", ("--vocab", "32000", "--repeats", "2")),
            ("_v151936_memory", ("--vocab", "151936", "--no-time")),
            ("_v151936_timed", ("--vocab", "151936", "--divergences", "fkl", "srkl", "--repeats", "1")),
        ),
        accelerator=(
            ("_bf16", ("--dtype", "bfloat16", "--repeats", "5")),
            ("_f32", ("--dtype", "float32", "--repeats", "5")),
        ),
        quick=(("", ("--quick", "--divergences", "srkl", "jsd")),),
        target="at V = 151936 the chunked form needs under a quarter of the plain form's memory at no more "
        "than 1.5× its time (issue 2)",
    ),
    Bench(
        "scale",
        "losses.py",
        "Scale: the loss's cost as sequence length and vocabulary grow, plain vs chunked",
        cpu=(("", (*GRID, "--hidden", "512", "--teacher-hidden", "1024", "--repeats", "1")),),
        accelerator=(("_bf16", (*GRID, "--dtype", "bfloat16", "--repeats", "3")),),
        quick=(("", ("--quick", "--divergences", "srkl")),),
        plot=True,
        target="a curve, not a target (issue 21): value + gradient of SRKL from hidden states, batch 1",
    ),
    Bench(
        "forward",
        "forward.py",
        "Model forward: ours vs transformers PyTorch",
        cpu=(("", ("--repeats", "5")),),
        accelerator=(("", ("--repeats", "3")),),
        target="at least parity with transformers on CPU (issue 3)",
        need=1.0,
    ),
    Bench(
        "generate",
        "generate.py",
        "Generation: ours vs transformers `generate`",
        cpu=(("", ()),),
        accelerator=(("", ("--repeats", "1")),),
        target="at least 3× transformers `generate` tokens/s (issues 4 and 8)",
        need=3.0,
    ),
    Bench(
        "train_step",
        "train_step.py",
        "Distillation train step: ours vs TRL GKDTrainer and a transformers + torch loop",
        cpu=(("", ("--repeats", "3")), ("_plain", ("--repeats", "3", "--chunk-size", "0"))),
        target="at least 2× TRL GKDTrainer's tokens/s with the defaults (no speed flag; issue 21)",
        need=2.0,
    ),
    Bench(
        "speedup",
        "speedup.py",
        "Student-generated outputs end to end: DistiLLM vs GKD (ours and TRL's) and the SGO baselines",
        cpu=(("", ()), ("_gpt2", ("--family", "gpt2"))),
        accelerator=(("", ()), ("_gpt2", ("--family", "gpt2"))),
        quick=(("_gpt2", ("--quick", "--family", "gpt2", "--arms", "distillm", "trl_gkd_positions")),),
        plot=True,
        target="DistiLLM, with its scheduler engaged (SGO and replay steps), reaches on-policy GKD's best "
        "ROUGE-L at least 3× sooner (issue 17; the paper: 2.5–4.3× against the SGO baselines)",
        need=3.0,
    ),
    Bench(
        "evidence",
        "evidence.py",
        "Does DistiLLM pay off here?",
        cpu=(("", ()),),
        quick=(("", ("--quick", "--arms", "sft", "distillm", "--grid", "3e-3")),),
        target="an ordering is written only where the 95 % interval of the paired difference over training "
        "seeds excludes 0 (issue 32)",
    ),
    Bench(
        "compiled",
        "compiled.py",
        "Compiled for TPU: every stage of the six paper configs, from a CPU host",
        cpu=(("", ()),),
        quick=(),  # libtpu compiles; tests/test_compiled.py checks the planner it drives
        target="every stage of every paper config fits a slice we suggest; the compiler's figures beside the "
        "planner's (issue 35)",
    ),
    Bench(
        "accelerator",
        "accelerator.py",
        "One accelerator: GPT-2 XL → GPT-2 train step, bfloat16",
        accelerator=(("", ()),),
        target="none set: step time, tokens/s, MFU and peak memory, the figures to hold later changes to",
    ),
)


def machine_tag() -> str:
    """``cpu``, or the accelerator's short name (``h200``, ``v4``): the results files' middle part."""
    import jax

    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "", dev.device_kind.lower().split()[-1]) or dev.platform


def run(bench: Bench, runs: Sequence, results: str, tag: str, log, run_dirs: str) -> None:
    """Each of ``runs`` of ``bench`` in its own process; its JSON (and plot) into ``results``, training
    runs (speedup) into ``run_dirs``."""
    for variant, extra in runs:
        stem = os.path.join(results, f"{bench.name}_{tag}{variant}")
        cmd = [sys.executable, os.path.join(HERE, bench.script), *extra, "--json", stem + ".json"]
        if bench.plot:
            cmd += ["--plot", stem + ".png"]
        if bench.name in ("speedup", "evidence"):
            cmd += ["--out", os.path.join(run_dirs, f"bench_{os.path.basename(stem)}")]
        shown = " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd)
        print(f"== {shown}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
        print(proc.stdout[-3000:], flush=True)
        if proc.returncode:
            raise SystemExit(
                f"error: {bench.script} {' '.join(extra)} failed (exit {proc.returncode}); see {log.name}"
            )
        print(f"== {bench.name}{variant}: {time.perf_counter() - start:.0f} s", flush=True)


# --------------------------------------------------------------------------------------------------
# rendering


def _tables() -> dict[str, Callable[[dict], str]]:
    """Each benchmark's markdown table of one results file (imported here: the scripts import jax)."""
    import accelerator
    import compiled
    import evidence
    import forward
    import generate
    import losses
    import speedup
    import train_step

    return {
        "losses": lambda r: losses.table(r["rows"]),
        "scale": lambda r: losses.table(r["rows"]),
        "forward": lambda r: forward.table(r["rows"], r["args"]),
        "generate": lambda r: generate.table(r["rows"], r["args"]),
        "train_step": _train_step_table(train_step),
        "speedup": lambda r: speedup.table(
            r["rows"], r["target"], r["args"].get("target") or "gkd", r["args"].get("draws", 1)
        ),
        "evidence": lambda r: evidence.tables(r, markdown=True),
        "accelerator": lambda r: accelerator.table(r["rows"]),
        "compiled": lambda r: compiled.table(r["rows"]),
    }


def _train_step_table(module) -> Callable[[dict], str]:
    def render(result: dict) -> str:
        if "pairs" not in result["rows"][0]:  # recorded before the TRL peer: one transformers pair
            return "(recorded before the TRL peer was added; re-run `--only train_step`)"
        return module.table(result["rows"])

    return render


def _ratios(result: dict, bench: str) -> list[float]:
    """The headline ratios of one results file (ours over the peer; for losses, chunked memory)."""
    rows = result["rows"]
    if bench in ("forward", "generate"):
        return [r["ratio"] for r in rows]
    if bench == "train_step":
        return [p["ratio"] for r in rows for p in r.get("pairs", []) if p["peer"] == "trl"]
    if bench == "speedup":
        target = result["target"]
        ref = result["args"].get("target") or "gkd"
        from speedup import time_to  # the one definition of "reached the target"

        ref_t = next((time_to(r["curve"], target) for r in rows if r["arm"] == ref), None)
        # the claim is DistiLLM's (paper and overlap mode), not DistiLLM-2's or a LoRA student's, and only
        # with its scheduler engaged: a run that never left ground truth is SRKL KD, not DistiLLM
        engaged = lambda r: r["sources"]["sgo"] > 0 and r["sources"]["replay"] > 0  # noqa: E731
        mine = [r for r in rows if r["arm"] in ("distillm", "distillm_overlap") and engaged(r)]
        ours = [time_to(r["curve"], target) for r in mine]
        return [ref_t / t for t in ours if t] if ref_t else []
    return []


def _span(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.2f}×" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}–{hi:.2f}×"


def verdict(bench: Bench, results: list[tuple[str, dict]]) -> str:
    """One line per results file that the target applies to: the measured range against it (runs of
    non-default settings, such as other chunk sizes, are shown but not judged)."""
    lines = []
    for name, result in results:
        machine = result["machine"].split(",")[0]
        if result.get("args", {}).get("chunk_size", 128) != 128 and bench.name == "losses":
            continue
        if bench.name == "losses":
            rows = result["rows"]
            by = {(r["vocab"], r["divergence"], r["form"]): r for r in rows if r["vocab"] >= 100_000}
            mem = [by[k]["temp_mib"] / by[(*k[:2], "plain")]["temp_mib"] for k in by if k[2] == "chunked"]
            tim = [
                by[k]["ms"] / by[(*k[:2], "plain")]["ms"]
                for k in by
                if k[2] == "chunked" and by[k]["ms"] and by[(*k[:2], "plain")]["ms"]
            ]
            if mem:
                ok = max(mem) < 0.25 and (not tim or max(tim) <= 1.5)
                t = f", time {_span(tim)}" if tim else " (not timed)"
                lines.append(f"- {name}: memory {_span(mem)}{t}: **{'met' if ok else 'not met'}**")
            continue
        ratios = _ratios(result, bench.name)
        if bench.name == "speedup" and not ratios:  # never reached, or the scheduler never engaged
            lines.append(f"- {name} ({machine}): {_speedup_shortfall(result)}: **not met**")
            continue
        if not ratios or not bench.need:
            continue
        need = bench.need
        ok = "met" if min(ratios) >= need * 0.995 else "not met"
        lines.append(f"- {name} ({machine}): {_span(ratios)}: **{ok}**")
    return "\n".join(lines)


def _speedup_shortfall(result: dict) -> str:
    """Why a speed-up run has no ratio: which DistiLLM arm never left ground truth or never reached."""
    parts = []
    for r in result["rows"]:
        if r["arm"] not in ("distillm", "distillm_overlap"):
            continue
        src = r["sources"]
        engaged = src["sgo"] > 0 and src["replay"] > 0
        parts.append(f"{r['arm']} {'never reached the target' if engaged else 'never turned to SGOs'}")
    return "; ".join(parts) or "no DistiLLM arm"


def _description(script: str) -> str:
    """A benchmark script's docstring up to its usage lines: what it measures, as markdown."""
    with open(os.path.join(HERE, script)) as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    kept = []
    for para in doc.split("\n\n"):
        if para.startswith("    "):  # the usage commands
            break
        items = para.split("\n- ")  # a list keeps one item per line; other line breaks are spaces
        para = "\n- ".join(" ".join(item.split()) for item in items)
        for usage in ("Run from the repository root", "Made to run as one short script"):
            para = para.split(usage)[0].strip()
        if para:
            kept.append(para.replace("``", "`"))
    return "\n\n".join(kept)


def _command(bench: Bench, result: dict) -> str:
    """The command line that reproduces a results file (its non-default arguments)."""
    args = result.get("args", {})
    parts = [f"python bench/{bench.script}"]
    for key, value in args.items():
        if key in ("json", "plot", "out", "table_from", "render") or value in (None, False, [], ""):
            continue
        if isinstance(value, dict):  # derived from another argument (evidence's rates, from --rates-from)
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif isinstance(value, list):
            parts.append(f"{flag} {' '.join(map(str, value))}")
        else:
            parts.append(f"{flag} {value}")
    return " ".join(parts)


def render(results_dir: str, tag: str) -> str:
    tables = _tables()
    out = [
        "# Benchmarks",
        "",
        f"Generated by `python bench/run_all.py` on {time.strftime('%Y-%m-%d')} from `bench/results/*.json`; "
        "do not edit by hand (findings written by hand live in `bench/notes/`). Every figure is measured "
        "side by side with its peer in the same run on the machine named above its table: quote the "
        "ratios, not the absolute times. Machines: `cpu` is a 2-core x86_64 VM unless its line says "
        "otherwise; accelerator results come from runs of `bench/device_check.sh` on a lent GPU.",
        "",
    ]
    for bench in BENCHES:
        files = sorted(glob.glob(os.path.join(results_dir, f"{bench.name}_*.json")))
        files.sort(key=lambda f: not os.path.basename(f).startswith(f"{bench.name}_{tag}"))
        results = []
        for path in files:
            with open(path) as f:
                results.append((os.path.basename(path)[:-5], json.load(f)))
        out += [f"## {bench.title} (`bench/{bench.script}`)", "", _description(bench.script), ""]
        if bench.target:
            out += [f"**Target:** {bench.target}.", ""]
        summary = verdict(bench, results)
        if summary:
            out += [summary, ""]
        if not results:
            out += ["No results recorded yet.", ""]
        for name, result in results:
            when = result.get("date", "date not recorded")
            versions = ", ".join(f"{k} {v}" for k, v in result.get("versions", {}).items())
            out += [
                f"### `{name}` — {result['machine']}; {when}" + (f"; {versions}" if versions else ""),
                "",
                f"`{_command(bench, result)}`",
                "",
                tables[bench.name](result),
                "",
            ]
            png = os.path.join(results_dir, name + ".png")
            if os.path.exists(png):
                out += [f"![{name}]({os.path.relpath(png, ROOT)})", ""]
        notes = os.path.join(HERE, "notes", bench.name + ".md")
        if os.path.exists(notes):
            with open(notes) as f:
                out += ["### Findings (written by hand; each names the runs it comes from)", ""]
                out += [f.read().strip(), ""]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", nargs="+", choices=[b.name for b in BENCHES], help="run just these")
    p.add_argument("--render", action="store_true", help="no runs: render from the results only")
    p.add_argument("--quick", action="store_true", help="tiny shapes (into --results), for tests")
    p.add_argument("--results", default=os.path.join(HERE, "results"), help="results folder")
    p.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    p.add_argument("--log", default=os.path.join(ROOT, "runs", "bench_run_all.log"), help="their stderr")
    args = p.parse_args(argv)
    tag = machine_tag()
    os.makedirs(args.results, exist_ok=True)
    if not args.render:
        os.makedirs(os.path.dirname(args.log), exist_ok=True)
        with open(args.log, "a") as log:
            for bench in BENCHES:
                if args.only and bench.name not in args.only:
                    continue
                runs = bench.quick if args.quick else bench.cpu if tag == "cpu" else bench.accelerator
                run_dirs = os.path.join(args.results, "runs") if args.quick else os.path.join(ROOT, "runs")
                run(bench, runs, args.results, tag, log, run_dirs)
    with open(args.out, "w") as f:
        f.write(render(args.results, tag))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
