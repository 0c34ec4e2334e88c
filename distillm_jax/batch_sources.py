"""Where each training step's micro-batches come from, for any method (``methods.Method.rows``):

- ground truth, or the SeqKD / DistiLLM-2 caches (the models' responses to the training prompts,
  sampled once and kept in the run folder), each step through an ``offpolicy.Feeder`` — which, for the
  SGO methods, also picks fresh student samples or a replayed sample (``Feed``);
- MiniLLM's rollout rounds (``Rollouts``);
- the plain text of the LM loss, beside either (``LMText``).

A source gives the loop device batches and saves what a resumed run needs into the ``RunState``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from distillm_jax import distributed, minillm, offpolicy, step
from distillm_jax.data import batching
from distillm_jax.run import Run
from distillm_jax.runstate import RunState
from distillm_jax.settings import Sampling


def cached_responses(run: Run, model: nnx.Module, name: str, sampling: Sampling) -> list:
    """``model``'s responses to the training prompts as (prompt, response) rows, sampled with
    ``sampling`` (the model's own samples: no n-gram ban, which belongs to the evaluation protocol
    only), generated once and cached in ``run_dir/name``."""
    s = run.settings
    path = os.path.join(s.run_dir, name)
    if os.path.exists(path):
        with open(path) as f:
            return [tuple(json.loads(line)) for line in f]
    outs = run.sampler.responses(
        model,
        run.train_rows,
        sampling,
        batch_size=s.eval.batch_size,
        new=s.new_tokens(s.eval),
        seed=s.seed,
    )
    eos = run.tokenizer.eos_token_id
    rows = [(p, [int(t) for t in o] or [eos]) for (p, _), o in zip(run.train_rows, outs, strict=True)]
    if jax.process_index() == 0:
        os.makedirs(s.run_dir, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps([[int(t) for t in p], r]) + "\n" for p, r in rows)
        os.replace(path + ".tmp", path)
    return rows


def seqkd_rows(run: Run) -> list:
    """The teacher's responses to the training prompts (SeqKD's data), sampled with ``seqkd.*``."""
    return cached_responses(run, run.teacher, "seqkd_train.jsonl", run.settings.seqkd)


def distillm2_rows(run: Run) -> list:
    """(prompt, teacher's response, initial student's response) for every training prompt: DistiLLM-2's
    data, both sampled once with its own settings (``distillm2.temperature`` / ``top_p``: its official
    generation's 0.8 / 0.95, no n-gram ban) and cached in the run folder."""
    sampling = run.settings.distillm2
    teacher = cached_responses(run, run.teacher, "distillm2_teacher.jsonl", sampling)
    student = cached_responses(run, run.student, "distillm2_student.jsonl", sampling)
    return [(p, t, s) for (p, t), (_, s) in zip(teacher, student, strict=True)]


def training_rows(run: Run) -> list:
    """The rows a method's epochs go over (``Method.rows``): ground truth, or a cache."""
    rows = run.settings.method.rows
    return (
        seqkd_rows(run) if rows == "seqkd" else distillm2_rows(run) if rows == "distillm2" else run.train_rows
    )


def host_batch(run: Run, rows: list) -> dict:
    """A batch of (prompt, response) rows; of (prompt, teacher response, student response) rows
    (DistiLLM-2) the teacher-output batch with the student-output batch under ``"sgo"``."""
    if rows and len(rows[0]) == 3:
        return {
            **run.batches.host([(p, t) for p, t, _ in rows]),
            "sgo": run.batches.host([(p, s) for p, _, s in rows]),
        }
    return run.batches.host(rows)


class Ordered:
    """Rows taken a micro-batch at a time in a seeded, resumable order (``order.position`` is what a
    checkpoint keeps): each host reads only its data shards' rows."""

    def __init__(self, run: Run, rows, seed: int):
        b = run.batches
        self.run, self.rows = run, rows
        self.order = batching.BatchOrder(
            len(rows), run.settings.optim.micro, seed, shards=b.shards, num_shards=b.num_shards
        )
        self._indices = iter(self.order)  # reads order.position at the first call: set it before

    def next_rows(self) -> list:
        return [self.rows[i] for i in next(self._indices)]


class Source(Ordered):
    """A method's batches: ``for_step(index, params)`` gives step ``index``'s micro-batches on the
    devices; its stateful part (the feeder, the rollouts) is the attribute named ``field``, as is the
    ``RunState`` field that keeps what a resumed run needs, every host's shards merged by ``merge``."""

    field: str
    merge: Callable

    def save(self, state: RunState) -> None:
        kept = getattr(self, self.field).state()
        setattr(state, self.field, type(self).merge(distributed.gather_objects(kept)))

    def load(self, state: RunState) -> None:
        saved = getattr(state, self.field)
        if saved is not None:
            getattr(self, self.field).load(saved)

    def close(self) -> None:
        """Stop the source's threads, if any."""


def _placed(run: Run, b: dict) -> tuple[dict, int]:
    """A host batch on the devices, and its real tokens."""
    tokens = sum(int(b[k].sum()) for k in ("attention_mask", "decoder_attention_mask") if k in b)
    return run.batches.to_devices(b), tokens


class Feed(Source):
    """Ground truth, a cache, or (SGO methods) the student's samples: an ``offpolicy.Feeder`` over the
    rows' order, its fresh SGOs sampled by a ``GenerationWorker`` and kept on the devices."""

    field, merge = "feeder", offpolicy.merge_states

    def __init__(self, run: Run, rows: list, model_of: Callable, total: int):
        super().__init__(run, rows, run.settings.seed)
        s = run.settings
        o, worker = s.sgo, None
        if s.method.sgo:
            new = s.new_tokens(o)
            worker = offpolicy.GenerationWorker(
                lambda params, prompts, key: run.sampler.sgo(model_of(params), prompts, new, o.sampling, key),
                threaded=o.overlap,
            )
        self.feeder = offpolicy.Feeder(
            s.method.strategy or offpolicy.ground_truth,
            offpolicy.AdaptiveScheduler(o.loss_eps, o.replay_ratio, phi=o.init_phi),
            offpolicy.ReplayBuffer(max(o.capacity // run.batches.num_shards, 1), run.batches.shards),
            worker,
            self.next_rows,
            seed=s.seed,
            total=total,
            micro_batches=s.optim.grad_accum,
            lookahead=o.max_staleness if o.overlap else 0,
            gkd_lambda=o.gkd_lambda,
        )

    def for_step(self, index: int, params) -> tuple[list[tuple[dict, object]], dict]:
        """Step ``index``'s micro-batches on the devices, each with its real tokens (an int, or a device
        scalar for fresh SGOs), and the step's info (``offpolicy.Feeder.rows_for``)."""
        micro, info = self.feeder.rows_for(index, params)
        out = []
        for m in micro:
            if isinstance(m, offpolicy.Pending):
                out.append((m.sampled.batch, m.sampled.stats["tokens"]))
            else:
                out.append(_placed(self.run, host_batch(self.run, m)))
        return out, info

    def close(self) -> None:
        if self.feeder.worker is not None:
            self.feeder.worker.close()


class Rollouts(Source):
    """MiniLLM's rollout rounds (``minillm.Rollouts``) on the training prompts: ``minillm.rollouts``
    prompts a round, sampled a micro-batch at a time from the teacher-mixed policy with ``offpolicy.*``
    settings, scored once by the student that sampled them and the teacher."""

    field, merge = "rollout", minillm.merge_states

    def __init__(self, run: Run, rows: list, model_of: Callable, teacher_state):
        super().__init__(run, rows, run.settings.seed)
        s = run.settings
        new, mix = s.new_tokens(s.sgo), (run.teacher, s.rollouts.mix_alpha)
        worker = offpolicy.GenerationWorker(
            lambda params, prompts, key: run.sampler.sample(
                model_of(params), prompts, new, s.sgo.sampling, key, mix=mix
            ),
            threaded=False,
        )
        score_step = step.make_score_step(run.student, run.teacher)

        def score(params, rows):
            out = score_step(params, teacher_state, run.batches.to_devices(run.batches.host(rows)))
            return tuple(np.asarray(distributed.local_rows(x), np.float32) for x in out)

        self.rollout = minillm.Rollouts(
            s.rollouts.ppo_epochs,
            s.rollouts.rollouts // s.optim.micro,
            s.optim.grad_accum,
            worker.submit,
            score,
            self.next_rows,
            seed=s.seed,
            shards=run.batches.shards,
        )

    def for_step(self, index: int, params) -> tuple[list[tuple[dict, int]], dict]:
        parts, info = self.rollout.for_step(index, params)
        out = []
        for rows, (old_logp, teacher_logp) in parts:
            out.append(
                _placed(
                    self.run,
                    {**self.run.batches.host(rows), "old_logp": old_logp, "teacher_logp": teacher_logp},
                )
            )
        return out, info


def make(run: Run, rows: list, total: int, model_of: Callable, teacher_state) -> Feed | Rollouts:
    """The method's source over ``rows`` (``training_rows``); ``model_of(params)`` is the student."""
    if run.settings.method.rows == "rollouts":
        return Rollouts(run, rows, model_of, teacher_state)
    return Feed(run, rows, model_of, total)


class LMText(Ordered):
    """The LM loss's plain text (``data.lm_source``): a micro-batch of it beside every training one,
    in its own seeded order."""

    def __init__(self, run: Run):
        super().__init__(run, run.lm_rows, run.settings.seed + 1)

    def next(self) -> dict:
        length = self.run.settings.data.lengths.max_length
        return self.run.batches.to_devices(
            batching.text_batch(self.next_rows(), length, self.run.batches.pad)
        )
