"""Distillation train step tokens/s: ours (``step.make_train_step``) against the peers a user would pick,
on the same weights and batch, same machine, same run, the sides' steps interleaved:

- TRL's ``GKDTrainer`` (``trl.experimental.gkd``) with lmbda 0 (no generation) and our step, both with
  the generalised JSD at beta 0.1 (the paper's GKD loss): the whole ``Trainer`` step as a TRL user runs it;
- a plain transformers + torch loop and our step, both with the SRKL (alpha 0.1).

One step is the teacher forward (no gradient), the student forward and backward, the loss (token-level
masked mean over the response half of each row) and an AdamW update (weight decay 0.01) with global-norm
clipping at 1. Both models are GPT-2-shaped, built in transformers PyTorch with random weights, saved,
and loaded by ``models.from_pretrained``. Also reported: achieved FLOP/s of every side against this
machine's measured float32 matmul peak (a jitted 2048 x 2048 matmul, same run). Run from the repository
root (needs the peers: ``pip install -r bench/requirements.txt``):

    python bench/train_step.py              # teacher GPT-2 small (124M), student 6 x 384 (30M), 8 x 512
    python bench/train_step.py --quick      # tiny shapes, seconds: checks the script itself
    python bench/train_step.py --breakdown  # also time the teacher forward and the loss alone, per side
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from common import machine_note, matmul_peak_flop_s, torch_and_ours, write_rows
from flax import nnx

from distillm_jax import losses, step
from distillm_jax.models import layers

ALPHA = 0.1
BETA = 0.1
# Each comparison: (our side, peer side, the loss both compute, its parameter, what the table calls it).
PAIRS = {
    "trl": ("ours_jsd", "trl", "jsd", ("beta", BETA), "TRL GKDTrainer (lmbda 0)", "JSD β 0.1"),
    "torch": ("ours", "torch", "srkl", ("alpha", ALPHA), "transformers + torch loop", "SRKL α 0.1"),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed steps per side (ours: the first compiles)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed steps per side (median reported)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="our compute and parameter dtype (torch stays float32; bfloat16 is for accelerators)",
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        default=-1,
        help="our side's loss.chunk_size (-1: what a run's default config chooses, "
        "losses.auto_chunk_size; 0: the plain form)",
    )
    p.add_argument("--peers", nargs="+", choices=list(PAIRS), default=list(PAIRS), help="which peers to run")
    p.add_argument("--breakdown", action="store_true", help="also time the teacher forward and the loss")
    p.add_argument("--quick", action="store_true", help="tiny shapes, for testing the script")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.repeats = 2, 32, 2
    return args


def hf_configs(quick: bool) -> tuple:
    """(teacher, student) GPT-2 configs, dropout off on both sides: the step is compared without it (at
    rate 0 our models compile no dropout op; transformers skips it in eval())."""
    import transformers

    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if quick:
        shapes = (dict(n_embd=64, n_layer=2, n_head=4), dict(n_embd=32, n_layer=2, n_head=2))
        common = dict(vocab_size=512, n_positions=128, bos_token_id=0, eos_token_id=0)
    else:  # GPT-2 small and a 6-layer, 384-wide student
        shapes = (dict(n_embd=768, n_layer=12, n_head=12), dict(n_embd=384, n_layer=6, n_head=6))
        common = dict(vocab_size=50257, n_positions=1024)
    out = []
    for shape in shapes:
        config = transformers.GPT2Config(**shape, **common, **no_dropout)
        config._attn_implementation = "sdpa"
        out.append(config)
    return tuple(out)


def load_pair(config, seed: int, dtype: str):
    """The transformers model (float32) and ours on the same weights, ours in ``dtype``."""
    hf, ours = torch_and_ours(config, seed=seed)
    if dtype != "float32":
        import tempfile

        from distillm_jax import models

        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(d)
            ours = models.from_pretrained(d, dtype=jnp.dtype(dtype))
    return hf, ours


def make_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
    """Random ids, full attention, labels = ids shifted left, loss on the second half (the "response")
    of each row except the last position (which has no next token)."""
    ids = np.random.default_rng(seed).integers(0, vocab, (batch, seq)).astype(np.int32)
    labels = np.concatenate([ids[:, 1:], np.zeros((batch, 1), np.int32)], axis=1)
    loss_mask = np.zeros((batch, seq), np.int32)
    loss_mask[:, seq // 2 : seq - 1] = 1
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels, "loss_mask": loss_mask}


def step_flops(config, tokens: int) -> tuple[float, float]:
    """(non-embedding params + LM head, FLOPs of a forward pass per token) of a GPT-2 config: the
    per-layer attention and MLP weights and biases, layer norms, and the [d, V] head matmul."""
    d, layers_, vocab = config.n_embd, config.n_layer, config.vocab_size
    mlp = config.n_inner or 4 * d
    per_layer = 4 * d * d + 4 * d + 2 * d * mlp + mlp + d + 4 * d  # attn + MLP weights/biases + 2 norms
    n = layers_ * per_layer + 2 * d + d * vocab
    return n, 2.0 * n * tokens


def torch_srkl(s_logits, t_logits, mask, alpha: float = ALPHA):
    """Same math as ``losses.divergence("srkl")``: per token KL(q ‖ (1−α) p + α q), the mixture in log
    space, clamped at 0, token-level masked mean."""
    import torch

    ls = torch.log_softmax(s_logits.float(), dim=-1)
    lt = torch.log_softmax(t_logits.float(), dim=-1)
    log_m = torch.logaddexp(lt + math.log1p(-alpha), ls + math.log(alpha))
    per_token = (ls.exp() * (ls - log_m)).sum(-1).clamp_min(0.0)
    keep = mask != 0
    return torch.where(keep, per_token, 0.0).sum() / keep.sum().clamp_min(1)


class Ours:
    """Our train step, exactly as the trainer builds it; ``__call__`` runs one step and returns the loss.
    The returned params and optimizer state are fed back (the step donates its inputs)."""

    def __init__(self, args, t_model, s_model, batch: dict, divergence: str = "srkl", param=("alpha", ALPHA)):
        tx = step.make_optimizer(args.lr, total_steps=1000, weight_decay=0.01, clip=1.0)
        cfg = step.LossConfig(
            divergence=divergence, kd_ratio=1.0, params=(param,), chunk_size=args.chunk_size
        )
        self.step, self.params, self.opt_state = step.make_train_step(s_model, t_model, tx, cfg)
        self.teacher_state = nnx.state(t_model)
        self.batch = {k: jnp.asarray(v) for k, v in batch.items()}

    def __call__(self) -> float:
        self.params, self.opt_state, metrics = self.step(
            self.params, self.opt_state, self.teacher_state, self.batch
        )
        jax.block_until_ready((self.params, self.opt_state, metrics))
        return float(metrics["loss"])

    def compiles(self) -> int:
        """Executables in the step's jit cache: 1 if it compiled once."""
        return self.step._cache_size()

    def xla_flops(self) -> float | None:
        """XLA's own FLOP count of the compiled step (one more compile; lowering consumes nothing)."""
        try:
            lowered = self.step.lower(self.params, self.opt_state, self.teacher_state, self.batch)
            cost = lowered.compile().cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            return float(cost.get("flops", 0.0)) or None
        except Exception as e:  # cost analysis is best effort: not every backend has it
            print(f"# no XLA cost analysis: {e}", file=sys.stderr)
            return None


class Torch:
    """The same step in transformers PyTorch: teacher under no_grad, student forward/backward, SRKL,
    AdamW(lr, weight_decay=0.01 on all but biases and norms, as the official code) after
    clip_grad_norm_(1.0)."""

    def __init__(self, args, t_model, s_model, batch: dict):
        import torch

        self.ids, self.mask = torch.tensor(batch["input_ids"]), torch.tensor(batch["attention_mask"])
        self.loss_mask = torch.tensor(batch["loss_mask"])
        self.teacher = t_model.eval().requires_grad_(False)
        self.student = s_model.eval()  # dropout is 0 anyway; eval() keeps both sides deterministic
        named = list(s_model.named_parameters())
        exempt = [p for n, p in named if "bias" in n or "ln_" in n or "norm" in n]
        rest = [p for n, p in named if not any(p is q for q in exempt)]
        groups = [{"params": rest, "weight_decay": 0.01}, {"params": exempt, "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=args.lr)

    def __call__(self) -> float:
        import torch

        with torch.no_grad():
            t_logits = self.teacher(input_ids=self.ids, attention_mask=self.mask).logits
        s_logits = self.student(input_ids=self.ids, attention_mask=self.mask).logits
        loss = torch_srkl(s_logits, t_logits, self.loss_mask)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.opt.step()
        return float(loss.detach())


class Trl:
    """TRL's ``GKDTrainer`` with lmbda 0 (every step on the given batch, no generation) and JSD at
    ``BETA``, driven one step per call: ``trainer.train()`` runs on a thread that a callback parks at the
    start of every step until the next call, so TRL's steps interleave with the other sides' as theirs
    do. Each step is everything ``Trainer`` does for it (collation, teacher and student forwards, loss,
    backward, clipping, AdamW with its default fused kernel, logging every step). The loss is read from
    ``compute_loss`` (before any accumulation scaling)."""

    def __init__(self, args, t_model, s_model, batch: dict):
        import tempfile
        import threading

        import datasets
        import torch
        import transformers
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        from distillm_jax.data.tokenizers import byte_level

        ids = torch.tensor(batch["input_ids"], dtype=torch.long)
        # TRL shifts labels itself (labels[:, 1:] against logits[:, :-1]): label j is the target of
        # position j - 1, so our loss mask moves one to the right; -100 elsewhere.
        keep = torch.zeros_like(ids, dtype=torch.bool)
        keep[:, 1:] = torch.tensor(batch["loss_mask"][:, :-1] != 0)
        fixed = {
            "input_ids": ids,
            "attention_mask": torch.tensor(batch["attention_mask"], dtype=torch.long),
            "labels": torch.where(keep, ids, torch.full_like(ids, -100)),
        }
        self.losses: list[float] = []
        self.go, self.done = threading.Semaphore(0), threading.Semaphore(0)
        self.error: BaseException | None = None
        losses_ = self.losses

        class Recording(GKDTrainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                losses_.append(float((out[0] if return_outputs else out).detach()))
                return out

        driver = self

        class Parking(transformers.TrainerCallback):
            started = False

            def on_step_begin(self, *a, **kw):
                if self.started:
                    driver.done.release()
                self.started = True
                driver.go.acquire()

            def on_train_end(self, *a, **kw):
                driver.done.release()

        self.out_dir = tempfile.TemporaryDirectory()
        config = GKDConfig(
            output_dir=self.out_dir.name,
            per_device_train_batch_size=ids.shape[0],
            max_steps=args.warmup + args.repeats,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            weight_decay=0.01,
            max_grad_norm=1.0,
            lmbda=0.0,
            beta=BETA,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            use_cpu=jax.devices()[0].platform == "cpu",
            dataloader_num_workers=0,
            seed=0,
            disable_tqdm=True,
        )
        self.trainer = Recording(
            model=s_model,
            teacher_model=t_model,
            args=config,
            train_dataset=datasets.Dataset.from_dict({"row": list(range(ids.shape[0] * config.max_steps))}),
            data_collator=lambda rows: {k: v.clone() for k, v in fixed.items()},
            processing_class=byte_level(),  # GKDTrainer wants one for pad_token_id; the batch is given
            callbacks=[Parking()],
        )
        self.thread = threading.Thread(target=self._train, daemon=True)
        self.thread.start()

    def _train(self) -> None:
        try:
            self.trainer.train()
        except BaseException as e:  # handed to the caller's thread
            self.error = e
            self.done.release()

    def __call__(self) -> float:
        self.go.release()
        self.done.acquire()
        if self.error is not None:
            raise RuntimeError("TRL's GKDTrainer failed") from self.error
        return self.losses[-1]


def load_1min() -> float | None:
    """The host's 1-minute load average: other work on the machine shows up here."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def run_steps(args, sides: dict) -> dict:
    """Warm each side up, then alternate timed steps between the sides, so that whatever else the
    machine is doing falls on both alike. Returns per side its losses, and per step (warm-up first) the
    wall-clock seconds, this process's CPU seconds (all threads) and the host's load average before it."""
    out = {name: {"losses": [], "times_s": [], "cpu_s": [], "load": []} for name in sides}

    def one(name: str, i: int) -> None:
        r = out[name]
        r["load"].append(load_1min())
        start, cpu = time.perf_counter(), time.process_time()
        r["losses"].append(sides[name]())
        r["times_s"].append(time.perf_counter() - start)
        r["cpu_s"].append(time.process_time() - cpu)
        print(
            f"# {name} step {i}: {r['times_s'][-1]:.3f} s (cpu {r['cpu_s'][-1]:.1f} s, load "
            f"{r['load'][-1]}), loss {r['losses'][-1]:.6f}",
            file=sys.stderr,
            flush=True,
        )

    for name in sides:
        for i in range(args.warmup):
            one(name, i)
    for i in range(args.warmup, args.warmup + args.repeats):
        for name in sides if i % 2 == 0 else reversed(list(sides)):
            one(name, i)
    for r in out.values():
        timed = r["times_s"][args.warmup :]
        r["step_s"], r["min_step_s"] = statistics.median(timed), min(timed)
        r["cpu_step_s"] = statistics.median(r["cpu_s"][args.warmup :])
    return out


def torch_matmul_flop_s(n: int = 2048, repeats: int = 10) -> float:
    """The same matmul in torch (its own BLAS), for reference."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2.0 * n**3 / best_seconds({"mm": lambda: torch.mm(a, b)}, repeats)["mm"]


def best_seconds(fns: dict, repeats: int = 2) -> dict:
    """Fastest of ``repeats`` calls of each ``fn()`` after one warm-up call each, the calls of different
    functions alternating (so other work on the machine falls on all alike); ``fn`` waits for its
    result."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for r in range(repeats):
        for name in fns if r % 2 == 0 else reversed(list(fns)):
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def breakdown(args, t_ours, t_hf, s_config, batch: dict) -> dict:
    """Seconds (fastest of 2) of the two halves of a step, per side: the teacher's forward to logits, and
    the student's forward and backward with the SRKL on fixed teacher logits (gradient w.r.t. all student
    params, no optimizer). Ours is timed as ``step.distill_loss`` builds it (CE on its own logits call,
    weighted 0) and as the what-if (one logits call, no CE gradient)."""
    import torch

    ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    ids_t, mask_t = torch.tensor(batch["input_ids"]), torch.tensor(batch["attention_mask"])
    fwd = jax.jit(lambda i, m: t_ours(i, m))

    def torch_teacher():
        with torch.no_grad():
            return t_hf(input_ids=ids_t, attention_mask=mask_t).logits

    out = best_seconds(
        {
            "ours_teacher_fwd_s": lambda: jax.block_until_ready(fwd(ids, mask)),
            "torch_teacher_fwd_s": torch_teacher,
        }
    )
    t_logits = torch_teacher()
    s_hf, s_ours = load_pair(s_config, 1, "float32")
    graph, params, rest = nnx.split(s_ours, nnx.Param, ...)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    tl = jnp.asarray(t_logits.numpy())
    lm_t = torch.tensor(batch["loss_mask"])

    def student_loss(p, tl, b):  # as in the step with kd_ratio 1: CE is only reported, no gradient
        hs, ws = step.hidden_and_head(nnx.merge(graph, p, rest), b)
        return losses.divergence("srkl", layers.logits(hs, ws), tl, b["loss_mask"], alpha=ALPHA)

    def torch_student():
        s_hf.zero_grad(set_to_none=True)
        s_logits = s_hf(input_ids=ids_t, attention_mask=mask_t).logits
        torch_srkl(s_logits, t_logits, lm_t).backward()

    grad = jax.jit(jax.value_and_grad(student_loss))
    out |= best_seconds(
        {
            "ours_student_s": lambda: jax.block_until_ready(grad(params, tl, jb)),
            "torch_student_s": torch_student,
        }
    )
    return out


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    import torch

    if jax.devices()[0].platform != "cpu":  # full float32 matmuls on both sides (no TF32)
        jax.config.update("jax_default_matmul_precision", "highest")
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    print(f"# {machine_note()}; torch {torch.__version__} on cpu ({threads} threads)", flush=True)
    t_config, s_config = hf_configs(args.quick)
    if args.chunk_size < 0:  # the form a run gets with no speed flag
        args.chunk_size = losses.auto_chunk_size(s_config.vocab_size, args.dtype, jax.default_backend())
    print(
        f"# our loss form: {'chunked, ' + str(args.chunk_size) if args.chunk_size else 'plain'}", flush=True
    )
    t_hf, t_ours = load_pair(t_config, 0, args.dtype)
    batch = make_batch(args.batch, args.seq, t_config.vocab_size)
    tokens = args.batch * args.seq
    n_t, t_fwd = step_flops(t_config, tokens)
    n_s, s_fwd = step_flops(s_config, tokens)
    flops = t_fwd + 3 * s_fwd  # teacher forward 2·N_t·tokens + student forward/backward 6·N_s·tokens

    peak, torch_peak = matmul_peak_flop_s(), torch_matmul_flop_s()
    print(f"# float32 2048 x 2048 matmul GFLOP/s: jitted {peak / 1e9:.1f}, torch {torch_peak / 1e9:.1f}")
    # Every side trains its own copy of the same student, and the TRL side gets its own teacher: all
    # built before any Trainer exists (a Trainer changes torch's global state, e.g. its seeds).
    models = {}
    for peer in args.peers:
        models[peer] = (
            load_pair(s_config, 1, args.dtype)[1],
            load_pair(s_config, 1, "float32")[0],
            load_pair(t_config, 0, "float32")[0] if peer == "trl" else t_hf,
        )
    student_params_m = sum(p.numel() for p in models[args.peers[0]][1].parameters()) / 1e6
    sides = {}
    for peer in args.peers:
        ours_name, peer_name, divergence, param, _, _ = PAIRS[peer]
        s_ours, s_hf_peer, t_hf_peer = models[peer]
        sides[ours_name] = Ours(args, t_ours, s_ours, batch, divergence, param)
        sides[peer_name] = (Trl if peer == "trl" else Torch)(args, t_hf_peer, s_hf_peer, batch)
    del models
    timed = run_steps(args, sides)
    for name, side in sides.items():
        r = timed[name]
        r["tok_s"], r["flop_s"] = tokens / r["step_s"], flops / r["step_s"]
        if isinstance(side, Ours):
            r["compiles"], r["xla_flops"] = side.compiles(), side.xla_flops()
    del sides
    row = {
        "teacher_params_m": sum(p.numel() for p in t_hf.parameters()) / 1e6,
        "student_params_m": student_params_m,
        "teacher_flop_params_m": n_t / 1e6,
        "student_flop_params_m": n_s / 1e6,
        "batch": args.batch,
        "seq": args.seq,
        "dtype": args.dtype,
        "chunk_size": args.chunk_size,
        "torch_threads": threads,
        "torch": torch.__version__,
        "trl": _version("trl"),
        "warmup": args.warmup,
        "repeats": args.repeats,
        "flops_per_step": flops,
        "peak_flop_s": peak,
        "torch_matmul_flop_s": torch_peak,
        "sides": timed,
        "pairs": [],
    }
    for peer in args.peers:
        ours_name, peer_name, divergence, param, label, loss_label = PAIRS[peer]
        ours, theirs = timed[ours_name], timed[peer_name]
        row["pairs"].append(
            {
                "peer": peer,
                "ours_side": ours_name,
                "peer_side": peer_name,
                "peer_label": label,
                "loss": loss_label,
                "ratio": theirs["step_s"] / ours["step_s"],
                "ratio_of_min": theirs["min_step_s"] / ours["min_step_s"],
                "ratio_of_cpu_s": theirs["cpu_step_s"] / ours["cpu_step_s"],
                "first_loss_rel_diff": abs(ours["losses"][0] - theirs["losses"][0])
                / abs(theirs["losses"][0]),
            }
        )
    if args.breakdown:
        row.update(breakdown(args, t_ours, t_hf, s_config, batch))
    print(json.dumps(row), flush=True)
    print(table([row]))
    write_rows(args.json, args, [row])
    return [row]


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def table(rows: list[dict]) -> str:
    """Markdown: one line per comparison; ratios are ours / peer (above 1: ours is faster), by median
    wall-clock step time and by median CPU seconds per step (less sensitive to other load)."""
    out = [
        "| peer | loss | teacher / student | batch x seq | ours tok/s | peer tok/s | ours / peer "
        "| by CPU time | ours GFLOP/s (of peak) | peer GFLOP/s (of peak) | matmul peak GFLOP/s "
        "| first-step loss rel. diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for p in r["pairs"]:
            ours, theirs, peak = r["sides"][p["ours_side"]], r["sides"][p["peer_side"]], r["peak_flop_s"]
            chunked = f" (ours chunked, {r['chunk_size']})" if r.get("chunk_size") else ""
            out.append(
                f"| {p['peer_label']} | {p['loss']}{chunked} "
                f"| {r['teacher_params_m']:.1f}M / {r['student_params_m']:.1f}M "
                f"| {r['batch']} x {r['seq']} | {ours['tok_s']:.0f} | {theirs['tok_s']:.0f} "
                f"| **{p['ratio']:.2f}×** | {p['ratio_of_cpu_s']:.2f}× "
                f"| {ours['flop_s'] / 1e9:.1f} ({ours['flop_s'] / peak:.0%}) "
                f"| {theirs['flop_s'] / 1e9:.1f} ({theirs['flop_s'] / peak:.0%}) "
                f"| {peak / 1e9:.1f} | {p['first_loss_rel_diff']:.1e} |"
            )
    return "\n".join(out)


if __name__ == "__main__":
    main(sys.argv[1:])
