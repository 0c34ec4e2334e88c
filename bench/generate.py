"""Generated tokens/s of our sampler against transformers' ``generate`` (sampling, same weights, same
machine, same run), for ~50M-parameter GPT-2- and T5-shaped models. EOS is disabled on both sides so
every row generates exactly ``--new`` tokens; compile time is reported apart from the timed runs.
Run from the repository root (needs torch):

    python bench/generate.py              # batch 8 and 32, prompt 256, 256 new tokens
    python bench/generate.py --quick      # tiny shapes, seconds: checks the script itself
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np
from common import machine_note, stream_bytes_per_s, torch_and_ours, write_rows

from distillm_jax.generate import generate

T5_IDS = {"decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}


def hf_configs(quick: bool) -> dict:
    import transformers

    if quick:
        return {
            "gpt2": transformers.GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=128),
            "t5": transformers.T5Config(
                vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4
            ),
        }
    return {  # ~51M and ~60M parameters
        "gpt2": transformers.GPT2Config(vocab_size=50257, n_embd=512, n_layer=8, n_head=8, n_positions=1024),
        "t5": transformers.T5Config(
            vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8
        ),
    }


def decode_bytes(model, batch: int, prompt: int, new: int) -> int:
    """Bytes the decode loop must read at the least to generate ``new`` tokens a row: at every step the
    decoder's weights with the head (not the encoder's, not the cross-attention's key and value
    projections, used once, not embedding rows, which are gathered) and the keys and values of the
    positions filled so far (for an encoder-decoder also the cross-attention's over the prompt)."""
    import jax.numpy as jnp
    from flax import nnx

    def streamed(path) -> bool:
        keys = [str(getattr(k, "key", k)) for k in path]
        keys = [k for k in keys if not k.startswith(".")]  # the Param's ".value"
        cross_kv = "cross" in keys and keys[-1] in ("k", "v", "k_bias", "v_bias")
        return not ("encoder" in keys or cross_kv or keys[-1] in ("table", "wpe"))

    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
    weights = sum(x.nbytes for path, x in leaves if streamed(path)) + model.head().nbytes
    ids = jnp.zeros((batch, prompt), jnp.int32)
    if hasattr(model, "encode"):
        caches = jax.eval_shape(lambda: model.init_cache(batch, 1, model.encode(ids, ids), ids))
        filled = 1 + (new - 1) / 2  # the start token and, on average, half the new ones
    else:
        caches = jax.eval_shape(lambda: model.init_cache(batch, 1))
        filled = prompt + (new - 1) / 2
    per_slot = sum(c[n].size * c[n].dtype.itemsize for c in caches for n in ("k", "v"))
    # the cross-attention's keys and values ([B, heads, prompt, head_dim]; not the encoder mask beside them)
    cross = sum(
        x.size * x.dtype.itemsize for c in caches for n, x in c.items() if n not in ("k", "v") and x.ndim == 4
    )
    return int(new * (weights + cross + per_slot * filled))


def timed(fn, repeats: int) -> tuple[float, float]:
    """(seconds of the first call, median seconds of the next ``repeats`` calls)."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, float(np.median(times))


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.prompt, args.new, args.repeats = [2], 16, 8, 1

    import torch

    device = "cuda" if jax.devices()[0].platform == "gpu" and torch.cuda.is_available() else "cpu"
    print(f"# {machine_note()}; torch {torch.__version__} on {device}", flush=True)
    rows = []
    for name, config in hf_configs(args.quick).items():
        hf, ours = torch_and_ours(config)
        hf = hf.to(device)
        if config.is_encoder_decoder:
            hf.generation_config.update(**T5_IDS)
        for batch in args.batch:
            rng = np.random.default_rng(0)
            ids = rng.integers(2, config.vocab_size, (batch, args.prompt))
            mask = np.ones_like(ids)

            def run(ours=ours, ids=ids, mask=mask):
                return generate(
                    ours, ids, mask, args.new, temperature=1.0, rng=jax.random.key(0), eos_token_id=-1
                )

            # measured beside each row: this machine's speed drifts within a run
            bandwidth = stream_bytes_per_s(64 if args.quick else 512)
            compile_s, ours_s = timed(run, args.repeats)
            ids_t, mask_t = torch.tensor(ids, device=device), torch.tensor(mask, device=device)

            def hf_run(hf=hf, ids_t=ids_t, mask_t=mask_t):
                with torch.inference_mode():
                    out = hf.generate(
                        input_ids=ids_t,
                        attention_mask=mask_t,
                        max_new_tokens=args.new,
                        min_new_tokens=args.new,
                        do_sample=True,
                        top_k=0,
                        top_p=1.0,
                        temperature=1.0,
                    )
                if device == "cuda":
                    torch.cuda.synchronize()
                return out

            _, torch_s = timed(hf_run, args.repeats)
            new_tokens = batch * args.new
            rows.append(
                {
                    "model": name,
                    "batch": batch,
                    "ours_tok_s": new_tokens / ours_s,
                    "torch_tok_s": new_tokens / torch_s,
                    "ratio": torch_s / ours_s,
                    "ours_first_call_s": compile_s,
                    "ours_run_s": ours_s,
                    "floor_s": decode_bytes(ours, batch, args.prompt, args.new) / bandwidth,
                    "stream_bytes_per_s": bandwidth,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows, vars(args)))
    write_rows(args.json, args, rows)
    return rows


def table(rows: list[dict], args: dict) -> str:
    """Markdown: one line per (model, batch); the ratio is ours / transformers generated tokens/s. The
    floor is the decode's least bytes (``decode_bytes``) at the machine's streaming bandwidth, in the
    models' dtype: transformers' time over it is the most any sampler could beat it by here."""
    floors = all("floor_s" in r for r in rows)
    extra = " | bytes-read floor s | ours / floor | most reachable ratio |" if floors else " |"
    out = [
        "| model | batch | prompt + new | ours tok/s | transformers tok/s | ours / transformers "
        "| ours first call (compile + run) s" + extra,
        "|---|---|---|---|---|---|---|" + ("---|---|---|" if floors else ""),
    ]
    for r in rows:
        line = (
            f"| {r['model']} | {r['batch']} | {args['prompt']} + {args['new']} | {r['ours_tok_s']:.0f} "
            f"| {r['torch_tok_s']:.0f} | {r['ratio']:.2f}× | {r['ours_first_call_s']:.1f} |"
        )
        if floors:
            ours_s, floor = r["ours_run_s"], r["floor_s"]
            line += f" {floor:.2f} | {ours_s / floor:.2f}× | {ours_s * r['ratio'] / floor:.2f}× |"
        out.append(line)
    return "\n".join(out)


if __name__ == "__main__":
    main(sys.argv[1:])
