"""The training loop: data, the jitted steps, evaluation, checkpoints, logging and export, wired together
for one run (``train``); ``pipeline.py`` chains the runs of the paper's pipeline around it.

Methods (``config.method``): ``sft`` (CE only, no teacher), ``kd`` (``loss.name`` on ground-truth
responses; ``fkl`` is the paper's KD), ``seqkd`` (the teacher's own responses to the training prompts,
generated once and saved in the run folder, then trained on with ``loss.name``), and the methods on
student-generated outputs — ``distillm`` (adaptive off-policy), ``imitkd``, ``gkd``, ``onpolicy`` — whose
per-step choice of rows lives in ``offpolicy.py`` (``Feeder``); every method draws its rows from a feeder,
except ``minillm``, whose rollout rounds live in ``minillm.py`` (``Rollouts``). ``distillm2`` trains on
the teacher's and the initial student's responses, both generated once and cached like SeqKD's.

Step counts are optimizer updates; with ``optim.grad_accum > 1`` each update runs that many micro-batches.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from distillm_jax import config as cfglib
from distillm_jax import (
    distributed,
    evaluation,
    generate,
    lora,
    methods,
    minillm,
    models,
    offpolicy,
    planner,
    preflight,
    reporting,
    runstate,
    sharding,
    step,
)
from distillm_jax.checkpointing import Checkpoints
from distillm_jax.data import batching, tasks
from distillm_jax.data import tokenizers as toklib


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss); the message names the step and the last checkpoint."""


def build_model(spec: ConfigDict, mesh, *, trainable: bool) -> nnx.Module:
    """A checkpoint (``spec.path``) or a new random model (``spec.config``), placed on ``mesh``. A
    trained model keeps float32 params unless ``param_dtype`` says otherwise (AdamW's updates are small)."""
    dtype = jnp.dtype(spec.dtype)
    param_dtype = jnp.dtype(spec.param_dtype or ("float32" if trainable else spec.dtype))
    if spec.path:
        model = models.from_pretrained(spec.path, dtype=dtype, mesh=mesh, param_dtype=param_dtype)
    else:
        hf = planner.hf_config(spec)  # from spec.config
        model = models.create(hf, dtype=dtype, param_dtype=param_dtype, mesh=mesh, seed=spec.seed)
    lo = spec.lora
    if trainable and lo.rank:  # adapters on the frozen weights (kept in the param dtype they load in)
        lora.apply(
            model, rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout, targets=tuple(lo.targets), seed=spec.seed
        )
    return model


class Run:
    """Everything one training run holds; ``train`` drives it."""

    def __init__(self, config: ConfigDict, *, evaluate_only: bool = False):
        """``evaluate_only``: just the student, the tokenizer and the validation rows."""
        cfglib.check(config)
        self.config = c = config
        self.mesh = sharding.make_mesh(**c.mesh)
        self.shards, self.num_shards = sharding.data_shards(self.mesh)
        self.task = tasks.get(c.data.task, c.data.languages)
        self.lengths = batching.Lengths(c.data.max_prompt_length, c.data.max_length)
        try:
            self.tokenizer = toklib.load(c.tokenizer, c.student.path)
            if methods.get(c.method).teacher:
                toklib.check_same(self.tokenizer, c.teacher.path)
        except ValueError as e:
            raise cfglib.ConfigError(str(e)) from None
        self.pad = self.tokenizer.pad_token_id
        self.micro = c.optim.batch_size // c.optim.grad_accum
        d = c.data  # read before any model loads: a wrong file or column fails in seconds
        raw_train = None if evaluate_only else self._raw(d.train_split, d.max_train_rows, d.demo_rows)
        raw_valid = self._raw(d.valid_split, d.max_valid_rows, d.max_valid_rows or 500)
        texts = None
        if c.loss.lm_coef > 0 and not evaluate_only:
            lm_task = tasks.get("openwebtext")
            texts = [
                r["text"] for r in self._raw(d.lm_split, d.lm_max_rows, 0, task=lm_task, source=d.lm_source)
            ]
        if jax.process_count() > 1:
            for name, size in (("the micro-batch", self.micro), ("eval.batch_size", c.eval.batch_size)):
                if size % self.num_shards:
                    raise cfglib.ConfigError(
                        f"{name} ({size}) must split over the mesh's {self.num_shards} data shards "
                        "(data x fsdp) when several processes share the batch"
                    )
        self.student = build_model(c.student, self.mesh, trainable=True)
        self.enc_dec = hasattr(self.student, "encode")
        self.start_id = self.student.hf_config.get("decoder_start_token_id") or 0
        self._check_vocab(self.student, "student")
        if c.loss.lm_coef > 0 and self.enc_dec:
            raise cfglib.ConfigError("loss.lm_coef (plain LM loss) needs a decoder-only student; set it to 0")
        self.teacher = None
        self.valid_rows, self.valid_refs = self._tokenized(d.valid_split, raw_valid)
        if evaluate_only:
            return
        if methods.get(c.method).teacher:
            self.teacher = build_model(c.teacher, self.mesh, trainable=False)
            self._check_vocab(self.teacher, "teacher")
            if hasattr(self.teacher, "encode") != self.enc_dec:
                raise cfglib.ConfigError(
                    "teacher and student must both be encoder-decoder or both decoder-only"
                )
        self.train_rows, _ = self._tokenized(d.train_split, raw_train)
        if len(self.train_rows) < c.optim.batch_size:
            raise cfglib.ConfigError(
                f"{len(self.train_rows)} usable training rows are fewer than one batch ({c.optim.batch_size})"
            )
        self.lm_rows = None if texts is None else batching.LazyTokens(texts, self.tokenizer)

    # ----------------------------------------------------------------------------------------------
    # data

    def _check_vocab(self, model: nnx.Module, role: str) -> None:
        if model.config.vocab < len(self.tokenizer):
            raise cfglib.ConfigError(
                f"the {role}'s vocabulary ({model.config.vocab}) is smaller than the tokenizer's "
                f"({len(self.tokenizer)}); they do not belong together"
            )

    def _raw(self, split: str, max_rows: int, demo_rows: int, task=None, source=None) -> list[dict]:
        """A split's rows as read (the task's columns checked), at most ``max_rows`` (0: all)."""
        try:
            return tasks.load_rows(
                task or self.task,
                source or self.config.data.source,
                split,
                demo_rows=demo_rows,
                max_rows=max_rows,
            )
        except (FileNotFoundError, ValueError) as e:
            raise cfglib.ConfigError(str(e)) from None

    def _tokenized(self, split: str, rows: list[dict]) -> tuple[list, list[str]]:
        """(prompt, response) token ids of a split's rows, and the reference texts."""
        c = self.config
        pairs = tasks.to_pairs(self.task, rows, encoder_decoder=self.enc_dec)
        kept = [x for x in pairs if x[1].strip()]  # an empty response is skipped (and counted)
        hosts, me = jax.process_count(), jax.process_index()
        tokenized, skipped = batching.tokenize_pairs(
            kept[me::hosts], self.tokenizer, self.lengths, encoder_decoder=self.enc_dec
        )
        if hosts > 1:  # each host tokenizes every hosts-th row; all of them are put back in order
            parts = distributed.gather_objects([tokenized, skipped["prompt_truncated"]])
            tokenized = [tuple(parts[i % hosts][0][i // hosts]) for i in range(len(kept))]
            skipped["prompt_truncated"] = sum(n for _, n in parts)
        skipped["empty_response"] = len(pairs) - len(kept)
        if any(skipped.values()) and me == 0:
            print(
                f"{split}: {len(tokenized)} rows; "
                f"skipped {skipped['empty_response']} with an empty or missing response; "
                f"cut {skipped['prompt_truncated']} prompts longer than {c.data.max_prompt_length} tokens"
            )
        refs = [r for _, r in pairs if r.strip()]
        return tokenized, refs

    def batch(self, rows: list) -> dict:
        if self.enc_dec:
            return batching.encoder_decoder_batch(rows, self.lengths, self.pad, self.start_id)
        return batching.decoder_only_batch(rows, self.lengths, self.pad)

    def to_devices(self, batch: dict) -> dict:
        """Host numpy batch -> global arrays sharded over the data axes (replicated when the batch does not
        divide them)."""

        def put(x):
            if isinstance(x, dict):
                return {k: put(v) for k, v in x.items()}
            spec = sharding.batch_sharding(self.mesh, x.ndim)
            rows = x.shape[0] * self.num_shards // len(self.shards)  # the global batch
            if rows % self.num_shards:  # only with one process (Run checks): replicate
                spec = NamedSharding(self.mesh, PartitionSpec())
            return jax.make_array_from_process_local_data(spec, x, (rows, *x.shape[1:]))

        return put(batch)

    def _mine(self, rows: list) -> list:
        """This process's part of a global batch's rows."""
        return batching.shard_rows(rows, self.shards, self.num_shards)

    def fixed_batches(self, rows: list, size: int):
        """``rows`` in global batches of ``size`` (this process's part of each); the last one filled with
        copies of row 0 whose loss mask is zeroed. Yields (batch, number of real rows)."""
        for i in range(0, len(rows), size):
            chunk = rows[i : i + size]
            real = len(chunk)
            mine = self._mine([(r, True) for r in chunk] + [(rows[0], False)] * (size - real))
            b = self.batch([r for r, _ in mine])
            b["loss_mask"][[j for j, (_, keep) in enumerate(mine) if not keep]] = 0
            yield b, real

    # ----------------------------------------------------------------------------------------------
    # generation and evaluation

    def _sampler_inputs(self, prompts: list) -> dict:
        """Prompt ids and mask of ``prompts`` in the layout the sampler reads, on the devices."""
        b = self.batch([(p, [self.pad]) for p in prompts])
        keys = ("input_ids", "attention_mask") if self.enc_dec else ("prompt_ids", "prompt_mask")
        return self.to_devices({k: b[k] for k in keys})

    def sample(
        self,
        model: nnx.Module,
        prompts: list,
        new: int,
        settings: ConfigDict,
        rng,
        ngram: int = 0,
        mix: tuple[nnx.Module, float] | None = None,
    ):
        """Dispatch the sampler on ``prompts`` (token-id lists); returns device ``(tokens, mask)``
        without waiting. ``settings``: a config group with ``temperature``, ``top_k``, ``top_p``;
        ``mix``: (another model, its share) to sample from a mixture of the two (MiniLLM)."""
        ids, mask = self._sampler_inputs(prompts).values()
        return generate.generate(
            model,
            ids,
            mask,
            new,
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
            rng=rng,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.pad,
            no_repeat_ngram_size=ngram,
            mix_model=None if mix is None else mix[0],
            mix_alpha=0.0 if mix is None else mix[1],
        )

    def generate_texts(
        self, model: nnx.Module, rows: list, settings: ConfigDict, *, seed: int, ngram: int = 0
    ) -> list:
        """Token ids of ``model``'s response to every row's prompt (EOS kept when produced), sampled with
        ``settings`` (temperature, top_k, top_p) and, when ``ngram`` > 0, no repeated ``ngram``-gram."""
        e, out, size = self.config.eval, [], self.config.eval.batch_size
        new = e.max_new_tokens or self.lengths.max_response
        key = jax.random.key(seed)
        for i in range(0, len(rows), size):
            prompts = [p for p, _ in rows[i : i + size]]
            prompts += [rows[0][0]] * (size - len(prompts))  # fixed shape: one compile
            mine = self._mine(list(enumerate(prompts, start=i)))
            tokens, mask = self.sample(
                model,
                [p for _, p in mine],
                new,
                settings,
                jax.random.fold_in(key, i // size),
                ngram,
            )
            done = offpolicy.cut_at_eos(distributed.local_rows(tokens), distributed.local_rows(mask))
            out += [(j, o) for (j, _), o in zip(mine, done, strict=True) if j < len(rows)]
        if jax.process_count() > 1:  # every process scores all rows
            out = [tuple(x) for part in distributed.gather_objects(out) for x in part]
        return [o for _, o in sorted(out)]

    def validation_losses(self, eval_step: Callable, params, teacher_state) -> dict:
        """Token-level means over the validation rows: ``val_ce`` (and ``val_<divergence>``)."""
        sums: dict = {}
        for b, _ in self.fixed_batches(self.valid_rows, self.config.eval.batch_size):
            out = eval_step(params, teacher_state, self.to_devices(b))
            sums = {k: sums.get(k, 0.0) + v for k, v in out.items()}
        sums = jax.device_get(sums)
        tokens = max(float(sums.pop("tokens")), 1.0)
        return {"val_" + k.removesuffix("_sum"): float(v) / tokens for k, v in sums.items()}

    def metric(self, model: nnx.Module, seed: int, *, final: bool = False) -> float:
        """The task's metric (ROUGE-L or BLEU) of ``model``'s generations on the validation rows, sampled
        with ``eval.*``. Only a ``final`` evaluation (the test stage, ``launch/evaluate.py``) bans
        repeated ``eval.no_repeat_ngram_size``-grams: the evaluations that pick ``best/`` sample without
        the ban, as the official code does (docs/method.md)."""
        e = self.config.eval
        ngram = e.no_repeat_ngram_size if final else 0
        outs = self.generate_texts(model, self.valid_rows, e, seed=seed, ngram=ngram)
        preds = self.tokenizer.batch_decode(outs, skip_special_tokens=True)
        return evaluation.METRICS[self.task.metric](preds, self.valid_refs)

    # ----------------------------------------------------------------------------------------------
    # SeqKD data

    def seqkd_rows(self) -> list:
        """The teacher's responses to the training prompts, generated once and cached in the run folder."""
        return self.responses(self.teacher, "seqkd_train.jsonl", self.config.seqkd)

    def distillm2_rows(self) -> list:
        """(prompt, teacher's response, initial student's response) for every training prompt: DistiLLM-2's
        data, both responses generated once with DistiLLM-2's own sampling (``distillm2.temperature`` /
        ``top_p``, as its official generation: 0.8 / 0.95, no n-gram ban) and cached in the run folder."""
        settings = ConfigDict({**self.config.distillm2.to_dict(), "top_k": 0})
        teacher = self.responses(self.teacher, "distillm2_teacher.jsonl", settings)
        student = self.responses(self.student, "distillm2_student.jsonl", settings)
        return [(p, t, s) for (p, t), (_, s) in zip(teacher, student, strict=True)]

    def training_batch(self, rows: list) -> dict:
        """A training batch of (prompt, response) rows; of (prompt, teacher response, student response)
        rows (DistiLLM-2) the teacher-output batch with the student-output batch under ``"sgo"``."""
        if rows and len(rows[0]) == 3:
            b = self.batch([(p, t) for p, t, _ in rows])
            b["sgo"] = self.batch([(p, s) for p, _, s in rows])
            return b
        return self.batch(rows)

    def responses(self, model: nnx.Module, name: str, settings: ConfigDict) -> list:
        """``model``'s responses to the training prompts as (prompt, response) rows, sampled with
        ``settings`` (temperature, top_k, top_p; the model's own samples: no n-gram ban, which belongs to
        the evaluation protocol only), generated once and cached in ``run_dir/name``."""
        path = os.path.join(self.config.run_dir, name)
        if os.path.exists(path):
            with open(path) as f:
                return [tuple(json.loads(line)) for line in f]
        outs = self.generate_texts(model, self.train_rows, settings, seed=self.config.seed)
        eos = self.tokenizer.eos_token_id
        rows = [(p, [int(t) for t in o] or [eos]) for (p, _), o in zip(self.train_rows, outs, strict=True)]
        if jax.process_index() == 0:
            os.makedirs(self.config.run_dir, exist_ok=True)
            with open(path + ".tmp", "w") as f:
                f.writelines(json.dumps([[int(t) for t in p], r]) + "\n" for p, r in rows)
            os.replace(path + ".tmp", path)
        return rows


def _loss_config(c: ConfigDict) -> step.LossConfig:
    method = methods.get(c.method)
    return step.LossConfig(
        divergence=c.loss.name,
        kd_ratio=float(c.loss.kd_ratio) if method.teacher else 0.0,
        params=tuple(cfglib.loss_params(c).items()),
        lm_coef=float(c.loss.lm_coef),
        lm_kd_ratio=float(c.loss.lm_kd_ratio),
        chunk_size=int(c.loss.chunk_size),
        objective=method.objective,
        distillm2_beta=float(c.distillm2.beta),
        minillm=minillm.Settings(
            **{f.name: float(c.minillm[f.name]) for f in dataclasses.fields(minillm.Settings)}
        ),
    )


def _export(model: nnx.Module, tokenizer, out_dir: str, *, peft: bool = False) -> None:
    """An HF checkpoint written beside ``out_dir`` and renamed into place, so a reader never sees half.
    A LoRA student is written with its adapters merged into the weights; with ``peft`` its adapters are
    also written in PEFT's layout to ``out_dir/adapter``."""
    if jax.process_count() > 1:  # params are sharded over hosts: every process gathers, one writes
        graph, state = nnx.split(model)
        model = nnx.merge(graph, jax.tree.map(distributed.gather, state))
    if jax.process_index() != 0:
        return
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    adapters = lora.has_adapters(model)
    models.save_pretrained(lora.merged(model) if adapters else model, tmp, tokenizer=tokenizer)
    if adapters and peft:
        lora.save_peft(model, os.path.join(tmp, "adapter"))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def optimizer(c: ConfigDict, total: int):
    """The run's AdamW from ``c.optim`` over ``total`` updates."""
    o = c.optim
    return step.make_optimizer(
        o.lr,
        total,
        weight_decay=o.weight_decay,
        end_lr=o.end_lr,
        warmup_steps=o.warmup_steps,
        clip=o.clip,
        grad_accum=o.grad_accum,
        b2=o.b2,
    )


DRAW_SEED_STRIDE = 1_000_003  # a prime past any step count: no two evaluations' draws share a seed


def _signal_here(at: int) -> signal.Signals | None:
    """``DISTILLM_KILL_AT_STEP`` (and, with several processes, ``DISTILLM_KILL_PROCESS``): the tests'
    way to signal a run at a step — ``DISTILLM_KILL_SIGNAL`` KILL (the default: a preemption without
    notice), TERM (a preemption notice) or INT (Ctrl-C)."""
    if os.environ.get("DISTILLM_KILL_AT_STEP") != str(at):
        return None
    only = os.environ.get("DISTILLM_KILL_PROCESS")
    if only is not None and only != str(jax.process_index()):
        return None
    return signal.Signals["SIG" + os.environ.get("DISTILLM_KILL_SIGNAL", "KILL")]


def _finite(rows: list[dict]) -> int | None:
    """Index of the first row with a non-finite value, if any."""
    for i, r in enumerate(rows):
        if not all(np.isfinite(v) for v in r.values()):
            return i
    return None


def _feeder(r: Run, c: ConfigDict, total: int, next_rows: Callable, model_of: Callable) -> offpolicy.Feeder:
    """Where each step's rows come from: ground truth for sft / kd / seqkd; for the SGO methods the
    student's own samples as well, through a generation worker (docs/method.md)."""
    o = c.offpolicy
    worker, method = None, methods.get(c.method)
    if method.sgo:
        new = o.max_new_tokens or r.lengths.max_response

        def sample(params, prompts, key):
            return r.sample(model_of(params), prompts, new, o, key)

        worker = offpolicy.GenerationWorker(sample, threaded=o.overlap)
    return offpolicy.Feeder(
        method.strategy or offpolicy.ground_truth,
        offpolicy.AdaptiveScheduler(o.loss_eps, o.replay_ratio, phi=o.init_phi),
        offpolicy.ReplayBuffer(max(o.capacity // r.num_shards, 1), r.shards),
        worker,
        next_rows,
        seed=c.seed,
        total=total,
        micro_batches=c.optim.grad_accum,
        lookahead=o.max_staleness if o.overlap else 0,
        gkd_lambda=o.gkd_lambda,
    )


def _rollouts(
    r: Run, c: ConfigDict, next_rows: Callable, model_of: Callable, teacher_state
) -> minillm.Rollouts:
    """MiniLLM's rollout rounds: ``minillm.rollouts`` prompts a round, sampled a micro-batch at a time
    from the teacher-mixed policy with ``offpolicy.*`` settings, scored once by the student that sampled
    them and the teacher."""
    o, new = c.offpolicy, c.offpolicy.max_new_tokens or r.lengths.max_response
    mix = (r.teacher, float(c.minillm.mix_alpha))
    worker = offpolicy.GenerationWorker(
        lambda params, prompts, key: r.sample(model_of(params), prompts, new, o, key, mix=mix), threaded=False
    )
    score_step = step.make_score_step(r.student, r.teacher)

    def score(params, rows):
        out = score_step(params, teacher_state, r.to_devices(r.batch(rows)))
        return tuple(np.asarray(distributed.local_rows(x), np.float32) for x in out)

    opt = c.optim
    return minillm.Rollouts(
        c.minillm.ppo_epochs,
        c.minillm.rollouts // (opt.batch_size // opt.grad_accum),
        opt.grad_accum,
        worker.submit,
        score,
        next_rows,
        seed=c.seed,
        shards=r.shards,
    )


def _host_metrics(
    infos: list[dict], seconds: float, sgo_lengths: list, hosts: float = 1.0, adaptive: bool = False
) -> dict:
    """The SGO metrics of a logging interval: φ (``adaptive``: DistiLLM's scheduler; the others have
    none), the share of each batch source, the buffer size, the mean SGO length, and the seconds the loop
    was blocked on generation (paper mode: all of it; overlap mode: what training did not hide) out of the
    interval's wall-clock."""
    out = {
        "buffer": infos[-1]["buffer"] * hosts,  # rows in all hosts' buffers (each holds the same count)
        "gen_s": sum(i["gen_s"] for i in infos),
        "interval_s": seconds,
    }
    if adaptive:
        out["phi"] = infos[-1]["phi"]
    for source in ("data", "sgo", "replay"):
        out[f"src_{source}"] = float(np.mean([i["source"] == source for i in infos]))
    if sgo_lengths:  # every host's (equal-sized) SGO batches
        out["sgo_len"] = float(np.mean(sgo_lengths))
    return out


def train(config: ConfigDict, *, stage: str = "") -> dict:
    """One run: returns its summary (also written to ``run_dir/summary.json``); ``stage`` names it on
    the progress bar (the pipeline's stage)."""
    preflight.mesh_and_batch(config)  # before any model loads: a mistake costs seconds
    preflight.run_dir(config)
    r = Run(config)
    c = config
    lead = jax.process_index() == 0
    loss_cfg = _loss_config(c)
    method = methods.get(c.method)
    if method.rows == "seqkd":
        rows = r.seqkd_rows()
    elif method.rows == "distillm2":
        rows = r.distillm2_rows()  # (prompt, teacher response, student response)
    else:
        rows = r.train_rows
    updates_per_epoch = len(rows) // c.optim.batch_size
    if method.rows == "rollouts":  # an epoch of prompts: every rollout trains ppo_epochs steps' worth
        updates_per_epoch *= c.minillm.ppo_epochs
    total = c.optim.epochs * updates_per_epoch if c.optim.epochs else c.optim.steps
    eval_every = c.eval.interval or updates_per_epoch
    save_every = c.checkpoint.interval or eval_every
    tx = optimizer(c, total)
    s_graph, _, s_rest = step.split_student(r.student)
    train_step, params, opt_state = step.make_train_step(r.student, r.teacher, tx, loss_cfg)
    eval_step = step.make_eval_step(r.student, r.teacher, loss_cfg)
    teacher_state = None if r.teacher is None else nnx.state(r.teacher)
    order = batching.BatchOrder(len(rows), r.micro, c.seed, shards=r.shards, num_shards=r.num_shards)
    lm_order = None
    if r.lm_rows is not None:
        lm_order = batching.BatchOrder(
            len(r.lm_rows), r.micro, c.seed + 1, shards=r.shards, num_shards=r.num_shards
        )

    def model_of(p) -> nnx.Module:
        return nnx.merge(s_graph, p, s_rest)

    batches = iter(order)
    feeder = _feeder(r, c, total, lambda: [rows[i] for i in next(batches)], model_of)
    sgo = method.sgo
    rollouts = None
    if method.rows == "rollouts":
        rollouts = _rollouts(r, c, lambda: [rows[i] for i in next(batches)], model_of, teacher_state)
    lo = c.student.lora
    dropout_key = jax.random.key(c.seed + 0xD0) if lo.rank and lo.dropout else None
    peft = bool(c.student.lora.peft)

    ckpt = Checkpoints(os.path.join(c.run_dir, "checkpoints"), keep=c.checkpoint.keep)
    run_state = runstate.RunState()
    latest = ckpt.latest_step() if c.resume else None  # preflight.run_dir: none there unless resume
    if latest is not None:
        params, opt_state, saved = ckpt.restore(latest, params, opt_state)
        try:
            run_state = runstate.RunState.from_json(saved)
            if run_state.feeder is not None:
                feeder.load(run_state.feeder)
            if rollouts is not None and run_state.rollout is not None:
                rollouts.load(run_state.rollout)
        except ValueError as e:
            ckpt.close()
            raise cfglib.ConfigError(f"cannot resume {c.run_dir}: {e}") from None
        if lead:
            print(f"resumed {c.run_dir} at step {run_state.step} of {total}")
    order.position = tuple(run_state.order)
    if lm_order is not None:
        lm_order.position = tuple(run_state.lm_order)
    higher_better = c.eval.generate
    key_metric = r.task.metric if c.eval.generate else "val_ce"

    def evaluate(p, at: int) -> dict:
        metrics = r.validation_losses(eval_step, p, teacher_state)
        if c.eval.generate:  # eval.draws sampled generations of the validation rows, each its own seed
            seeds = [c.seed * 1000 + at + DRAW_SEED_STRIDE * k for k in range(c.eval.draws)]
            scores = [r.metric(model_of(p), seed=s) for s in seeds]
            metrics[r.task.metric] = float(np.mean(scores))
            if len(scores) > 1:
                metrics[r.task.metric + "_std"] = float(np.std(scores))
        return metrics

    reporter = reporting.Reporter(
        c.run_dir, total, run_state.step, desc=stage or os.path.basename(c.run_dir) or "train"
    )
    stop = {"signal": None}  # SIGTERM (a preemption notice) or Ctrl-C on any host: save and stop, together

    def on_signal(sig, frame):
        if stop["signal"] is not None and sig == signal.SIGINT:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        stop["signal"] = sig
        if lead and sig == signal.SIGINT:
            reporter.bar.write("Ctrl-C: saving at the end of this step, then stopping (again: stop at once)")

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def save(at: int) -> None:
        feeders = distributed.gather_objects(feeder.state())  # each host's buffer shards
        run_state.step, run_state.order = at, list(order.position)
        run_state.feeder = offpolicy.merge_states(feeders)
        if rollouts is not None:
            run_state.rollout = minillm.merge_states(distributed.gather_objects(rollouts.state()))
        if lm_order is not None:
            run_state.lm_order = list(lm_order.position)
        ckpt.save(at, params, opt_state, run_state.to_json())

    def after_eval(at: int, metrics: dict) -> None:
        extra = {"train_s": run_state.train_seconds}
        if method.adaptive:  # the adaptive scheduler reads every evaluation's validation CE
            before = feeder.scheduler.phi
            feeder.scheduler.update(metrics["val_ce"])
            if feeder.scheduler.phi != before:
                run_state.phi_path = [*run_state.phi_path, [at, feeder.scheduler.phi]]
            extra["phi"] = feeder.scheduler.phi
        reporter.log(at, "eval", {**metrics, **extra})
        run_state.last_eval = metrics
        value = metrics[key_metric]
        best = run_state.best
        if best is None or (value > best if higher_better else value < best):
            run_state.best, run_state.best_step = value, at
            _export(model_of(params), r.tokenizer, os.path.join(c.run_dir, "best"), peft=peft)

    start, stopping = time.time(), False
    try:
        if run_state.initial is None:
            run_state.initial = evaluate(params, 0)
            after_eval(0, run_state.initial)
        at = run_state.step
        pending, infos, tokens, t0 = [], [], 0, time.time()
        clock = time.perf_counter()
        lm_batches = iter(lm_order) if lm_order is not None else None
        while at < total:
            if rollouts is not None:
                parts, info = rollouts.for_step(at, params)
                micro_rows = [rows for rows, _ in parts]
            else:
                micro_rows, info = feeder.rows_for(at, params)
            infos.append(info)
            run_state.sources[info["source"]] += 1
            run_state.gen_seconds += info["gen_s"]
            run_state.gen_total_seconds += info.get("gen_total_s", info["gen_s"])
            for micro, mrows in enumerate(micro_rows):
                b = r.training_batch(mrows)
                if rollouts is not None:
                    b["old_logp"], b["teacher_logp"] = parts[micro][1]
                tokens += sum(int(b[k].sum()) for k in ("attention_mask", "decoder_attention_mask") if k in b)
                if lm_batches is not None:
                    lm = [r.lm_rows[i] for i in next(lm_batches)]
                    b["lm"] = batching.text_batch(lm, c.data.max_length, r.pad)
                key = None
                if dropout_key is not None:  # LoRA dropout: a key per micro-batch, the same on a resume
                    key = jax.random.fold_in(dropout_key, at * c.optim.grad_accum + micro)
                params, opt_state, m = train_step(params, opt_state, teacher_state, r.to_devices(b), key)
                pending.append(m)
            at += 1
            reporter.advance()
            sig = _signal_here(at)  # fault injection for the resume, stop and lost-process tests
            if sig is not None:
                if sig == signal.SIGKILL:
                    ckpt.manager.wait_until_finished()
                os.kill(os.getpid(), sig)
            due_eval, due_save = at % eval_every == 0 or at == total, at % save_every == 0 or at == total
            stopping = False
            if (
                at % c.log_interval == 0
                or due_eval
                or due_save
                or (stop["signal"] and jax.process_count() == 1)
            ):
                news = {
                    "stop": stop["signal"] is not None,
                    "tokens": tokens,
                    "sgo_len": [i["sgo_len"] for i in infos if "sgo_len" in i],
                }
                hosts = distributed.gather_objects(news)  # what each host alone knows
                stopping = any(h["stop"] for h in hosts)
                rows_m = jax.device_get(pending)
                bad = _finite(rows_m)
                if bad is not None:
                    bad_step = at - len(pending) // c.optim.grad_accum + bad // c.optim.grad_accum + 1
                    last = ckpt.latest_step()
                    where = f"{ckpt.path(last)} (step {last})" if last is not None else "none yet"
                    bad_row = rows_m[bad].items()
                    values = ", ".join(f"{k} {float(v)}" for k, v in bad_row if not np.isfinite(v))
                    raise TrainingError(
                        f"non-finite training metrics at step {bad_step} ({values}): lower optim.lr or "
                        f"check the data; last good checkpoint: {where}"
                    )
                mean = {k: float(np.mean([row[k] for row in rows_m])) for k in rows_m[0]}
                mean["tokens_per_s"] = sum(h["tokens"] for h in hosts) / max(time.time() - t0, 1e-9)
                if sgo:
                    lengths = [x for h in hosts for x in h["sgo_len"]]
                    hosts_share = r.num_shards / len(r.shards)
                    mean.update(_host_metrics(infos, time.time() - t0, lengths, hosts_share, method.adaptive))
                reporter.log(at, "train", mean)
                pending, infos, tokens, t0 = [], [], 0, time.time()
            if due_eval or due_save or stopping:  # training wall-clock, evaluation and saving left out
                jax.block_until_ready(params)
                run_state.train_seconds += time.perf_counter() - clock
                if due_eval:
                    after_eval(at, evaluate(params, at))
                if due_save or stopping:
                    save(at)
                clock = time.perf_counter()
            if stopping:
                if lead:
                    why = signal.Signals(stop["signal"]).name if stop["signal"] else "another process"
                    print(f"stopped by {why} at step {at}; saved; the same command continues it")
                break
    finally:
        ckpt.close()
        reporter.close()
        if feeder.worker is not None:
            feeder.worker.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopping:
        return {"stopped_at": at}
    _export(model_of(params), r.tokenizer, os.path.join(c.run_dir, "final"), peft=peft)
    final = run_state.last_eval
    summary = {
        "run_dir": c.run_dir,
        "method": c.method,
        "loss": loss_cfg.divergence if loss_cfg.kd_ratio else "ce",
        "steps": total,
        "metric": key_metric,
        "initial": run_state.initial,
        "final": final,
        "best": run_state.best,
        "best_step": run_state.best_step,
        "seconds": time.time() - start,
        "train_seconds": run_state.train_seconds,
        "gen_seconds": run_state.gen_seconds,
        "sources": run_state.sources,
    }
    if sgo:
        summary["phi"] = feeder.scheduler.phi
        summary["phi_path"] = run_state.phi_path
        summary["buffer"] = [len(feeder.buffer) * r.num_shards // len(r.shards), c.offpolicy.capacity]
        summary["gen_total_seconds"] = run_state.gen_total_seconds
    if lead:
        with open(os.path.join(c.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        reporting.plot_curves(c.run_dir)
        print(_summary_table(summary))
        if sgo:
            print(scheduler_line(summary))
    return summary


def scheduler_line(s: dict) -> str:
    """One line that says whether student-generated outputs were used, and how: φ's path, steps per
    batch source, the replay buffer's fill, and the generation time hidden behind training."""
    src = s["sources"]
    hidden = s["gen_total_seconds"] - s["gen_seconds"]
    phi = ""
    if methods.get(s["method"]).adaptive:  # the adaptive scheduler's path
        path = " → ".join(["0"] + [f"{phi:g} at step {at}" for at, phi in s["phi_path"]])
        phi = f"φ {path} (final {s['phi']:g}); "
    return (
        f"{s['method']} SGOs: {phi}steps on data {src['data']}, fresh SGOs "
        f"{src['sgo']}, replayed {src['replay']}; buffer {s['buffer'][0]} of {s['buffer'][1]} rows; "
        f"generation {s['gen_total_seconds']:.1f} s, {max(hidden, 0.0):.1f} s of it hidden behind training"
    )


def _summary_table(s: dict) -> str:
    keys = sorted(set(s["initial"]) | set(s["final"]))
    rows = [("", "before", "after")] + [
        (k, f"{s['initial'].get(k, float('nan')):.4f}", f"{s['final'].get(k, float('nan')):.4f}")
        for k in keys
    ]
    head = f"{s['run_dir']}: {s['method']} ({s['loss']}), {s['steps']} steps in {s['seconds']:.0f} s; "
    head += f"best {s['metric']} {s['best']:.4f} at step {s['best_step']} (exported to best/)"
    return head + "\n" + reporting.table(rows)


def override(config: ConfigDict, **changes) -> ConfigDict:
    """A copy of ``config`` with ``changes`` applied; nested keys are spelled with ``__``
    (``optim__lr=1e-4``)."""
    out = ConfigDict(config.to_dict())
    for dotted, value in changes.items():
        node = out
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return out


def evaluate_model(config: ConfigDict, seeds: tuple[int, ...]) -> dict:
    """The validation CE of ``config.student`` and its task metric (ROUGE-L / BLEU) for each sampling
    seed: ``{"val_ce", "<metric>": mean, "<metric>_std", "scores"}``."""
    r = Run(config, evaluate_only=True)
    eval_step = step.make_eval_step(r.student, None, step.LossConfig(kd_ratio=0.0))
    out = r.validation_losses(eval_step, step.split_student(r.student)[1], None)
    scores = [r.metric(r.student, s, final=True) for s in seeds]
    name = r.task.metric
    return {**out, name: float(np.mean(scores)), f"{name}_std": float(np.std(scores)), "scores": scores}


def export_checkpoint(config: ConfigDict, at: int | None = None, out_dir: str | None = None) -> str:
    """Write the student of ``config.run_dir``'s checkpoint ``at`` (default: the latest) as an HF
    checkpoint; returns its directory."""
    cfglib.check(config)
    ckpt = Checkpoints(os.path.join(config.run_dir, "checkpoints"), keep=config.checkpoint.keep)
    try:
        steps = ckpt.manager.all_steps()
        if not steps:
            raise cfglib.ConfigError(f"{config.run_dir} has no checkpoints")
        at = max(steps) if at is None else at
        if at not in steps:
            raise cfglib.ConfigError(
                f"no checkpoint at step {at} in {config.run_dir}; it has {sorted(steps)}"
            )
        mesh = sharding.make_mesh(**config.mesh)
        student = build_model(config.student, mesh, trainable=True)
        graph, params, rest = step.split_student(student)
        tx = optimizer(config, 1)
        params, _, _ = ckpt.restore(at, params, step.init_opt_state(tx, params))
    finally:
        ckpt.close()
    tokenizer = toklib.load(config.tokenizer, config.student.path)
    out_dir = out_dir or os.path.join(config.run_dir, f"export-{at}")
    _export(nnx.merge(graph, params, rest), tokenizer, out_dir, peft=bool(config.student.lora.peft))
    return out_dir
