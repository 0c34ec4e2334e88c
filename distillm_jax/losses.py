"""The divergences DistiLLM and its baselines minimise, and the masked cross-entropy beside them.

Every loss compares the student distribution ``q`` with the teacher distribution ``p`` at each target
token and reduces to a token-level masked mean over the whole (global) batch. The rules (docs/method.md,
docs/architecture.md §5) that make these safe to train with for days:

- math in float32 whatever the logits' dtype;
- mixtures of ``p`` and ``q`` formed in log space (``logaddexp``), so they never underflow to ``log 0``;
- a vocabulary entry whose logit is ``-inf`` in either model (padded vocabulary) contributes 0, not NaN,
  to the value and to the gradient;
- values are true divergences: the teacher entropy is kept, every per-token value is >= 0, and it is
  0 when student == teacher.

``divergence`` takes full ``[..., V]`` logits. ``chunked_divergence`` takes final hidden states and
output-embedding matrices instead and never materialises the full ``[B, T, V]`` logits of either model,
for vocabularies of 100k+ entries.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from numbers import Real

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from distillm_jax.models.layers import logits  # the LM head's projection, as the models compute it

Array = jax.Array

# ---------------------------------------------------------------------------------------------------
# Per-token building blocks. Inputs are "safe" log-probabilities: finite everywhere, with `valid`
# marking the vocabulary entries that exist in both models. Invalid entries are masked out of every sum.


def _safe_log_probs(student_logits: Array, teacher_logits: Array) -> tuple[Array, Array, Array]:
    """float32 log-softmax of both models, with -inf entries replaced by 0 and flagged invalid.

    Replacing before any arithmetic (not after) keeps ``inf - inf`` out of the forward pass and NaN out
    of the backward pass, where a plain ``where`` on the result would still propagate it.
    """
    ls = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    lt = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    valid = jnp.isfinite(ls) & jnp.isfinite(lt)
    return jnp.where(valid, ls, 0.0), jnp.where(valid, lt, 0.0), valid


def _kl(log_a: Array, log_b: Array, valid: Array) -> Array:
    """KL(a ‖ b) = Σ_v a (log a − log b) over valid entries."""
    return jnp.sum(jnp.where(valid, jnp.exp(log_a) * (log_a - log_b), 0.0), axis=-1)


def _log_mix(log_a: Array, log_b: Array, w: float) -> Array:
    """log(w·a + (1 − w)·b), computed in log space."""
    log_w = math.log(w) if w > 0 else -math.inf
    log_1mw = math.log1p(-w) if w < 1 else -math.inf
    return jnp.logaddexp(log_w + log_a, log_1mw + log_b)


def _fkl(ls: Array, lt: Array, valid: Array) -> Array:
    return _kl(lt, ls, valid)


def _rkl(ls: Array, lt: Array, valid: Array) -> Array:
    return _kl(ls, lt, valid)


def _sfkl(ls: Array, lt: Array, valid: Array, alpha: float) -> Array:
    return _kl(lt, _log_mix(lt, ls, alpha), valid)


def _srkl(ls: Array, lt: Array, valid: Array, alpha: float) -> Array:
    return _kl(ls, _log_mix(lt, ls, 1.0 - alpha), valid)


def _jsd(ls: Array, lt: Array, valid: Array, beta: float) -> Array:
    log_m = _log_mix(lt, ls, beta)
    return beta * _kl(lt, log_m, valid) + (1.0 - beta) * _kl(ls, log_m, valid)


def _tvd(ls: Array, lt: Array, valid: Array) -> Array:
    return 0.5 * jnp.sum(jnp.where(valid, jnp.abs(jnp.exp(ls) - jnp.exp(lt)), 0.0), axis=-1)


def _symkl(ls: Array, lt: Array, valid: Array, lam: float) -> Array:
    return (1.0 - lam) * _kl(lt, ls, valid) + lam * _kl(ls, lt, valid)


@dataclasses.dataclass(frozen=True)
class _Spec:
    per_token: Callable[..., Array]
    defaults: Mapping[str, float]
    doc: str


_REGISTRY: dict[str, _Spec] = {
    "fkl": _Spec(_fkl, {}, "KL(p ‖ q), forward KL (KD)"),
    "rkl": _Spec(_rkl, {}, "KL(q ‖ p), reverse KL"),
    "sfkl": _Spec(_sfkl, {"alpha": 0.1}, "KL(p ‖ α p + (1−α) q), skew forward KL (SKL)"),
    "srkl": _Spec(_srkl, {"alpha": 0.1}, "KL(q ‖ (1−α) p + α q), skew reverse KL (SRKL)"),
    "jsd": _Spec(_jsd, {"beta": 0.5}, "β KL(p ‖ m) + (1−β) KL(q ‖ m), m = β p + (1−β) q"),
    "tvd": _Spec(_tvd, {}, "½ Σ |p − q|, total variation distance"),
    "symkl": _Spec(_symkl, {"lam": 0.9}, "(1−λ) KL(p ‖ q) + λ KL(q ‖ p)"),
}

NAMES: tuple[str, ...] = tuple(_REGISTRY)
"""Every divergence name ``divergence`` accepts."""


def _resolve(name: str, kw: Mapping[str, float]) -> tuple[_Spec, dict[str, float]]:
    """Look up a divergence and validate its parameters, with one-line errors for every mistake."""
    spec = _REGISTRY.get(name)
    if spec is None:
        raise ValueError(f"unknown divergence {name!r}; valid names: {', '.join(NAMES)}")
    unknown = sorted(set(kw) - set(spec.defaults))
    if unknown:
        takes = ", ".join(spec.defaults) if spec.defaults else "no parameters"
        raise ValueError(f"divergence {name!r} takes {takes}; got unexpected {', '.join(unknown)}")
    params = {**spec.defaults, **kw}
    for key, value in params.items():
        if not isinstance(value, Real) or not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"divergence {name!r}: {key} must be a number in [0, 1], got {value!r}")
    return spec, {k: float(v) for k, v in params.items()}


def validate(name: str, **kw: float) -> None:
    """Raise the same one-line errors as ``divergence`` would, before any compute (for configs)."""
    _resolve(name, kw)


def _token_values(spec: _Spec, params: Mapping[str, float], s_logits: Array, t_logits: Array) -> Array:
    ls, lt, valid = _safe_log_probs(s_logits, t_logits)
    # Exact divergences are >= 0; clamp the float32 rounding of near-equal distributions.
    return jnp.maximum(spec.per_token(ls, lt, valid, **params), 0.0)


# ---------------------------------------------------------------------------------------------------
# Reductions and shape checks.


def masked_mean(values: Array, mask: Array) -> Array:
    """Mean of ``values`` over positions where ``mask`` is nonzero; 0 when nothing is selected.

    Masked positions are excluded with ``where`` (not multiplied by 0), so a NaN there cannot leak in.
    Under ``jit`` with sharded inputs the sums run over the global batch.
    """
    keep = mask != 0
    total = jnp.sum(jnp.where(keep, values, 0.0))
    return total / jnp.maximum(jnp.sum(keep), 1).astype(jnp.float32)


def _check_logits(what: str, student_logits: Array, teacher_logits: Array, m: tuple) -> None:
    s, t = jnp.shape(student_logits), jnp.shape(teacher_logits)
    if len(s) < 1 or s != t:
        raise ValueError(
            f"{what}: student_logits {s} and teacher_logits {t} must have the same shape [..., vocab]"
        )
    if m != s[:-1]:
        raise ValueError(f"{what}: mask {m} must have the logits' shape without vocab, {s[:-1]}")


# ---------------------------------------------------------------------------------------------------
# Public API on full logits.


def token_divergence(name: str, student_logits: Array, teacher_logits: Array, **kw: float) -> Array:
    """Per-token divergence ``[...]`` between ``[..., V]`` student and teacher logits (float32).

    For losses that reduce differently (per-sequence means, policy-gradient rewards).
    """
    spec, params = _resolve(name, kw)
    _check_logits(f"divergence {name!r}", student_logits, teacher_logits, jnp.shape(student_logits)[:-1])
    return _token_values(spec, params, student_logits, teacher_logits)


def divergence(name: str, student_logits: Array, teacher_logits: Array, mask: Array, **kw: float) -> Array:
    """Token-level masked mean of divergence ``name`` (one of ``NAMES``) between student and teacher.

    Args:
      name: ``fkl``, ``rkl``, ``sfkl``, ``srkl``, ``jsd``, ``tvd`` or ``symkl`` (docs/method.md).
      student_logits, teacher_logits: ``[..., V]``, any float dtype; math runs in float32.
      mask: ``[...]``; nonzero marks the target tokens that count.
      **kw: the divergence's parameter: ``alpha`` (sfkl, srkl; 0.1), ``beta`` (jsd; 0.5),
        ``lam`` (symkl; 0.9).
    Returns:
      A float32 scalar, >= 0.
    """
    spec, params = _resolve(name, kw)
    _check_logits(f"divergence {name!r}", student_logits, teacher_logits, jnp.shape(mask))
    return masked_mean(_token_values(spec, params, student_logits, teacher_logits), mask)


def fkl(student_logits: Array, teacher_logits: Array, mask: Array) -> Array:
    """Forward KL(p ‖ q): the KD loss, reported as a true KL (teacher entropy kept)."""
    return divergence("fkl", student_logits, teacher_logits, mask)


def rkl(student_logits: Array, teacher_logits: Array, mask: Array) -> Array:
    """Reverse KL(q ‖ p): mode-seeking."""
    return divergence("rkl", student_logits, teacher_logits, mask)


def sfkl(student_logits: Array, teacher_logits: Array, mask: Array, alpha: float = 0.1) -> Array:
    """Skew forward KL, KL(p ‖ α p + (1−α) q): DistiLLM's SKL."""
    return divergence("sfkl", student_logits, teacher_logits, mask, alpha=alpha)


def srkl(student_logits: Array, teacher_logits: Array, mask: Array, alpha: float = 0.1) -> Array:
    """Skew reverse KL, KL(q ‖ (1−α) p + α q): DistiLLM's SRKL; gradient flows through both q's."""
    return divergence("srkl", student_logits, teacher_logits, mask, alpha=alpha)


def jsd(student_logits: Array, teacher_logits: Array, mask: Array, beta: float = 0.5) -> Array:
    """Generalised Jensen-Shannon divergence of GKD with weight β on the teacher."""
    return divergence("jsd", student_logits, teacher_logits, mask, beta=beta)


def tvd(student_logits: Array, teacher_logits: Array, mask: Array) -> Array:
    """Total variation distance ½ Σ |p − q|."""
    return divergence("tvd", student_logits, teacher_logits, mask)


def symkl(student_logits: Array, teacher_logits: Array, mask: Array, lam: float = 0.9) -> Array:
    """(1−λ) forward KL + λ reverse KL."""
    return divergence("symkl", student_logits, teacher_logits, mask, lam=lam)


def cross_entropy(logits: Array, labels: Array, mask: Array) -> Array:
    """Token-level masked mean of −log softmax(logits)[label], in float32.

    Labels at masked positions may hold anything (-100, pad ids): they are never gathered from.
    """
    s, lab, m = jnp.shape(logits), jnp.shape(labels), jnp.shape(mask)
    if len(s) < 1 or lab != s[:-1] or m != s[:-1]:
        raise ValueError(
            f"cross_entropy: labels {lab} and mask {m} must both be the logits' shape without vocab, "
            f"{s[:-1]} (logits {s})"
        )
    return masked_mean(-label_log_probs(logits, labels, mask), mask)


def label_log_probs(logits: Array, labels: Array, mask: Array) -> Array:
    """float32 ``log softmax(logits)[label]`` per position ``[...]``; 0 where ``mask`` is 0 (labels
    there are never gathered from)."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    safe_labels = jnp.where(mask != 0, labels, 0).astype(jnp.int32)
    picked = jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
    return jnp.where(mask != 0, picked, 0.0)


# ---------------------------------------------------------------------------------------------------
# DistiLLM-2 (docs/method.md): a contrastive pair of skew KLs, one on the teacher's responses and one on the
# student's own responses to the same prompts, each reduced per sequence.


def sequence_mean(values: Array, mask: Array) -> Array:
    """Mean over sequences of each sequence's mean over its masked positions (``[B, T]`` inputs); rows
    without a masked position (batch padding) do not count."""
    keep = mask != 0
    counts = jnp.sum(keep, axis=-1)
    per_row = jnp.sum(jnp.where(keep, values, 0.0), axis=-1) / jnp.maximum(counts, 1)
    rows = counts > 0
    return jnp.sum(jnp.where(rows, per_row, 0.0)) / jnp.maximum(jnp.sum(rows), 1).astype(jnp.float32)


def _srkl_detached_mix(ls: Array, lt: Array, valid: Array, alpha: float) -> Array:
    """KL(q ‖ (1−α) p + α sg(q)): the student inside the mixture is a constant, so the gradient only
    pushes q towards the mixture, not the mixture towards q."""
    return _kl(ls, _log_mix(lt, jax.lax.stop_gradient(ls), 1.0 - alpha), valid)


def distillm2(
    student_logits_tgo: Array,
    teacher_logits_tgo: Array,
    mask_tgo: Array,
    student_logits_sgo: Array,
    teacher_logits_sgo: Array,
    mask_sgo: Array,
    *,
    alpha: float = 0.1,
    beta: float = 1.0,
) -> tuple[Array, dict[str, Array]]:
    """DistiLLM-2's contrastive loss ``(2 − β)·SKL(teacher outputs) + β·SRKL(student outputs)``.

    SKL = KL(p ‖ α p + (1−α) q) on the teacher-generated responses (``*_tgo``, ``[B, T, V]`` logits and
    ``[B, T]`` mask), SRKL = KL(q ‖ (1−α) p + α sg(q)) on the student-generated ones (``*_sgo``), the
    student stop-gradiented inside the SRKL mixture; mixtures in log space; each term a per-sequence
    mean of per-token values. Returns the loss and its two terms.
    """
    for name, value, hi in (("alpha", alpha, 1.0), ("beta", beta, 2.0)):
        if not isinstance(value, Real) or not 0.0 <= float(value) <= hi:
            raise ValueError(f"distillm2: {name} must be a number in [0, {hi:g}], got {value!r}")
    _check_logits("distillm2 (teacher outputs)", student_logits_tgo, teacher_logits_tgo, jnp.shape(mask_tgo))
    _check_logits("distillm2 (student outputs)", student_logits_sgo, teacher_logits_sgo, jnp.shape(mask_sgo))
    skl = _token_values(_REGISTRY["sfkl"], {"alpha": alpha}, student_logits_tgo, teacher_logits_tgo)
    ls, lt, valid = _safe_log_probs(student_logits_sgo, teacher_logits_sgo)
    srkl_ = jnp.maximum(_srkl_detached_mix(ls, lt, valid, alpha), 0.0)
    skl, srkl_ = sequence_mean(skl, mask_tgo), sequence_mean(srkl_, mask_sgo)
    return (2.0 - beta) * skl + beta * srkl_, {"skl_tgo": skl, "srkl_sgo": srkl_}


# ---------------------------------------------------------------------------------------------------
# Chunked form: the same divergence from hidden states and output embeddings, one sequence chunk at
# a time, so [B, T, V] logits never exist. Rather than jax.checkpoint (which recomputes both models'
# logits in the backward pass: 1.5x the matmul FLOPs), the forward pass of each chunk also computes the
# chunk's gradient w.r.t. the student's hidden states and head (a custom VJP). The loss is a sum over
# chunks, so the backward pass only scales those stored gradients: the same FLOPs as the plain form,
# with residuals of the size of the hidden states and the head.


def _to_chunks(x: Array, chunk: int) -> Array:
    """[B, T, ...] -> [n, B, chunk, ...], zero-padding T. Chunks cut the sequence, not the batch,
    so a batch sharded over data axes stays sharded inside every chunk."""
    b, t = x.shape[:2]
    n = -(-t // chunk)
    x = jnp.pad(x, [(0, 0), (0, n * chunk - t)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)


def _from_chunks(x: Array, t: int) -> Array:
    """Inverse of ``_to_chunks``: [n, B, chunk, ...] -> [B, T, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :t]


def _masked_sum(token_fn: Callable[[Array, Array], Array], s: Array, t: Array, m: Array) -> Array:
    return jnp.sum(jnp.where(m != 0, token_fn(s, t), 0.0))


def _targets_first(mask: Array, *xs: Array) -> tuple[Array, ...]:
    """``mask`` and each ``[B, T, ...]`` of ``xs`` with every row's target positions moved, in order, to
    the front of the row. The loss is a masked sum, so only the order of its terms changes; the chunks
    past the row with the most targets then hold none and are not computed: prompt and padding
    positions cost no logits. The gather runs along the sequence, so batch sharding is kept."""
    order = jnp.argsort(mask == 0, axis=1, stable=True)
    take = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)  # noqa: E731
    return tuple(take(x) for x in (mask, *xs))


def _chunks_with_targets(mask: Array, chunk: int) -> Array:
    """How many leading chunks of a ``_targets_first`` mask hold a target (the loop's trip count)."""
    return -(-jnp.max(jnp.sum(mask != 0, axis=1)) // chunk)


def _label_nll(s_logits: Array, labels: Array, m: Array) -> Array:
    """Σ over masked tokens of −log q(label): a chunk's share of the cross-entropy."""
    return -jnp.sum(label_log_probs(s_logits, labels, m))


def _chunk_inputs(chunk, hs, ht, mask, labels):
    xs = [_to_chunks(x, chunk) for x in (hs, ht, mask)]
    return xs + ([] if labels is None else [_to_chunks(labels, chunk)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunked_sum(token_fn, chunk, hs, ht, ws, wt, mask, labels):
    """(Σ over masked tokens of token_fn(hs @ ws, ht @ wt), Σ of the student's −log q(labels) or 0 when
    ``labels`` is None), one chunk of the sequence at a time, over the leading chunks that hold targets
    (``mask`` comes from ``_targets_first``). The second sum is reported only: it has no gradient."""
    xs = _chunk_inputs(chunk, hs, ht, mask, labels)

    def body(i, sums):
        hs_c, ht_c, m_c, *lab = (x[i] for x in xs)
        s_logits = logits(hs_c, ws)
        nll = _label_nll(s_logits, lab[0], m_c) if lab else 0.0
        return sums[0] + _masked_sum(token_fn, s_logits, logits(ht_c, wt), m_c), sums[1] + nll

    zero = jnp.zeros((), jnp.float32)
    return jax.lax.fori_loop(0, _chunks_with_targets(mask, chunk), body, (zero, zero))


def _chunked_sum_fwd(token_fn, chunk, hs, ht, ws, wt, mask, labels):
    # symbolic_zeros=True: each argument arrives as CustomVJPPrimal(value, perturbed).
    want_h, want_w = hs.perturbed, ws.perturbed
    hs, ht, ws, wt, mask = hs.value, ht.value, ws.value, wt.value, mask.value
    labels = None if labels is None else labels.value
    xs = _chunk_inputs(chunk, hs, ht, mask, labels)

    def body(i, carry):
        total, nll, dws, dhs = carry
        hs_c, ht_c, m_c, *lab = (x[i] for x in xs)
        t_logits = logits(ht_c, wt)
        s_logits = logits(hs_c, ws)
        value, vjp = jax.vjp(lambda s: _masked_sum(token_fn, s, t_logits, m_c), s_logits)
        if lab:
            nll = nll + _label_nll(s_logits, lab[0], m_c)
        # d loss / d logits, in the matmul dtype (bf16 for bf16 models, as mixed precision does).
        d_logits = vjp(jnp.ones((), jnp.float32))[0].astype(ws.dtype)
        if want_w:  # accumulate in float32 inside the matmul: no per-chunk [Ds, V] temporary
            dws = dws + jnp.einsum("bcd,bcv->dv", hs_c, d_logits, preferred_element_type=jnp.float32)
        if want_h:
            dhs_c = jnp.einsum("bcv,dv->bcd", d_logits, ws, preferred_element_type=jnp.float32)
            dhs = dhs.at[i].set(dhs_c.astype(hs.dtype))
        return total + value, nll, dws, dhs

    dws0 = jnp.zeros(ws.shape if want_w else (), jnp.float32)
    dhs0 = jnp.zeros(xs[0].shape, hs.dtype) if want_h else None  # chunks without targets: zero
    zero = jnp.zeros((), jnp.float32)
    total, nll, dws, dhs = jax.lax.fori_loop(
        0, _chunks_with_targets(mask, chunk), body, (zero, zero, dws0, dhs0)
    )
    dhs = _from_chunks(dhs, hs.shape[1]) if want_h else None
    return (total, nll), (dhs, dws.astype(ws.dtype) if want_w else None)


def _chunked_sum_bwd(token_fn, chunk, residuals, g):
    g = g[0]  # the reported CE's cotangent is dropped: it has no gradient
    if isinstance(g, SymbolicZero):
        g = jnp.zeros((), jnp.float32)
    d_hidden, d_head = (None if d is None else (g * d).astype(d.dtype) for d in residuals)
    # The teacher side, the mask and the labels are constants of the loss (the teacher is trained
    # elsewhere).
    return d_hidden, None, d_head, None, None, None


_chunked_sum.defvjp(_chunked_sum_fwd, _chunked_sum_bwd, symbolic_zeros=True)


def chunked_divergence(
    name: str,
    student_hidden: Array,
    teacher_hidden: Array,
    student_head: Array,
    teacher_head: Array,
    mask: Array,
    *,
    chunk_size: int = 128,
    **kw: float,
) -> Array:
    """``divergence(name, student_hidden @ student_head, teacher_hidden @ teacher_head, mask, **kw)``
    without ever holding the full ``[B, T, V]`` logits of either model.

    Args:
      student_hidden, teacher_hidden: final hidden states ``[B, T, Ds]`` and ``[B, T, Dt]`` (after the
        final norm and any output rescaling, e.g. T5's ``d_model**-0.5`` for tied embeddings).
      student_head, teacher_head: output embeddings ``[Ds, V]`` and ``[Dt, V]`` (pass ``embedding.T``
        for tied heads). Logits are their products, accumulated in float32.
      mask: ``[B, T]``, nonzero marks target tokens.
      chunk_size: sequence positions per chunk; peak memory scales with ``B * chunk_size * V``.
    Returns:
      The same float32 scalar as ``divergence``, and the same gradient w.r.t. the student's hidden
      states and head (with bfloat16 inputs, d loss / d logits is rounded to bfloat16 before the
      matmuls, as mixed-precision backward passes do). The teacher is treated as a constant
      (stop_gradient), as in distillation.
    """
    return _chunked_divergence(
        name, student_hidden, teacher_hidden, student_head, teacher_head, mask, None, chunk_size, kw
    )[0]


def chunked_divergence_and_ce(
    name: str,
    student_hidden: Array,
    teacher_hidden: Array,
    student_head: Array,
    teacher_head: Array,
    mask: Array,
    labels: Array,
    *,
    chunk_size: int = 128,
    **kw: float,
) -> tuple[Array, Array]:
    """``chunked_divergence`` and the student's cross-entropy on ``labels`` [B, T] over the same mask,
    from the same chunk logits: the CE a pure distillation step (``kd_ratio = 1``) only reports then
    costs no head pass of its own. The CE has no gradient (it is a metric here); a loss that trains on
    CE uses ``chunked_cross_entropy``."""
    return _chunked_divergence(
        name, student_hidden, teacher_hidden, student_head, teacher_head, mask, labels, chunk_size, kw
    )


def _chunked_divergence(
    name, student_hidden, teacher_hidden, student_head, teacher_head, mask, labels, chunk_size, kw
):
    spec, params = _resolve(name, kw)
    what = f"chunked_divergence {name!r}"
    if labels is not None and jnp.shape(labels) != jnp.shape(mask):
        raise ValueError(f"{what}: labels {jnp.shape(labels)} and mask {jnp.shape(mask)} differ, both [B, T]")
    shapes = [jnp.shape(x) for x in (student_hidden, teacher_hidden, student_head, teacher_head)]
    (hs, ht, ws, wt), m = shapes, jnp.shape(mask)
    if (
        len(hs) != 3
        or len(ht) != 3
        or hs[:2] != ht[:2]
        or m != hs[:2]
        or len(ws) != 2
        or len(wt) != 2
        or ws[0] != hs[2]
        or wt[0] != ht[2]
        or ws[1] != wt[1]
    ):
        raise ValueError(
            f"{what}: expected student_hidden [B, T, Ds], teacher_hidden [B, T, Dt], student_head "
            f"[Ds, V], teacher_head [Dt, V], mask [B, T]; got {hs}, {ht}, {ws}, {wt}, {m}"
        )
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{what}: chunk_size must be a positive int, got {chunk_size!r}")
    token_fn = functools.partial(_token_values, spec, params)
    chunk = min(chunk_size, hs[1])
    extra = () if labels is None else (jnp.asarray(labels).astype(jnp.int32),)
    targets, student_hidden, teacher_hidden, *labels = _targets_first(
        jnp.asarray(mask) != 0, student_hidden, jax.lax.stop_gradient(teacher_hidden), *extra
    )
    total, nll = _chunked_sum(
        token_fn,
        chunk,
        student_hidden,
        teacher_hidden,
        student_head,
        jax.lax.stop_gradient(teacher_head),
        targets.astype(jnp.float32),
        labels[0] if labels else None,
    )
    count = jnp.maximum(jnp.sum(mask != 0), 1).astype(jnp.float32)
    return total / count, jax.lax.stop_gradient(nll) / count


def chunked_cross_entropy(
    hidden: Array, head: Array, labels: Array, mask: Array, *, chunk_size: int = 128
) -> Array:
    """``cross_entropy(hidden @ head, labels, mask)`` one sequence chunk at a time, so the ``[B, T, V]``
    logits never exist. Each chunk's logits are recomputed in the backward pass (``jax.checkpoint``):
    one extra student-head matmul, which is small beside the teacher's and the student's forward."""
    if jnp.shape(hidden)[:2] != jnp.shape(labels) or jnp.shape(labels) != jnp.shape(mask):
        raise ValueError(
            f"chunked_cross_entropy: hidden {jnp.shape(hidden)} [B, T, D], labels "
            f"{jnp.shape(labels)} and mask {jnp.shape(mask)} [B, T] disagree"
        )

    @jax.checkpoint
    def chunk_nll(h, lab, m):
        return _label_nll(logits(h, head), lab, m)

    def add_chunk(total, x):  # chunks without targets (past every row's last one) are skipped
        nll = jax.lax.cond(jnp.any(x[2]), chunk_nll, lambda *_: jnp.zeros((), jnp.float32), *x)
        return total + nll, None

    chunk = min(chunk_size, hidden.shape[1])
    targets, hidden, labels = _targets_first(jnp.asarray(mask) != 0, hidden, labels.astype(jnp.int32))
    xs = (_to_chunks(hidden, chunk), _to_chunks(labels, chunk), _to_chunks(targets, chunk))
    total = jax.lax.scan(add_chunk, jnp.zeros((), jnp.float32), xs)[0]
    return total / jnp.maximum(jnp.sum(mask != 0), 1).astype(jnp.float32)


AUTO_CHUNK = 128  # positions per chunk when the form is chosen for the user (the measured setting)
AUTO_FROM_VOCAB = 32_000


def auto_chunk_size(vocab: int, dtype: str, backend: str) -> int:
    """The loss form a run gets by default (``loss.chunk_size = -1``), from the measurements of
    BENCHMARKS.md: from a 32k vocabulary the chunked form takes 0.6–0.8× the plain form's time on CPU
    (the train step at V = 50257: 1.44× the tokens/s) and 0.9–1.0× in bfloat16 on an H200, always with
    about 1/6 of its memory; in float32 on an accelerator it is 1.2–1.3× slower, and below 32k there is
    little to save. Returns the chunk size (0: plain)."""
    if vocab < AUTO_FROM_VOCAB:
        return 0
    return AUTO_CHUNK if backend == "cpu" or dtype == "bfloat16" else 0
