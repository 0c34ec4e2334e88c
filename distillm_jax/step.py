"""The jitted distillation step: teacher forward under stop_gradient, student forward and backward,
``(1 − kd_ratio)·CE + kd_ratio·D``, an optax update; all in one ``jax.jit`` with fixed shardings and the
student's params and optimizer state donated (DESIGN.md decisions 2 and 4).

Batches come from ``data.batching``: decoder-only batches carry ``input_ids``, ``attention_mask``,
``labels`` and ``loss_mask`` [B, L]; encoder-decoder batches add ``decoder_input_ids`` and
``decoder_attention_mask``, with ``labels``/``loss_mask`` over the decoder positions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from distillm_jax import losses


@dataclasses.dataclass(frozen=True)
class LossConfig:
    divergence: str = "srkl"
    kd_ratio: float = 1.0  # (1 - kd_ratio)·CE + kd_ratio·D; 0 is SFT
    params: tuple = ()  # the divergence's parameters, e.g. (("alpha", 0.1),)

    def __post_init__(self):
        losses.validate(self.divergence, **dict(self.params))
        if not 0.0 <= self.kd_ratio <= 1.0:
            raise ValueError(f"kd_ratio must be in [0, 1], got {self.kd_ratio}")


def _logits(model: nnx.Module, batch: dict) -> jax.Array:
    if "decoder_input_ids" in batch:
        return model(
            batch["input_ids"],
            batch["attention_mask"],
            batch["decoder_input_ids"],
            batch["decoder_attention_mask"],
        )
    return model(batch["input_ids"], batch["attention_mask"])


def distill_loss(
    student: nnx.Module, teacher: nnx.Module | None, batch: dict, cfg: LossConfig
) -> tuple[jax.Array, dict]:
    """The step's loss and its parts. With ``kd_ratio == 0`` the teacher is not run at all."""
    s_logits = _logits(student, batch)
    ce = losses.cross_entropy(s_logits, batch["labels"], batch["loss_mask"])
    metrics = {"ce": ce}
    if cfg.kd_ratio == 0.0:
        return ce, metrics
    t_logits = jax.lax.stop_gradient(_logits(teacher, batch))
    d = losses.divergence(cfg.divergence, s_logits, t_logits, batch["loss_mask"], **dict(cfg.params))
    metrics[cfg.divergence] = d
    return (1.0 - cfg.kd_ratio) * ce + cfg.kd_ratio * d, metrics


def _like_params(tree, params):
    """Put leaves created on one device (optimizer step counters) on the params' mesh, replicated, so
    that every input and output of the step lives on the same devices."""
    named = [x.sharding for x in jax.tree.leaves(params) if isinstance(x.sharding, NamedSharding)]
    if not named:
        return tree
    replicated = NamedSharding(named[0].mesh, PartitionSpec())
    return jax.tree.map(
        lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated), tree
    )


def make_train_step(
    student: nnx.Module, teacher: nnx.Module | None, tx: optax.GradientTransformation, cfg: LossConfig
) -> tuple[Callable, nnx.State, optax.OptState]:
    """The jitted step and its initial (params, optimizer state).

    ``step(params, opt_state, teacher_state, batch) -> (params, opt_state, metrics)``; params and
    optimizer state keep the shardings they were created with and are donated: after the first step the
    ``student`` module's own arrays are consumed, so work from the returned params (``nnx.merge`` them
    with the student's graph to evaluate or export).
    """
    s_graph, params, s_rest = nnx.split(student, nnx.Param, ...)
    t_graph = None if teacher is None else nnx.graphdef(teacher)
    opt_state = _like_params(tx.init(params), params)

    def step(params, opt_state, teacher_state, batch):
        def loss_fn(p):
            model = nnx.merge(s_graph, p, s_rest)
            t_model = None if t_graph is None else nnx.merge(t_graph, teacher_state)
            return distill_loss(model, t_model, batch, cfg)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        return params, opt_state, metrics

    shardings = jax.tree.map(lambda x: x.sharding, (params, opt_state))
    jitted = jax.jit(step, donate_argnums=(0, 1), out_shardings=(*shardings, None))
    return jitted, params, opt_state
