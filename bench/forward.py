"""Forward tokens/s of our models against transformers PyTorch on the same weights, same machine, same run.

Each model is built in transformers PyTorch with random weights, saved, and loaded by
``models.from_pretrained``; both then compute full float32 logits for the same batch. Run from the
repository root (needs torch: ``pip install torch==2.13.0``):

    python bench/forward.py              # ~50M-parameter GPT-2- and Llama-shaped models, batch 8 x 512
    python bench/forward.py --quick      # tiny shapes, seconds: checks the script itself
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from common import machine_note, median_seconds, torch_and_ours, write_rows


def hf_configs(quick: bool) -> dict:
    import transformers

    if quick:
        return {
            "gpt2": transformers.GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=128),
            "llama": transformers.LlamaConfig(
                vocab_size=512,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
            ),
        }
    return {  # ~51M and ~56M parameters
        "gpt2": transformers.GPT2Config(vocab_size=50257, n_embd=512, n_layer=8, n_head=8, n_positions=1024),
        "llama": transformers.LlamaConfig(
            vocab_size=32000,
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            tie_word_embeddings=False,
        ),
    }


def torch_seconds(model, ids: np.ndarray, mask: np.ndarray, repeats: int, device: str) -> float:
    import torch

    model = model.to(device)
    ids_t, mask_t = torch.tensor(ids, device=device), torch.tensor(mask, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    with torch.inference_mode():
        model(input_ids=ids_t, attention_mask=mask_t)  # warm-up
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids=ids_t, attention_mask=mask_t)
            sync()
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.repeats = 2, 32, 1

    import torch

    device = "cuda" if jax.devices()[0].platform == "gpu" and torch.cuda.is_available() else "cpu"
    if device == "cuda":  # full float32 matmuls on both sides (no TF32), as torch does by default
        jax.config.update("jax_default_matmul_precision", "highest")
    threads = torch.get_num_threads()
    print(f"# {machine_note()}; torch {torch.__version__} on {device} ({threads} CPU threads)", flush=True)
    rows = []
    for name, config in hf_configs(args.quick).items():
        config._attn_implementation = "sdpa"
        hf, ours = torch_and_ours(config)
        params = sum(p.numel() for p in hf.parameters())
        rng = np.random.default_rng(0)
        ids = rng.integers(0, config.vocab_size, (args.batch, args.seq))
        mask = np.ones_like(ids)
        forward = jax.jit(lambda i, m, model=ours: model(i, m))
        ours_s = median_seconds(forward, jnp.asarray(ids), jnp.asarray(mask), repeats=args.repeats)
        torch_s = torch_seconds(hf, ids, mask, args.repeats, device)
        tokens = args.batch * args.seq
        rows.append(
            {
                "model": name,
                "params_m": params / 1e6,
                "ours_tok_s": tokens / ours_s,
                "torch_tok_s": tokens / torch_s,
                "ratio": torch_s / ours_s,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows, vars(args)))
    write_rows(args.json, args, rows)
    return rows


def table(rows: list[dict], args: dict) -> str:
    """Markdown: one line per model; the ratio is ours / transformers tokens/s (above 1: ours is faster)."""
    out = [
        "| model | params | batch x seq | ours tok/s | transformers tok/s | ours / transformers |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['model']} | {r['params_m']:.0f}M | {args['batch']} x {args['seq']} "
            f"| {r['ours_tok_s']:.0f} | {r['torch_tok_s']:.0f} | {r['ratio']:.2f}× |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    main(sys.argv[1:])
