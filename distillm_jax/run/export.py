"""Students written as Hugging Face checkpoints: ``best/`` and ``final/`` of a run, or any saved step
(``launch/export.py``)."""

from __future__ import annotations

import os

import jax
from flax import nnx
from ml_collections import ConfigDict

from distillm_jax import config as cfglib
from distillm_jax import distributed, lora, models, sharding, step, storage
from distillm_jax.config import settings
from distillm_jax.data import tokenizers as toklib
from distillm_jax.run.build import build_model
from distillm_jax.run.checkpoints import Checkpoints


def export_model(model: nnx.Module, tokenizer, out_dir: str, *, peft: bool = False) -> None:
    """An HF checkpoint written beside ``out_dir`` and renamed into place, so a reader never sees half.
    A LoRA student is written with its adapters merged into the weights; with ``peft`` its adapters are
    also written in PEFT's layout to ``out_dir/adapter``."""
    if jax.process_count() > 1:  # params are sharded over hosts: every process gathers, one writes
        graph, state = nnx.split(model)
        model = nnx.merge(graph, jax.tree.map(distributed.gather, state))
    if jax.process_index() != 0:
        return
    tmp = out_dir + ".tmp"
    storage.rmtree(tmp)
    try:  # a full disk (or a signal) mid-write leaves the previous export whole and no half of this one
        with storage.staged(tmp) as local:  # a bucket's export is written locally, then uploaded
            storage.makedirs(local)
            adapters = lora.has_adapters(model)
            models.save_pretrained(lora.merged(model) if adapters else model, local, tokenizer=tokenizer)
            if adapters and peft:
                lora.save_peft(model, os.path.join(local, "adapter"))
    except BaseException:
        storage.rmtree(tmp)
        raise
    storage.rmtree(out_dir)
    storage.rename(tmp, out_dir)  # in a bucket a copy: a kill in between leaves out_dir.tmp whole


def export_checkpoint(config: ConfigDict, at: int | None = None, out_dir: str | None = None) -> str:
    """Write the student of ``config.run_dir``'s checkpoint ``at`` (default: the latest) as an HF
    checkpoint; returns its directory."""
    cfglib.check(config)
    s = settings.build(config, models.spec_config(settings.ModelSpec.of(config.student)).vocab_size)
    ckpt = Checkpoints(s.run_dir.checkpoints, keep=s.checkpoint_keep)
    try:
        steps = ckpt.manager.all_steps()
        if not steps:
            raise cfglib.ConfigError(f"{s.run_dir} has no checkpoints")
        at = max(steps) if at is None else at
        if at not in steps:
            raise cfglib.ConfigError(f"no checkpoint at step {at} in {s.run_dir}; it has {sorted(steps)}")
        out_dir = out_dir or s.run_dir.export(at)
        if storage.exists(out_dir) and (not storage.isdir(out_dir) or storage.listdir(out_dir)):
            raise cfglib.ConfigError(
                f"{out_dir} already exists; an export never writes over a folder (a run's best/ or final/ "
                "among them): choose a new --out"
            )
        mesh = sharding.make_mesh(**s.mesh)
        student = build_model(s.student, mesh, trainable=True)
        graph, params, rest = step.split_student(student)
        params, _, _ = ckpt.restore(at, params, step.init_opt_state(s.optim.adamw(1), params))
    finally:
        ckpt.close()
    tokenizer = toklib.load(s.tokenizer, s.student.path)
    export_model(nnx.merge(graph, params, rest), tokenizer, out_dir, peft=s.student.lora.peft)
    return out_dir
