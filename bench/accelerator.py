"""One distillation train step on one accelerator, at the paper's GPT-2 scale: a GPT-2-XL-shaped teacher
(1.56B, bfloat16) and a GPT-2-shaped student (124M, bfloat16 compute on float32 master weights, as the
trainer keeps them), SRKL, AdamW, batch 8 x 512, random weights and ids. Reports the step time,
tokens/s, FLOP/s by formula (teacher forward 2·N·tokens, student forward and backward 6·N·tokens) and
by XLA's count, the model FLOP utilisation against this device's bfloat16 matmul peak measured in the
same run (and against the vendor's nominal dense peak where known), and peak device memory.

Made to run as one short script when a GPU is lent (a few minutes with the compile):

    JAX_PLATFORMS=cuda python bench/accelerator.py --json bench/results/accelerator_h200.json
    python bench/accelerator.py --quick      # tiny shapes on any device, seconds (the tests run this)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np
from common import machine_note, matmul_peak_flop_s, write_rows
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import ConfigDict
from train_step import step_flops

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/
from configs import base
from distillm_jax import losses, sharding, step, trainer

NOMINAL_BF16_FLOP_S = {  # vendor dense bfloat16 peaks (no sparsity), for the second MFU column
    "NVIDIA H200": 989e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (the first compiles)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument(
        "--chunk-size",
        type=int,
        default=-1,
        help="loss.chunk_size (-1: what a run's default config chooses, losses.auto_chunk_size; 0: plain)",
    )
    p.add_argument("--quick", action="store_true", help="tiny shapes, for testing the script")
    p.add_argument("--json", help="also write the row to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.steps = 2, 32, 2
    return args


def gpt2(width: int, layers: int, heads: int, vocab: int, positions: int) -> ConfigDict:
    return ConfigDict(
        {"model_type": "gpt2", "vocab_size": vocab, "n_embd": width, "n_layer": layers, "n_head": heads}
        | {"n_positions": positions},
        type_safe=False,
    )


def model_configs(quick: bool) -> tuple[ConfigDict, ConfigDict]:
    """(teacher, student): GPT-2 XL and GPT-2 small, or tiny GPT-2s."""
    if quick:
        return gpt2(64, 2, 4, 512, 128), gpt2(32, 2, 2, 512, 128)
    return gpt2(1600, 48, 25, 50257, 1024), gpt2(768, 12, 12, 50257, 1024)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    dev = jax.devices()[0]
    print(f"# {machine_note()}", flush=True)
    mesh = sharding.make_mesh(**base.get_config().mesh)
    t_cfg, s_cfg = model_configs(args.quick)
    teacher_spec, student_spec = base.model_spec(dtype=args.dtype), base.model_spec(dtype=args.dtype)
    teacher_spec.config, student_spec.config, student_spec.seed = t_cfg, s_cfg, 1
    teacher = trainer.build_model(teacher_spec, mesh, trainable=False)
    student = trainer.build_model(student_spec, mesh, trainable=True)
    tx = step.make_optimizer(1e-4, total_steps=1000)
    if args.chunk_size < 0:  # the form a run gets with no speed flag
        args.chunk_size = losses.auto_chunk_size(s_cfg.vocab_size, args.dtype, jax.default_backend())
    loss = step.LossConfig(divergence="srkl", params=(("alpha", 0.1),), chunk_size=args.chunk_size)
    train_step, params, opt_state = step.make_train_step(student, teacher, tx, loss)
    teacher_state = nnx.state(teacher)

    ids = np.random.default_rng(0).integers(0, t_cfg.vocab_size, (args.batch, args.seq)).astype(np.int32)
    loss_mask = np.zeros_like(ids)
    loss_mask[:, args.seq // 2 : -1] = 1
    host = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "labels": np.concatenate([ids[:, 1:], np.zeros_like(ids[:, :1])], axis=1),
        "loss_mask": loss_mask,
    }
    _, shards = sharding.data_shards(mesh)
    rows = sharding.batch_sharding if args.batch % shards == 0 else None  # else replicated (tiny runs)
    batch = {
        k: jax.device_put(v, rows(mesh, v.ndim) if rows else NamedSharding(mesh, PartitionSpec()))
        for k, v in host.items()
    }

    compiled = train_step.lower(params, opt_state, teacher_state, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    xla_flops = float((cost or {}).get("flops", 0.0)) or None
    mem = compiled.memory_analysis()
    compiled_bytes = int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes)

    times, step_losses = [], []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        params, opt_state, metrics = train_step(params, opt_state, teacher_state, batch)
        step_losses.append(float(metrics["loss"]))  # waits for the step
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    teacher_s = _teacher_forward_s(teacher, teacher_state, batch, args.steps)
    tokens = args.batch * args.seq
    n_t, t_fwd = step_flops(_hf_like(t_cfg), tokens)
    n_s, s_fwd = step_flops(_hf_like(s_cfg), tokens)
    flops = t_fwd + 3 * s_fwd
    peak = matmul_peak_flop_s(args.dtype, 2048 if dev.platform == "cpu" else 8192)
    nominal = NOMINAL_BF16_FLOP_S.get(dev.device_kind) if args.dtype == "bfloat16" else None
    stats = dev.memory_stats() or {}
    row = {
        "device": dev.device_kind if dev.platform != "cpu" else "cpu",
        "teacher_flop_params_m": n_t / 1e6,
        "student_flop_params_m": n_s / 1e6,
        "batch": args.batch,
        "seq": args.seq,
        "dtype": args.dtype,
        "chunk_size": args.chunk_size,
        "step_s": step_s,
        "times_s": times,
        "losses": step_losses,
        "tok_s": tokens / step_s,
        "flops_per_step": flops,
        "xla_flops_per_step": xla_flops,
        "flop_s": flops / step_s,
        "matmul_peak_flop_s": peak,
        "mfu": flops / step_s / peak,
        "teacher_forward_s": teacher_s,  # where the step's time goes: the teacher's share ...
        "teacher_mfu": t_fwd / teacher_s / peak,
        "student_mfu": 3 * s_fwd / max(step_s - teacher_s, 1e-9) / peak,  # ... and the rest's
        "nominal_peak_flop_s": nominal,
        "mfu_nominal": flops / step_s / nominal if nominal else None,
        "peak_memory_bytes": stats.get("peak_bytes_in_use"),
        "compiled_bytes": compiled_bytes,
        "compiles": train_step._cache_size(),
    }
    print(table([row]))
    write_rows(args.json, args, [row])
    return [row]


def _teacher_forward_s(teacher, teacher_state, batch: dict, steps: int) -> float:
    """Median seconds of the teacher's forward (to its logits, as the step runs it) alone: the step's
    time minus this is the student's forward, backward, loss and update, so an MFU below target says
    which side holds the rest."""
    graphdef = nnx.graphdef(teacher)

    @jax.jit
    def forward(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, mask).sum()

    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        jax.block_until_ready(forward(teacher_state, batch["input_ids"], batch["attention_mask"]))
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _hf_like(c: ConfigDict):
    """The attributes ``train_step.step_flops`` reads from an HF GPT-2 config."""
    return argparse.Namespace(n_embd=c.n_embd, n_layer=c.n_layer, n_inner=None, vocab_size=c.vocab_size)


def table(rows: list[dict]) -> str:
    out = [
        "| device | teacher / student (non-emb. + head) | dtype | batch x seq | step ms | tokens/s "
        "| TFLOP/s | MFU (measured matmul peak) | MFU (nominal peak) | teacher fwd ms (its MFU) "
        "| rest of the step: student MFU | loss form | peak memory GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        nominal = f"{r['mfu_nominal']:.0%}" if r["mfu_nominal"] else "—"
        mem = r["peak_memory_bytes"] or r["compiled_bytes"]
        mem_note = "" if r["peak_memory_bytes"] else " (compiled)"
        out.append(
            f"| {r['device']} | {r['teacher_flop_params_m']:.0f}M / {r['student_flop_params_m']:.0f}M "
            f"| {r['dtype']} | {r['batch']} x {r['seq']} | {1e3 * r['step_s']:.1f} | {r['tok_s']:.0f} "
            f"| {r['flop_s'] / 1e12:.2f} | {r['mfu']:.0%} of {r['matmul_peak_flop_s'] / 1e12:.1f} "
            f"| {nominal} | {_breakdown(r)} | {_form(r)} | {mem / 2**30:.2f}{mem_note} |"
        )
    return "\n".join(out)


def _breakdown(r: dict) -> str:
    if "teacher_forward_s" not in r:
        return "— | —"  # recorded before the breakdown was added
    return f"{1e3 * r['teacher_forward_s']:.1f} ({r['teacher_mfu']:.0%}) | {r['student_mfu']:.0%}"


def _form(r: dict) -> str:
    return f"chunked, {r['chunk_size']}" if r.get("chunk_size") else "plain"


if __name__ == "__main__":
    main(sys.argv[1:])
