"""How a model runs its stack of layers in a forward pass without a KV cache (training, evaluation,
scoring): one traced body per layer (the default), or one body scanned over the layers
(``Layers.scan``), each with or without rematerialisation (``Layers.remat``).

Why scan: the compiler sees one layer body instead of ``layers`` copies, so a 48-layer model compiles
in about the time of a 1-layer one (BENCHMARKS.md "Compiled for TPU"). Parameters keep their per-layer
layout (``layers.0.…``): HF import/export, checkpoints, LoRA and sharding rules are the same either way;
the scan stacks each layer's shard inside the step, which costs one extra copy of the stack's
parameters per device (the compiler's figures count it). Sampling with a KV cache keeps the loop.

Why remat: the backward pass then recomputes each layer's activations from its input instead of keeping
them, which is what lets a big model's SFT step fit a small slice. The policies are JAX's: ``full``
saves only each layer's input, ``dots`` also the matmul outputs, ``dots_no_batch`` the matmul outputs
without a batch dimension (the weights' products).

Dropout is drawn exactly as in the loop: each layer's sites keep their own key and call count, passed
to the scanned body per layer, so a scanned step draws the masks of an unscanned one."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from distillm_jax.models import dropout

POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@dataclasses.dataclass(frozen=True)
class Layers:
    """How the stack runs: ``scan`` the layers as one body; ``remat`` one of ``POLICIES``."""

    scan: bool = False
    remat: str = "none"

    def __post_init__(self):
        if self.remat not in POLICIES:
            raise ValueError(f"remat must be one of {', '.join(POLICIES)}, got {self.remat!r}")


def setting(model: nnx.Module) -> Layers:
    return getattr(model, "layer_setting", None) or Layers()


def configure(model: nnx.Module, how: Layers) -> nnx.Module:
    """Set how ``model``'s stacks run (a static attribute: part of the jitted program, not of the
    parameters)."""
    model.layer_setting = how
    return model


def run(blocks: Sequence[nnx.Module], x: jax.Array, call: Callable, how: Layers) -> jax.Array:
    """``x`` after every block in turn, ``call(block, x) -> x`` applying one."""
    policy = POLICIES[how.remat]

    def wrap(f: Callable) -> Callable:
        return f if how.remat == "none" else jax.checkpoint(f, policy=policy)

    if not how.scan or len(blocks) < 2 or len({nnx.graphdef(b) for b in blocks}) > 1:
        for block in blocks:
            x = wrap(lambda x, block=block: call(block, x))(x)
        return x
    return _scanned(list(blocks), x, call, wrap)


def _scanned(blocks: list, x: jax.Array, call: Callable, wrap: Callable) -> jax.Array:
    sites = [dropout.sites(b) for b in blocks]
    keyed = [[s.keys for s in layer] for layer in sites]
    on = any(k is not None for layer in keyed for k in layer)
    for layer in sites:  # keys are trace-time objects, not state: detach them while splitting
        for s in layer:
            s.keys = None
    graph, *_ = nnx.split(blocks[0])
    states = [nnx.split(b)[1] for b in blocks]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    keys = jnp.stack([jnp.stack([k.key for k in layer]) for layer in keyed]) if on else None
    calls = [k.calls for k in keyed[0]] if on else []
    used: list[int] = []

    def body(x, xs):
        state, layer_keys = xs
        block = nnx.merge(graph, state)
        body_sites = dropout.sites(block)
        for j, s in enumerate(body_sites if on else ()):
            s.keys = dropout.Keys(layer_keys[j], calls[j])
        y = call(block, x)
        used[:] = [s.keys.calls - c for s, c in zip(body_sites, calls, strict=True)] if on else []
        return y, None

    x, _ = jax.lax.scan(wrap(body), x, (stacked, keys))
    for layer, layer_keys in zip(sites, keyed, strict=True):  # back on, advanced as the loop would
        for s, k, n in zip(layer, layer_keys, used or [0] * len(layer), strict=True):
            s.keys = k
            if k is not None:
                k.calls += n
    return x
