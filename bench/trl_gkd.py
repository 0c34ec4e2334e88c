"""TRL's ``GKDTrainer`` (``trl.experimental.gkd``) as one arm of ``bench/speedup.py``: on-policy GKD
(lmbda 1: every step on the student's fresh samples, JSD at the config's beta) on the same decoder-only
demo run as our arms (same teacher and SFT'd student init, same training rows and token ids, batch,
steps, learning rate, sampling temperature and response length), timed and evaluated the same way.

Timing: training wall-clock from ``on_train_begin``, with the checkpoint saves this script adds for
evaluation left out (so: steps, sampling and data loading, as our arms' ``train_s``). Evaluation: every
saved student is scored afterwards by our ``trainer.evaluate_model`` with the seed our arms use at that
step (sampled ROUGE-L on the same validation rows), so both sides are judged by one protocol.

What TRL does differently, measured as is: it normalises each step's loss by the number of ground-truth
response tokens in the batch (counted before the samples replace them), not by the number of sampled
tokens; and its loss passes no position ids, so transformers counts positions from the left edge of the
left-padded prompt batch, while ``generate`` (and our trainer) count them from each row's first token.
For a model with learned absolute positions (GPT-2) every row but the longest is then trained at shifted
positions. ``fix_positions`` (the ``trl_gkd_positions`` arm) gives both models position ids from the
attention mask, as ``generate`` does, through a forward pre-hook: TRL's algorithm without that defect.
"""

from __future__ import annotations

import os
import shutil
import time

import numpy as np

from distillm_jax import trainer
from distillm_jax.data import batching, tasks
from distillm_jax.data import tokenizers as toklib

IGNORE = -100  # transformers' "no loss here" label


def training_pairs(c) -> tuple[list[tuple[list[int], list[int]]], object]:
    """The (prompt, response + EOS) token ids our trainer trains on for config ``c``, and the tokenizer."""
    task = tasks.get(c.data.task)
    rows = tasks.load_rows(task, c.data.source or None, c.data.train_split, demo_rows=c.data.demo_rows)
    rows = rows[: c.data.max_train_rows] if c.data.max_train_rows else rows
    tokenizer = toklib.load(c.tokenizer, c.student.path)
    pairs = [p for p in tasks.to_pairs(task, rows, encoder_decoder=False) if p[1].strip()]
    lengths = batching.Lengths(c.data.max_prompt_length, c.data.max_length)
    return batching.tokenize_pairs(pairs, tokenizer, lengths)[0], tokenizer


def collate(rows: list[dict], pad: int) -> dict:
    """A TRL GKD batch: ``prompts`` left-padded to the batch's longest (for sampling), and the
    ground-truth ``input_ids`` / ``labels`` right-padded (TRL replaces them by the samples at lmbda 1)."""
    import torch

    b = len(rows)
    p_len = max(len(r["prompt"]) for r in rows)
    t_len = max(len(r["prompt"]) + len(r["response"]) for r in rows)
    prompts, p_mask = np.full((b, p_len), pad), np.zeros((b, p_len), np.int64)
    ids, mask, labels = np.full((b, t_len), pad), np.zeros((b, t_len), np.int64), np.full((b, t_len), IGNORE)
    for i, r in enumerate(rows):
        p, full = r["prompt"], r["prompt"] + r["response"]
        prompts[i, p_len - len(p) :], p_mask[i, p_len - len(p) :] = p, 1
        ids[i, : len(full)], mask[i, : len(full)] = full, 1
        labels[i, len(p) : len(full)] = r["response"]
    out = {"prompts": prompts, "prompt_attention_mask": p_mask, "input_ids": ids}
    out |= {"attention_mask": mask, "labels": labels}
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def positions_from_mask(module, args: tuple, kwargs: dict):
    """Forward pre-hook: position ids counted from each row's first real token when a full-sequence call
    (ids and mask of one shape) passes none; ``generate``'s calls pass their own and are left alone."""
    ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
    if (
        kwargs.get("position_ids") is None
        and ids is not None
        and mask is not None
        and ids.shape == mask.shape
    ):
        kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return args, kwargs


def run_arm(c, out: str, name: str = "trl_gkd", fix_positions: bool = False) -> dict:
    """Train ``c.student`` (an HF checkpoint directory) against ``c.teacher`` with TRL's GKD at lmbda 1
    for ``c.optim.steps`` steps, saving every ``c.eval.interval``; score the saves; return the row
    ``speedup.run_arm`` returns for our arms. ``fix_positions``: see the module docstring."""
    import datasets
    import torch
    import transformers
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    run_dir = os.path.join(out, name)
    shutil.rmtree(run_dir, ignore_errors=True)
    pairs, tokenizer = training_pairs(c)
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(c.seed)
    student = transformers.AutoModelForCausalLM.from_pretrained(c.student.path)
    teacher = transformers.AutoModelForCausalLM.from_pretrained(c.teacher.path)
    if fix_positions:
        for model in (student, teacher):
            model.register_forward_pre_hook(positions_from_mask, with_kwargs=True)
    saves = [(0, 0.0, c.student.path)]
    clock = {"start": 0.0, "paused": 0.0, "gen": 0.0}

    class Timed(GKDTrainer):
        @staticmethod
        def generate_on_policy_outputs(model, inputs, generation_config):
            start = time.perf_counter()
            result = GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)
            clock["gen"] += time.perf_counter() - start
            return result

    class SaveForEval(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kw):
            step = state.global_step
            if step % c.eval.interval and step != args.max_steps:
                return
            now = time.perf_counter()
            path = os.path.join(run_dir, f"step_{step}")
            model.save_pretrained(path)
            saves.append((step, now - clock["start"] - clock["paused"], path))
            clock["paused"] += time.perf_counter() - now

    config = GKDConfig(
        output_dir=run_dir,
        lmbda=1.0,
        beta=float(c.loss.beta),
        temperature=float(c.offpolicy.temperature),
        max_new_tokens=c.offpolicy.max_new_tokens or c.data.max_length - c.data.max_prompt_length,
        per_device_train_batch_size=c.optim.batch_size,
        max_steps=c.optim.steps,
        learning_rate=c.optim.lr,
        lr_scheduler_type="constant" if c.optim.end_lr >= c.optim.lr else "cosine",  # as our arms
        weight_decay=c.optim.weight_decay,
        max_grad_norm=c.optim.clip,
        logging_steps=c.log_interval,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        seed=c.seed,
        disable_tqdm=True,
    )
    data = datasets.Dataset.from_dict({"prompt": [p for p, _ in pairs], "response": [r for _, r in pairs]})
    gkd = Timed(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=data,
        data_collator=lambda rows: collate(rows, tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[SaveForEval()],
    )
    gkd.train()
    curve = []
    for step, secs, path in saves:  # scored as our arms are at the same step
        scored = trainer.override(c, method="sft", student__path=path, student__train_steps=0)
        seeds = tuple(c.seed * 1000 + step + trainer.DRAW_SEED_STRIDE * k for k in range(c.eval.draws))
        score = trainer.evaluate_model(scored, seeds)  # the draws our arms' evaluations use at that step
        curve.append((step, secs, score["rougeL"], score["rougeL_std"]))
    return {
        "arm": name,
        "method": "gkd (TRL, lmbda 1" + (", position ids from the mask)" if fix_positions else ")"),
        "loss": "jsd",
        "steps": c.optim.steps,
        "train_seconds": saves[-1][1],
        "gen_seconds": clock["gen"],
        "sources": {"data": 0, "sgo": c.optim.steps, "replay": 0},
        "phi": None,
        "curve": curve,
        "final_rougeL": curve[-1][2],
        "best_rougeL": max(p[2] for p in curve),
    }
