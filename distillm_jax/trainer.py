"""One training run (``train``): feed → step → log | evaluate | save, each at its interval, resumable
from any checkpoint; ``pipeline.py`` chains the runs of the paper's pipeline around it.

A method is one object of ``methods.Method``'s protocol: the loop asks it for its rows, its batch source
(ground truth, a cache, the SGO feeder, MiniLLM's rollouts), and what follows an evaluation (DistiLLM's
φ); its loss is inside the train step. The run's pieces are built once by ``run.Run``; the loop's own
pieces (intervals, stop requests, log rows) live in ``loop.py``. Step counts are optimizer updates;
with ``optim.grad_accum > 1`` each update runs that many micro-batches.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from distillm_jax import config as cfglib
from distillm_jax import reporting, step, storage
from distillm_jax.config import preflight
from distillm_jax.loop import Interval, Schedule, StopRequest, TrainingError, inject_fault
from distillm_jax.methods import sources
from distillm_jax.models import dropout
from distillm_jax.run import lock as runlock
from distillm_jax.run import state as runstate
from distillm_jax.run.build import Run, build_model
from distillm_jax.run.checkpoints import Checkpoints
from distillm_jax.run.export import export_checkpoint, export_model
from distillm_jax.run.folder import RunDir
from distillm_jax.validation import DRAW_SEED_STRIDE

__all__ = [
    "DRAW_SEED_STRIDE",
    "Run",
    "TrainingError",
    "build_model",
    "evaluate_model",
    "export_checkpoint",
    "override",
    "train",
]


class Student:
    """The student as the loop trains it: params and optimizer state (donated to every step), the
    jitted train and eval steps, and the teacher's state they read."""

    def __init__(self, run: Run, total: int):
        s = run.settings
        self.graph, _, self.rest = step.split_student(run.student)
        self.train_step, self.params, self.opt_state = step.make_train_step(
            run.student, run.teacher, s.optim.adamw(total), s.loss
        )
        self.eval_step = step.make_eval_step(run.student, run.teacher, s.loss)
        self.teacher_state = None if run.teacher is None else nnx.state(run.teacher)
        # The student's dropout (its family's sites, its LoRA adapters'), as its method trains: a key per
        # micro-batch.
        on = s.method.dropout and dropout.active(run.student)
        self.dropout_key = jax.random.key(s.seed + 0xD0) if on else None
        self.accum = s.optim.grad_accum

    def model(self, params=None) -> nnx.Module:
        return nnx.merge(self.graph, self.params if params is None else params, self.rest)

    def export(self, run: Run, path: str) -> None:
        """The student as an HF checkpoint (and its adapters in PEFT's layout when asked) at ``path``."""
        export_model(self.model(), run.tokenizer, path, peft=run.settings.student.lora.peft)

    def update(self, batch: dict, done: int, micro: int) -> dict:
        """One micro-batch of update ``done`` + 1 (``done``: updates so far); dropout draws a key per
        micro-batch from (seed, update, micro-batch): the same on a resume."""
        key = (
            None
            if self.dropout_key is None
            else jax.random.fold_in(self.dropout_key, done * self.accum + micro)
        )
        self.params, self.opt_state, metrics = self.train_step(
            self.params, self.opt_state, self.teacher_state, batch, key
        )
        return metrics


def train(config: ConfigDict, *, stage: str = "") -> dict:
    """One run: returns its summary (also written to ``run_dir/summary.json``); ``stage`` names it on
    the progress bar. What can be checked before any model loads is checked first (a mistake costs
    seconds): the config, the mesh and batch, the tokenizer and the models' config.json files."""
    cfglib.check(config)
    preflight.mesh_and_batch(config)
    tokens = len(preflight.tokenizers(config))
    preflight.model_configs(config, cfglib.roles(config), tokens)
    return train_checked(config, stage=stage)


def train_checked(config: ConfigDict, *, stage: str = "") -> dict:
    """``train`` of a config whose checks ran already (the pipeline checks every stage's at its start);
    the run folder is held for this process alone while it trains."""
    folder = RunDir(config.run_dir)
    preflight.writable(folder)
    with runlock.hold(folder):
        return _train(config, stage)


def _train(config: ConfigDict, stage: str) -> dict:
    preflight.run_dir(config)
    run = Run(config)
    s = run.settings
    method = s.method
    rows = method.training_rows(run)
    schedule = _schedule(run, len(rows))
    student = Student(run, schedule.total)
    source = method.source(run, rows, schedule.total, student.model, student.teacher_state)
    lm = sources.LMText(run) if run.lm_rows is not None else None
    ckpt = Checkpoints(s.run_dir.checkpoints, keep=s.checkpoint_keep)
    state = _resume(run, ckpt, student, source, lm, schedule.total)
    reporter = reporting.Reporter(
        s.run_dir, schedule.total, state.step, desc=stage or os.path.basename(s.run_dir.path) or "train"
    )
    hosts_share = run.batches.num_shards / len(run.batches.shards)
    interval = Interval(s.optim.grad_accum, sgo=method.sgo, adaptive=method.adaptive, hosts_share=hosts_share)
    done, stopping = state.step, False  # optimizer updates done

    def evaluate(done: int) -> None:  # the validation losses (→ φ), the metric (→ best/)
        metrics = run.validator.evaluate(
            student.eval_step, student.params, student.teacher_state, student.model(), s.seed, done
        )
        _after_eval(run, state, source, student, reporter, done, metrics)

    def save(done: int) -> None:
        state.step, state.order = done, list(source.order.position)
        if lm is not None:
            state.lm_order = list(lm.order.position)
        source.save(state)
        reporter.flush()  # a bucket's metrics.jsonl holds every row up to the checkpoint
        ckpt.save(done, student.params, student.opt_state, state.to_json())

    start, failed = time.time(), False
    try:
        with StopRequest(reporter.write) as stop:
            if state.initial is None:
                evaluate(0)
            clock = time.perf_counter()
            while done < schedule.total:
                micro, info = source.for_step(done, student.params)  # feed
                interval.step(info)
                state.count(info)
                for k, (batch, tokens) in enumerate(micro):  # step
                    if lm is not None:
                        batch = {**batch, "lm": lm.next()}
                    interval.micro(student.update(batch, done, k), tokens)
                done += 1
                reporter.advance()
                inject_fault(done, ckpt.manager.wait_until_finished)
                due_eval, due_save = (
                    schedule.due(done, schedule.eval_every),
                    schedule.due(done, schedule.save_every),
                )
                alone = stop.signal is not None and jax.process_count() == 1
                if schedule.due(done, schedule.log_every) or due_eval or due_save or alone:  # log
                    row, stopping = interval.row(done, stop.signal is not None, ckpt.describe_latest)
                    reporter.log(done, "train", row)
                if due_eval or due_save or stopping:  # the training clock leaves these out
                    jax.block_until_ready(student.params)
                    state.train_seconds += time.perf_counter() - clock
                    if due_eval:
                        evaluate(done)
                    if due_save or stopping:
                        save(done)
                    clock = time.perf_counter()
                if stopping:
                    if jax.process_index() == 0:
                        print(f"stopped by {stop.why()} at step {done}; saved; the same command continues it")
                    return {"stopped_at": done}
    except BaseException:
        failed = True
        raise
    finally:  # (also after the stop's return): checkpoint writes in flight complete, or are removed
        try:
            ckpt.close(failed=failed)  # raises a write's failure (a full disk) ...
        finally:  # ... after which the progress bar still ends its line and the SGO feeder stops
            reporter.close()
            source.close()
    student.export(run, s.run_dir.final)
    return _summary(run, schedule, state, source, time.time() - start)


def _schedule(run: Run, rows: int) -> Schedule:
    """Updates in all (``optim.epochs`` over ``rows``, else ``optim.steps``) and the intervals."""
    s = run.settings
    per_epoch = s.method.updates_per_epoch(rows // s.optim.batch_size, s.own)
    eval_every = s.eval.interval or per_epoch
    return Schedule(
        total=s.optim.epochs * per_epoch if s.optim.epochs else s.optim.steps,
        eval_every=eval_every,
        save_every=s.checkpoint_interval or eval_every,
        log_every=s.log_interval,
    )


def _resume(run: Run, ckpt: Checkpoints, student: Student, source, lm, total: int) -> runstate.RunState:
    """The state of the newest checkpoint that reads when ``resume`` (preflight.run_dir: none there
    otherwise), loaded into the student, the batch source and the data orders; a new state if none."""
    s = run.settings
    state = runstate.RunState()
    latest = ckpt.restore_latest(student.params, student.opt_state) if s.resume else None
    if latest is not None:  # the newest that reads: unreadable newer ones were moved aside, with a warning
        _, student.params, student.opt_state, saved = latest
        try:
            state = runstate.RunState.from_json(saved)
            source.restore(state)
        except ValueError as e:
            ckpt.close()
            raise cfglib.ConfigError(f"cannot resume {s.run_dir}: {e}") from None
        if jax.process_index() == 0:
            print(f"resumed {s.run_dir} at step {state.step} of {total}")
    source.order.position = tuple(state.order)
    if lm is not None:
        lm.order.position = tuple(state.lm_order)
    return state


def _after_eval(run: Run, state, source, student: Student, reporter, done: int, metrics: dict) -> None:
    """An evaluation's consequences: the method's (DistiLLM's φ follows the validation CE), the row is
    logged, and a better key metric exports the student to ``best/``."""
    extra = {"train_s": state.train_seconds, **run.settings.method.after_eval(source, metrics, state, done)}
    reporter.log(done, "eval", {**metrics, **extra})
    state.last_eval = metrics
    if done == 0:
        state.initial = metrics
    value = metrics[run.validator.key_metric]
    if run.validator.better(value, state.best):
        state.best, state.best_step = value, done
        student.export(run, run.settings.run_dir.best)


def _summary(run: Run, schedule: Schedule, state: runstate.RunState, source, seconds: float) -> dict:
    """The run's summary: written to ``summary.json``, printed as a table (and the method's line: for SGO
    methods, how the student's samples were used)."""
    s = run.settings
    summary = {
        "run_dir": s.run_dir.path,
        "method": s.method.name,
        "loss": s.loss.divergence if s.loss.kd_ratio else "ce",
        "steps": schedule.total,
        "metric": run.validator.key_metric,
        "initial": state.initial,
        "final": state.last_eval,
        "best": state.best,
        "best_step": state.best_step,
        "seconds": seconds,
        "train_seconds": state.train_seconds,
        "gen_seconds": state.gen_seconds,
        "sources": state.sources,
    }
    summary.update(s.method.summary(run, source, state))
    if jax.process_index() == 0:
        storage.write(s.run_dir.summary, json.dumps(summary, indent=2))
        reporting.plot_curves(s.run_dir)
        print(reporting.summary_table(summary))
        line = s.method.report(summary)
        if line:
            print(line)
    return summary


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
    seed, with the final evaluation's protocol: ``{"val_ce", "<metric>": mean, "<metric>_std", "scores"}``."""
    preflight.mesh_and_batch(config)
    run = Run(config, evaluate_only=True)
    eval_step = step.make_eval_step(run.student, None, step.LossConfig(kd_ratio=0.0))
    out = run.validator.losses(eval_step, step.split_student(run.student)[1], None)
    scores = [run.validator.metric(run.student, seed, final=True) for seed in seeds]
    name = run.task.metric
    return {**out, name: float(np.mean(scores)), f"{name}_std": float(np.std(scores)), "scores": scores}
