"""A run's settings as small frozen dataclasses, built once from a checked config (``build``).

The config file is a ``ConfigDict`` because users override it key by key; below the trainer nothing
reads it: each piece gets the typed group it needs (``Sampling`` for a sampler, ``SGO`` for the
feeder, ``own`` for the method), so a reader sees what a function depends on, and a value is converted
and checked once.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from ml_collections import ConfigDict

from distillm_jax import config as cfglib
from distillm_jax import losses, methods, step
from distillm_jax.data import batching
from distillm_jax.generate import Sampling
from distillm_jax.models import stack
from distillm_jax.run.folder import RunDir


@dataclasses.dataclass(frozen=True)
class Lora:
    rank: int  # 0: no adapters
    alpha: float
    dropout: float
    targets: tuple[str, ...]
    peft: bool  # exports also write the adapters in PEFT's layout


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A teacher or student as the config names it (``teacher.*`` / ``student.*``): a checkpoint or hub id
    (``path``), or a new model from HF config kwargs (``config``, with ``model_type``)."""

    path: str
    config: dict
    seed: int
    dtype: str  # compute dtype
    param_dtype: str  # "": the dtype (a trained model keeps float32 unless set)
    dropout: float | None  # None: the checkpoint's rates
    lora: Lora
    layers: stack.Layers = dataclasses.field(default_factory=stack.Layers)  # scanned, rematerialised

    @classmethod
    def of(cls, spec: ConfigDict) -> ModelSpec:
        lo = spec.lora
        return cls(
            path=spec.path,
            config=spec.config.to_dict(),
            seed=int(spec.seed),
            dtype=spec.dtype,
            param_dtype=spec.param_dtype,
            dropout=None if spec.get("dropout") is None else float(spec.dropout),
            lora=Lora(int(lo.rank), float(lo.alpha), float(lo.dropout), tuple(lo.targets), bool(lo.peft)),
            layers=stack.Layers(bool(spec.get("scan_layers", False)), str(spec.get("remat", "none"))),
        )


@dataclasses.dataclass(frozen=True)
class Data:
    task: str
    languages: str
    source: str
    train_split: str
    valid_split: str
    lengths: batching.Lengths
    max_train_rows: int
    max_valid_rows: int
    demo_rows: int
    lm_source: str
    lm_split: str
    lm_max_rows: int


@dataclasses.dataclass(frozen=True)
class Optim:
    batch_size: int  # global, per update
    grad_accum: int
    lr: float
    end_lr: float
    weight_decay: float
    b2: float
    warmup_steps: int
    clip: float
    epochs: int  # the run's length: epochs, or steps when 0
    steps: int

    @property
    def micro(self) -> int:
        """Rows of one micro-batch (one call of the train step)."""
        return self.batch_size // self.grad_accum

    def adamw(self, total: int):
        """The run's AdamW over ``total`` updates (``step.make_optimizer``)."""
        return step.make_optimizer(
            self.lr,
            total,
            weight_decay=self.weight_decay,
            end_lr=self.end_lr,
            warmup_steps=self.warmup_steps,
            clip=self.clip,
            grad_accum=self.grad_accum,
            b2=self.b2,
        )


@dataclasses.dataclass(frozen=True)
class Eval:
    interval: int  # 0: once per epoch
    batch_size: int
    generate: bool  # the task metric from sampled generations, not only validation CE
    max_new_tokens: int
    sampling: Sampling
    no_repeat_ngram_size: int  # the final evaluation only
    draws: int


@dataclasses.dataclass(frozen=True)
class SGO:
    """The student's samples while it trains (``offpolicy``, shared by every SGO method) and MiniLLM's
    rollouts' sampling; each method's own knobs are its ``own`` settings."""

    sampling: Sampling
    max_new_tokens: int
    overlap: bool
    max_staleness: int
    capacity: int  # replay buffer rows over all data shards


@dataclasses.dataclass(frozen=True)
class RunSettings:
    run_dir: RunDir
    seed: int
    resume: bool
    mesh: dict  # data, fsdp, tensor (-1: the devices the others leave)
    tokenizer: str  # "": the student's checkpoint's; "demo" / "bytes": built in; else a directory
    teacher: ModelSpec
    student: ModelSpec
    method: methods.Method
    data: Data
    optim: Optim
    eval: Eval
    sgo: SGO
    loss: step.LossConfig
    checkpoint_interval: int  # 0: at every evaluation
    checkpoint_keep: int
    log_interval: int

    @property
    def own(self) -> Any:
        """The method's own settings (``Method.settings``), as its loss sees them."""
        return self.loss.own

    def new_tokens(self, group: SGO | Eval) -> int:
        """A sampler's fixed number of new tokens: its ``max_new_tokens``, or the response's room."""
        return group.max_new_tokens or self.data.lengths.max_response


def chunk_size(c: ConfigDict, vocab: int) -> int:
    """``loss.chunk_size`` resolved: as set when >= 0; -1 (the default) chosen from the student's
    vocabulary, its compute dtype and the backend (``losses.auto_chunk_size``), for a method whose loss
    has a chunked form."""
    if c.loss.chunk_size >= 0:
        return int(c.loss.chunk_size)
    if not methods.get(c.method).chunked:
        return 0
    return losses.auto_chunk_size(vocab, c.student.dtype, jax.default_backend())


def loss_config(c: ConfigDict, vocab: int) -> step.LossConfig:
    """What the train step scores a batch by, for ``c.method`` and a student of ``vocab`` entries."""
    method = methods.get(c.method)
    return step.LossConfig(
        divergence=c.loss.name,
        kd_ratio=float(c.loss.kd_ratio) if method.teacher else 0.0,
        params=tuple(cfglib.loss_params(c).items()),
        lm_coef=float(c.loss.lm_coef),
        lm_kd_ratio=float(c.loss.lm_kd_ratio),
        chunk_size=chunk_size(c, vocab),
        objective=method.loss,
        own=method.settings(c),
    )


def _fields(cls, group: ConfigDict, **given) -> dict:
    """``cls``'s fields read from ``group`` (the config's keys of the same names), except ``given``."""
    out = dict(given)
    for f in dataclasses.fields(cls):
        if f.name not in out:
            out[f.name] = group[f.name]
    return out


def build(c: ConfigDict, vocab: int) -> RunSettings:
    """The settings of a config that ``config.check`` accepted, for a student of ``vocab`` entries (its
    config.json's: ``models.spec_config``)."""
    d, o, e = c.data, c.offpolicy, c.eval
    lengths = batching.Lengths(d.max_prompt_length, d.max_length)
    return RunSettings(
        run_dir=RunDir(c.run_dir),
        seed=int(c.seed),
        resume=bool(c.resume),
        mesh={k: int(v) for k, v in c.mesh.items()},
        tokenizer=c.tokenizer,
        teacher=ModelSpec.of(c.teacher),
        student=ModelSpec.of(c.student),
        method=methods.get(c.method),
        data=Data(**_fields(Data, d, lengths=lengths)),
        optim=Optim(**_fields(Optim, c.optim)),
        eval=Eval(**_fields(Eval, e, sampling=Sampling.of(e))),
        sgo=SGO(**_fields(SGO, o, sampling=Sampling.of(o))),
        loss=loss_config(c, vocab),
        checkpoint_interval=int(c.checkpoint.interval),
        checkpoint_keep=int(c.checkpoint.keep),
        log_interval=int(c.log_interval),
    )
