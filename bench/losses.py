"""Plain vs chunked divergences: compiled scratch memory and forward+backward time.

Both forms start from the same final hidden states and output embeddings (as a train step does), take
the value and the gradient w.r.t. the student's hidden states and head, and differ only in whether the
full [B, T, V] logits of both models exist at once. Run from the repository root:

    python bench/losses.py                  # B=4, T=1024, V in {32000, 151936}, every divergence
    python bench/losses.py --quick          # tiny shapes, seconds: checks the script itself
    python bench/losses.py --batch 1 --seq 256 512 1024 2048 --vocab 32000 65536 151936 \
        --divergences srkl --plot scale.png  # how the cost grows with length and vocabulary

A configuration whose compiled scratch memory does not fit the device is reported without a time.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from common import free_memory_bytes, machine_note, median_seconds, temp_bytes, write_rows

from distillm_jax import losses

MIB = 2**20


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument(
        "--seq", type=int, nargs="+", default=[1024], help="sequence lengths (a grid with --vocab)"
    )
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    p.add_argument("--hidden", type=int, default=1024, help="student hidden size")
    p.add_argument("--teacher-hidden", type=int, default=2048)
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="dtype of hidden states and heads (loss math is float32 either way)",
    )
    p.add_argument("--chunk-size", type=int, default=128)
    p.add_argument("--divergences", nargs="+", default=list(losses.NAMES), choices=losses.NAMES)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-time", action="store_true", help="compiled memory only")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--quick", action="store_true", help="tiny shapes, for testing the script")
    p.add_argument("--table-from", metavar="JSON", help="print the table of a saved run and exit")
    p.add_argument("--plot", metavar="PNG", help="draw time and memory against length, per vocabulary")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.vocab, args.hidden, args.teacher_hidden = 2, [300], 16, 24
        args.seq = [40, 80] if args.plot else [40]
        args.chunk_size, args.repeats = 16, 1
    return args


def loss_fn(name: str, chunked: bool, chunk_size: int):
    """The loss of one form as a function of (student hidden, teacher hidden, heads, mask)."""
    if chunked:
        return lambda hs, ht, ws, wt, m: losses.chunked_divergence(
            name, hs, ht, ws, wt, m, chunk_size=chunk_size
        )

    def plain(hs, ht, ws, wt, m):
        s = jnp.einsum("btd,dv->btv", hs, ws, preferred_element_type=jnp.float32)
        t = jnp.einsum("btd,dv->btv", ht, wt, preferred_element_type=jnp.float32)
        return losses.divergence(name, s, t, m)

    return plain


def make_inputs(args: argparse.Namespace, vocab: int, t: int) -> tuple[jax.Array, ...]:
    dtype = jnp.dtype(args.dtype)
    k = jax.random.split(jax.random.key(0), 4)
    b, ds, dt = args.batch, args.hidden, args.teacher_hidden
    return (
        jax.random.normal(k[0], (b, t, ds), dtype),
        jax.random.normal(k[1], (b, t, dt), dtype),
        (jax.random.normal(k[2], (ds, vocab)) / ds**0.5).astype(dtype),
        (jax.random.normal(k[3], (dt, vocab)) * 2 / dt**0.5).astype(dtype),
        jnp.ones((b, t), jnp.int32).at[:, : t // 4].set(0),  # a prompt quarter that is masked out
    )


def measure(args: argparse.Namespace, vocab: int, name: str, chunked: bool, inputs) -> dict:
    step = jax.jit(jax.value_and_grad(loss_fn(name, chunked, args.chunk_size), argnums=(0, 2)))
    compiled = step.lower(*inputs).compile()
    row = {
        "seq": int(inputs[0].shape[1]),
        "vocab": vocab,
        "divergence": name,
        "form": "chunked" if chunked else "plain",
        "temp_mib": temp_bytes(compiled) / MIB,
        "ms": None,
        "value": None,
    }
    if args.no_time:
        return row
    if temp_bytes(compiled) > 0.8 * free_memory_bytes():
        row["note"] = "does not fit in device memory"
        return row
    row["ms"] = 1e3 * median_seconds(compiled, *inputs, repeats=args.repeats)
    row["value"] = float(compiled(*inputs)[0])  # plain and chunked must agree
    return row


def table(rows: list[dict]) -> str:
    """Markdown: one line per (vocab, divergence), plain and chunked side by side, with ratios
    (chunked / plain: below 1 means the chunked form needs less)."""
    out = [
        "| T | V | divergence | plain temp MiB | chunked temp MiB | memory ratio | plain ms | chunked ms "
        "| time ratio | value rel. diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(r.get("seq"), r["vocab"], r["divergence"], r["form"]): r for r in rows}
    for seq, vocab, name, form in by_key:
        if form != "plain" or (seq, vocab, name, "chunked") not in by_key:
            continue
        p, c = by_key[seq, vocab, name, "plain"], by_key[seq, vocab, name, "chunked"]
        ms = lambda r: "—" if r["ms"] is None else f"{r['ms']:.1f}"  # noqa: E731
        t_ratio = "—" if None in (p["ms"], c["ms"]) else f"{c['ms'] / p['ms']:.2f}×"
        diff = (
            "—"
            if None in (p["value"], c["value"])
            else f"{abs(c['value'] - p['value']) / max(abs(p['value']), 1e-30):.1e}"
        )
        out.append(
            f"| {seq or '—'} | {vocab} | {name} | {p['temp_mib']:.1f} | {c['temp_mib']:.1f} "
            f"| {c['temp_mib'] / p['temp_mib']:.3f} | {ms(p)} | {ms(c)} | {t_ratio} | {diff} |"
        )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.table_from:
        with open(args.table_from) as f:
            saved = json.load(f)
        print(f"# {saved['machine']}\n{table(saved['rows'])}")
        return saved["rows"]
    print(f"# {machine_note()}", flush=True)
    print(
        f"# B={args.batch} T={'/'.join(map(str, args.seq))} "
        f"hidden student/teacher={args.hidden}/{args.teacher_hidden} dtype={args.dtype} "
        f"chunk_size={args.chunk_size}; value+grad w.r.t. student hidden and head",
        flush=True,
    )
    rows = []
    for seq in args.seq:
        for vocab in args.vocab:
            inputs = make_inputs(args, vocab, seq)
            for name in args.divergences:
                for chunked in (False, True):
                    rows.append(measure(args, vocab, name, chunked, inputs))
                    print(json.dumps(rows[-1]), flush=True)
            del inputs
    print(table(rows))
    write_rows(args.json, args, rows)
    if args.plot:
        plot(rows, args.plot)
    return rows


def plot(rows: list[dict], path: str) -> None:
    """Time and compiled scratch memory against sequence length, one line per vocabulary and form
    (plain solid, chunked dashed), for the first divergence measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = rows[0]["divergence"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, vocab in enumerate(sorted({r["vocab"] for r in rows})):
        for form, style in (("plain", "-"), ("chunked", "--")):
            mine = sorted(
                (r for r in rows if (r["vocab"], r["divergence"], r["form"]) == (vocab, name, form)),
                key=lambda r: r["seq"],
            )
            seqs = [r["seq"] for r in mine]
            label = f"V={vocab} {form}"
            axes[0].plot(
                seqs, [r["ms"] or float("nan") for r in mine], style, color=f"C{i}", marker="o", label=label
            )
            axes[1].plot(seqs, [r["temp_mib"] for r in mine], style, color=f"C{i}", marker="o", label=label)
    for ax, what in zip(axes, ("ms per value + gradient", "compiled scratch MiB"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{name}: plain vs chunked loss as length and vocabulary grow")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1:])
