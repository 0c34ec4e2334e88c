"""Dropout as the checkpoints' own configs set it, on only in the student's training forward passes.

The authors train every student (and their teachers' SFT) in ``model.train()``: GPT-2 and OPT with their
configs' 0.1, T5 / mT5 with ``dropout_rate`` 0.1 (docs/method.md). Each family declares its sites and
reads their rates from the HF config (``Rates``); a ``Dropout`` block sits at each site and does
nothing until a key is set on the model (``set_key``), which only the jitted train step does, after
merging the student. The frozen teacher, evaluation, sampling and scoring merge their own models and
never set one, so they run exactly as without dropout.

Keys: the train step's key is drawn from (seed, update, micro-batch) by the trainer, so a resumed run
draws the masks of one never stopped. Each site folds in its own index in the model and a count of its
calls within the trace (a site called twice in one step, e.g. a second forward pass on another batch or
the query blocks of causal attention, draws a new mask each time), so masks are a pure function of the
step's key and the program."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class Rates:
    """A family's dropout sites and their rates; ``None``: the family has no such site."""

    embed: float | None = None  # the input embeddings (GPT-2 embd_pdrop; T5)
    attn: float | None = None  # attention probabilities (GPT-2 attn_pdrop; OPT / Llama attention_dropout)
    resid: float | None = None  # each sublayer's output before its residual add (GPT-2 resid_pdrop; OPT)
    act: float | None = None  # the MLP's hidden activations (T5)
    final: float | None = None  # the stack's output after its final norm (T5)

    def override(self, rate: float | None) -> Rates:
        """Every site of the family at ``rate`` (``student.dropout`` / ``teacher.dropout``); None keeps
        the checkpoint's rates."""
        if rate is None:
            return self
        return Rates(**{f.name: None if getattr(self, f.name) is None else float(rate) for f in _FIELDS})

    def get(self, site: str) -> float:
        return getattr(self, site) or 0.0

    @property
    def active(self) -> bool:
        return any(self.get(f.name) > 0 for f in _FIELDS)


_FIELDS = dataclasses.fields(Rates)


class Keys:
    """A site's key stream within one trace: call ``n`` folds in ``n`` (plain Python: not model state)."""

    def __init__(self, key: jax.Array, calls: int = 0):
        self.key, self.calls = key, calls

    def next(self) -> jax.Array:
        key = jax.random.fold_in(self.key, self.calls)
        self.calls += 1
        return key


LEVELS = 1 << 16  # a drop decision reads 16 random bits: rates are kept to 1 / 65536


def keep_mask(key: jax.Array, shape: tuple[int, ...], drop: int) -> jax.Array:
    """True where an entry is kept: 16 random bits per entry, dropped below ``drop`` (of ``LEVELS``).
    Each 32-bit word the generator makes serves two neighbours along the last axis, which halves the
    generator's work (threefry dominates dropout's cost on CPU: 3x faster than ``jax.random.bernoulli``
    on attention probabilities) and keeps the leading axes, the ones a batch is sharded over, as they
    are; the bits of an entry depend on its index only, so any sharding draws the same mask."""
    last = shape[-1]
    words = jax.random.bits(key, (*shape[:-1], -(-last // 2)), jnp.uint32)
    bits = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(*shape[:-1], -1)[..., :last]
    return bits >= drop


class Dropout(nnx.Module):
    """Inverted dropout at ``rate`` (kept values scaled by one over the share kept, as torch does), only
    while ``set_key`` has given the model a key."""

    def __init__(self, rate: float):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"a dropout rate must be in [0, 1), got {rate}")
        self.rate = float(rate)
        self.drop = min(round(self.rate * LEVELS), LEVELS - 1)  # entries whose 16 bits fall below it drop
        self.keys = nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.keys is None or self.drop == 0:
            return x
        keep = keep_mask(self.keys.next(), x.shape, self.drop)
        scale = jnp.asarray(LEVELS / (LEVELS - self.drop), x.dtype)  # the exact share kept: unbiased
        return jnp.where(keep, x * scale, jnp.zeros((), x.dtype))


def sites(model: nnx.Module) -> list[Dropout]:
    """Every dropout block with a rate above 0, in the model's fixed traversal order."""
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, Dropout) and m.drop > 0]


def active(model: nnx.Module) -> bool:
    """Whether the model has any dropout to turn on (a family site or a LoRA adapter)."""
    return bool(sites(model))


def set_key(model: nnx.Module, key: jax.Array | None) -> None:
    """Dropout on for the model's following forward passes, drawn from ``key`` (each site folds in its
    index), or off with ``None``. Meant for the student merged inside a jitted train step."""
    for i, site in enumerate(sites(model)):
        site.keys = None if key is None else Keys(jax.random.fold_in(key, i))
