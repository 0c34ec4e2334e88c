"""The jitted steps: the distillation train step (teacher forward under stop_gradient, student forward and
backward, ``(1 − kd_ratio)·CE + kd_ratio·D + lm_coef·LM``, an optax update) and the eval step; each one
``jax.jit`` with fixed shardings, the train step donating the student's params and optimizer state
(docs/architecture.md §2, §4). ``make_optimizer`` is the paper's AdamW schedule.

Batches come from ``data.batching``: decoder-only batches carry ``input_ids``, ``attention_mask``,
``labels`` and ``loss_mask`` [B, L]; encoder-decoder batches add ``decoder_input_ids`` and
``decoder_attention_mask``, with ``labels``/``loss_mask`` over the decoder positions. With ``lm_coef > 0``
the batch also holds ``"lm"``: a decoder-only batch of plain text for the language-modelling loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from distillm_jax import lora, losses
from distillm_jax.models import dropout, layers


@dataclasses.dataclass(frozen=True)
class LossConfig:
    divergence: str = "srkl"
    kd_ratio: float = 1.0  # (1 - kd_ratio)·CE + kd_ratio·D; 0 is SFT
    params: tuple = ()  # the divergence's parameters, e.g. (("alpha", 0.1),)
    lm_coef: float = 0.0  # weight of the LM loss on batch["lm"]
    lm_kd_ratio: float = 0.0  # the LM loss: (1 − lm_kd_ratio)·CE + lm_kd_ratio·FKL(teacher ‖ student)
    chunk_size: int = 0  # > 0: the chunked large-vocabulary form, this many positions per chunk
    # What a training batch is scored by: the method's loss (``Method.loss``), ``(student, teacher,
    # batch, cfg) -> (loss, metrics)``; None: CE and the divergence (``ce_and_divergence``), which the
    # eval step always scores ground truth by. ``own``: the method's own settings (``Method.settings``).
    objective: Callable | None = None
    own: Any = None

    def __post_init__(self):
        losses.validate(self.divergence, **dict(self.params))
        if not (0.0 <= self.kd_ratio <= 1.0 and 0.0 <= self.lm_kd_ratio <= 1.0):
            raise ValueError(
                f"kd_ratio and lm_kd_ratio must be in [0, 1], got {self.kd_ratio}, {self.lm_kd_ratio}"
            )
        if self.lm_coef < 0 or self.chunk_size < 0:
            raise ValueError(f"lm_coef and chunk_size must be >= 0, got {self.lm_coef}, {self.chunk_size}")


def hidden_and_head(model: nnx.Module, batch: dict) -> tuple[jax.Array, jax.Array]:
    """Final hidden states [B, T, D] at the label positions and the [D, V] output embedding."""
    if "decoder_input_ids" in batch:
        enc = model.encode(batch["input_ids"], batch["attention_mask"])
        h, _ = model.hidden(
            batch["decoder_input_ids"], batch["decoder_attention_mask"], enc, batch["attention_mask"]
        )
    else:
        h, _ = model.hidden(batch["input_ids"], batch["attention_mask"])
    return h, model.head()


def both_logits(student: nnx.Module, teacher: nnx.Module, batch: dict) -> tuple[jax.Array, jax.Array]:
    """Student and (stop-gradient) teacher logits [B, T, V] over the vocabulary rows both have."""
    hs, ws = hidden_and_head(student, batch)
    ht, wt = jax.lax.stop_gradient(hidden_and_head(teacher, batch))
    v = min(ws.shape[-1], wt.shape[-1])
    return layers.logits(hs, ws[:, :v]), layers.logits(ht, wt[:, :v])


def distill_loss(
    student: nnx.Module, teacher: nnx.Module | None, batch: dict, cfg: LossConfig
) -> tuple[jax.Array, dict]:
    """The step's loss and its parts. With ``kd_ratio == 0`` the teacher is not run at all; with
    ``kd_ratio == 1`` CE is only reported (no gradient flows through it). The student's logits are
    computed once for both CE and the divergence. ``cfg.objective`` is the method's loss, if not that."""
    loss, metrics = (cfg.objective or ce_and_divergence)(student, teacher, batch, cfg)
    if cfg.lm_coef > 0.0:  # on pre-training text: CE, or MiniLLM's mix of CE and the teacher's FKL
        lm_cfg = dataclasses.replace(cfg, divergence="fkl", params=(), kd_ratio=cfg.lm_kd_ratio)
        lm, _ = ce_and_divergence(student, teacher, batch["lm"], lm_cfg)
        metrics["lm"] = lm
        loss = loss + cfg.lm_coef * lm
    return loss, metrics


def ce_and_divergence(
    student: nnx.Module, teacher: nnx.Module | None, batch: dict, cfg: LossConfig
) -> tuple[jax.Array, dict]:
    """``(1 − kd_ratio)·CE + kd_ratio·D`` on a batch of (prompt, response) rows, plain or chunked."""
    hs, ws = hidden_and_head(student, batch)
    labels, mask = batch["labels"], batch["loss_mask"]
    ce_only_reported = cfg.kd_ratio == 1.0
    sg = jax.lax.stop_gradient if ce_only_reported else (lambda x: x)
    s_logits = None if cfg.chunk_size else layers.logits(hs, ws)
    ht, wt = (None, None) if cfg.kd_ratio == 0.0 else jax.lax.stop_gradient(hidden_and_head(teacher, batch))
    # Padded vocabularies may differ (Qwen2.5-7B 152064 rows, 0.5B 151936); both cover the tokenizer
    # (checked at start-up), so the rows past the shorter one are padding: compare the shared ones.
    v = ws.shape[-1] if wt is None else min(ws.shape[-1], wt.shape[-1])
    # A reported-only CE comes out of the divergence's own chunk loop (no head pass of its own) when the
    # divergence sees the student's whole vocabulary.
    ce_in_divergence = cfg.chunk_size > 0 and ce_only_reported and v == ws.shape[-1]
    if ce_in_divergence:
        ce = None
    elif cfg.chunk_size:
        ce = losses.chunked_cross_entropy(sg(hs), sg(ws), labels, mask, chunk_size=cfg.chunk_size)
    else:
        ce = losses.cross_entropy(sg(s_logits), labels, mask)
    metrics, loss = {"ce": ce}, ce
    if cfg.kd_ratio > 0.0:
        kw = dict(cfg.params)
        chunked = dict(chunk_size=cfg.chunk_size, **kw)
        if ce_in_divergence:
            d, metrics["ce"] = losses.chunked_divergence_and_ce(
                cfg.divergence, hs, ht, ws, wt[:, :v], mask, labels, **chunked
            )
        elif cfg.chunk_size:
            d = losses.chunked_divergence(cfg.divergence, hs, ht, ws[:, :v], wt[:, :v], mask, **chunked)
        else:
            t_logits = layers.logits(ht, wt[:, :v])
            d = losses.divergence(cfg.divergence, s_logits[..., :v], t_logits, mask, **kw)
        metrics[cfg.divergence] = d
        loss = d if ce_only_reported else (1.0 - cfg.kd_ratio) * ce + cfg.kd_ratio * d
    return loss, metrics


def make_optimizer(
    lr: float,
    total_steps: int,
    *,
    weight_decay: float = 0.01,
    end_lr: float = 1e-7,
    warmup_steps: int = 0,
    clip: float = 1.0,
    grad_accum: int = 1,
    b2: float = 0.999,
) -> optax.GradientTransformation:
    """AdamW with the paper's schedule (docs/method.md): cosine decay from ``lr`` to ``end_lr`` over
    ``total_steps`` optimizer updates after an optional linear warmup, global-norm clipping at ``clip``
    (0 turns it off); weight decay skips biases and norm scales (``decays``). With ``grad_accum > 1``
    each update averages that many micro-batch gradients (``optax.MultiSteps``); the step function is
    called once per micro-batch and compiles once."""
    decay = max(total_steps - warmup_steps, 1)
    schedule = optax.cosine_decay_schedule(lr, decay, alpha=end_lr / lr if lr else 0.0)
    if warmup_steps:
        warm = optax.linear_schedule(0.0, lr, warmup_steps)
        schedule = optax.join_schedules([warm, schedule], [warmup_steps])
    chain = [optax.clip_by_global_norm(clip)] if clip > 0 else []
    adamw = optax.adamw(schedule, b1=0.9, b2=b2, eps=1e-8, weight_decay=weight_decay, mask=decays)
    tx = optax.chain(*chain, adamw)
    return optax.MultiSteps(tx, grad_accum) if grad_accum > 1 else tx


NO_DECAY = ("bias", "norm", "ln_")  # parameter or module names weight decay leaves alone


def decays(params):
    """Which leaves AdamW's weight decay shrinks: all but biases and norm scales — any leaf on a path
    whose module or parameter name holds ``bias``, ``norm`` or ``ln_`` (T5's relative position bias
    too), as the official DistiLLM code and transformers' ``Trainer`` exempt them (docs/method.md)."""

    def rule(path, _) -> bool:
        names = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
        return not any(t in n for n in names for t in NO_DECAY)

    return jax.tree_util.tree_map_with_path(rule, params)


def _like_params(tree, params):
    """Put leaves created on one device (optimizer step counters) on the params' mesh, replicated, so
    that every input and output of the step lives on the same devices. Without a mesh, commit every leaf
    to the default device: an uncommitted first input would make the second call compile again."""
    named = [x.sharding for x in jax.tree.leaves(params) if isinstance(x.sharding, NamedSharding)]
    if not named:
        return jax.device_put(tree, jax.local_devices()[0])
    replicated = NamedSharding(named[0].mesh, PartitionSpec())
    return jax.tree.map(
        lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated), tree
    )


def init_opt_state(tx: optax.GradientTransformation, params: nnx.State) -> optax.OptState:
    """The optimizer state, created in the params' shardings."""
    return _like_params(tx.init(params), params)


def split_student(student: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graph, trainable, frozen) of a student: its params, or only its LoRA adapters when it has them
    (then the base weights are frozen). The frozen part is passed to every jitted step as an argument,
    never closed over (a closed-over array would be baked into the program as a constant)."""
    trainable = lora.TRAINABLE if lora.has_adapters(student) else nnx.Param
    return nnx.split(student, trainable, ...)


class TrainStep:
    """``step(params, opt_state, teacher_state, batch, rng=None) -> (params, opt_state, metrics)``: the
    jitted train step with the student's frozen part bound. ``rng`` (a key) turns on the student's
    dropout for the call (``models.dropout``); ``lower`` and ``_cache_size`` reach the jitted function
    (benchmarks, memory planning)."""

    def __init__(self, jitted: Callable, frozen: nnx.State):
        self.jitted, self.frozen = jitted, frozen

    def __call__(self, params, opt_state, teacher_state, batch, rng=None):
        return self.jitted(params, opt_state, self.frozen, teacher_state, batch, rng)

    def lower(self, params, opt_state, teacher_state, batch, rng=None):
        return self.jitted.lower(params, opt_state, self.frozen, teacher_state, batch, rng)

    def _cache_size(self) -> int:
        return self.jitted._cache_size()


def make_train_step(
    student: nnx.Module, teacher: nnx.Module | None, tx: optax.GradientTransformation, cfg: LossConfig
) -> tuple[TrainStep, nnx.State, optax.OptState]:
    """The jitted step and its initial (params, optimizer state).

    ``step(params, opt_state, teacher_state, batch) -> (params, opt_state, metrics)``; params and
    optimizer state keep the shardings they were created with and are donated: after the first step the
    ``student`` module's own arrays are consumed, so work from the returned params (``nnx.merge`` them
    with the student's graph and frozen part, ``split_student``, to evaluate or export). For a student
    with LoRA adapters, params (and the optimizer state) are the adapters only.
    """
    s_graph, params, frozen = split_student(student)
    params = _like_params(params, params)
    opt_state = init_opt_state(tx, params)
    shardings = jax.tree.map(lambda x: x.sharding, (params, opt_state))
    jitted = jit_train_step(s_graph, None if teacher is None else nnx.graphdef(teacher), tx, cfg, shardings)
    return TrainStep(jitted, frozen), params, opt_state


def jit_train_step(
    s_graph: nnx.GraphDef,
    t_graph: nnx.GraphDef | None,
    tx: optax.GradientTransformation,
    cfg: LossConfig,
    shardings,
) -> Callable:
    """``jit(step)(params, opt_state, frozen, teacher_state, batch, rng)``, params and optimizer state
    donated and kept in ``shardings`` (theirs): the one program ``make_train_step`` runs and
    ``config/compiled.py`` compiles for a TPU slice from abstract arguments."""

    def step(params, opt_state, frozen, teacher_state, batch, rng):
        def loss_fn(p):
            model = nnx.merge(s_graph, p, frozen)
            if rng is not None:  # the student's dropout (and its LoRA adapters'): this step only
                dropout.set_key(model, rng)
            t_model = None if t_graph is None else nnx.merge(t_graph, teacher_state)
            return distill_loss(model, t_model, batch, cfg)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        return params, opt_state, metrics

    return jax.jit(step, donate_argnums=(0, 1), out_shardings=(*shardings, None))


def make_eval_step(student: nnx.Module, teacher: nnx.Module | None, cfg: LossConfig) -> Callable:
    """``eval_step(params, teacher_state, batch) -> {"ce_sum", "tokens"[, divergence + "_sum"]}``: sums
    over the batch's target tokens, so that a validation set split into batches gives the exact
    token-level mean (sum of sums / sum of tokens)."""
    s_graph, _, frozen = split_student(student)
    step = jit_eval_step(s_graph, None if teacher is None else nnx.graphdef(teacher), cfg)
    return lambda params, teacher_state, batch: step(params, frozen, teacher_state, batch)


def jit_eval_step(s_graph: nnx.GraphDef, t_graph: nnx.GraphDef | None, cfg: LossConfig) -> Callable:
    """``jit(step)(params, frozen, teacher_state, batch)``: ``make_eval_step``'s program."""
    cfg = dataclasses.replace(cfg, lm_coef=0.0, objective=None)  # ground truth, CE and the divergence

    @jax.jit
    def step(params, frozen, teacher_state, batch):
        model = nnx.merge(s_graph, params, frozen)
        t_model = None if t_graph is None else nnx.merge(t_graph, teacher_state)
        _, metrics = distill_loss(model, t_model, batch, cfg)
        tokens = jnp.sum(batch["loss_mask"] != 0).astype(jnp.float32)
        return {"tokens": tokens, **{f"{k}_sum": v * tokens for k, v in metrics.items()}}

    return step
