"""The divergences against an independent float64 numpy reference, their properties and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distillm_jax import losses

# Parameter sets each divergence is checked at (the defaults plus the edges of docs/method.md).
CASES = [
    ("fkl", {}),
    ("rkl", {}),
    ("sfkl", {"alpha": 0.1}),
    ("sfkl", {"alpha": 0.5}),
    ("srkl", {"alpha": 0.1}),
    ("srkl", {"alpha": 0.5}),
    ("jsd", {"beta": 0.01}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.99}),
    ("tvd", {}),
    ("symkl", {"lam": 0.9}),
    ("symkl", {"lam": 0.3}),
]
CASE_IDS = [f"{n}-{'-'.join(f'{k}{v}' for k, v in kw.items())}" for n, kw in CASES]


# ----------------------------------------------------------------------------------------------
# float64 numpy reference: direct formulas, mixtures as log(w a + (1 - w) b) in probability space.


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    finite = np.isfinite(x)
    m = np.max(np.where(finite, x, -np.inf), axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        return x - m - np.log(np.sum(np.where(finite, np.exp(x - m), 0.0), axis=-1, keepdims=True))


def ref_token(name, s, t, alpha=0.1, beta=0.5, lam=0.9):
    ls, lt = np_log_softmax(s), np_log_softmax(t)
    valid = np.isfinite(ls) & np.isfinite(lt)
    ls, lt = np.where(valid, ls, 0.0), np.where(valid, lt, 0.0)
    p, q = np.where(valid, np.exp(lt), 0.0), np.where(valid, np.exp(ls), 0.0)

    def kl_logs(la, lb):  # Σ a (log a − log b)
        return np.sum(np.where(valid, np.exp(la) * (la - lb), 0.0), axis=-1)

    def kl_to_mix(a, la, m):  # Σ a (log a − log m), m a probability mixture
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = a * (la - np.log(m))
        return np.sum(np.where(valid & (a > 0) & (m > 0), terms, 0.0), axis=-1)

    if name == "fkl":
        return kl_logs(lt, ls)
    if name == "rkl":
        return kl_logs(ls, lt)
    if name == "sfkl":
        return kl_to_mix(p, lt, alpha * p + (1 - alpha) * q)
    if name == "srkl":
        return kl_to_mix(q, ls, (1 - alpha) * p + alpha * q)
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl_to_mix(p, lt, m) + (1 - beta) * kl_to_mix(q, ls, m)
    if name == "tvd":
        return 0.5 * np.sum(np.abs(p - q), axis=-1)
    if name == "symkl":
        return (1 - lam) * kl_logs(lt, ls) + lam * kl_logs(ls, lt)
    raise AssertionError(name)


def ref_divergence(name, s, t, mask, **kw):
    keep = np.asarray(mask) != 0
    return np.sum(np.where(keep, ref_token(name, s, t, **kw), 0.0)) / max(keep.sum(), 1)


def ref_grad(name, s, t, mask, h=1e-6, **kw):
    """Central finite differences of the reference w.r.t. every finite student logit (float64)."""
    s = np.asarray(s, np.float64)
    grad = np.zeros_like(s)
    for idx in zip(*np.nonzero(np.isfinite(s)), strict=True):
        step = h * max(1.0, abs(s[idx]))
        hi, lo = s.copy(), s.copy()
        hi[idx] += step
        lo[idx] -= step
        grad[idx] = ref_divergence(name, hi, t, mask, **kw) - ref_divergence(name, lo, t, mask, **kw)
        grad[idx] /= 2 * step
    return grad


# ----------------------------------------------------------------------------------------------
# Inputs.

B, T, V = 2, 3, 9


def random_logits(seed, scale=3.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, T, V)) * scale).astype(np.float32)


def logits_pair(kind):
    s, t = random_logits(0), random_logits(1)
    mask = np.ones((B, T), np.float32)
    mask[1, -1] = 0.0
    if kind == "huge":  # ±1e4 entries: near one-hot distributions, KL values ~ 1e4
        s[0, 0, 2], s[0, 1, 5], s[1, 0, 0] = 1e4, -1e4, 1e4
        t[0, 0, 7], t[0, 2, 1], t[1, 1, 3] = 1e4, 1e4, -1e4
    elif kind == "padded_vocab":  # padded vocabulary rows: -inf in both, or in one model only
        s[..., -2:] = -np.inf
        t[..., -2:] = -np.inf
        t[..., 0] = -np.inf
    elif kind == "masked_row":  # a sequence with no target token at all
        mask[0] = 0.0
    return s, t, mask


KINDS = ["normal", "huge", "padded_vocab", "masked_row"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("name", "kw"), CASES, ids=CASE_IDS)
def test_value_matches_float64_reference(name, kw, kind):
    s, t, mask = logits_pair(kind)
    got = losses.divergence(name, jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask), **kw)
    want = ref_divergence(name, s, t, mask, **kw)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize(("name", "kw"), CASES, ids=CASE_IDS)
def test_bfloat16_inputs_computed_in_float32(name, kw):
    s, t, mask = logits_pair("normal")
    s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
    got = losses.divergence(name, s16, t16, jnp.asarray(mask), **kw)
    # The reference sees exactly the bfloat16 values, so only float32 rounding may differ.
    want = ref_divergence(name, np.asarray(s16, np.float64), np.asarray(t16, np.float64), mask, **kw)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("name", "kw"), CASES, ids=CASE_IDS)
def test_gradient_matches_reference_formula(name, kw, kind):
    s, t, mask = logits_pair(kind)
    got = jax.grad(lambda x: losses.divergence(name, x, jnp.asarray(t), jnp.asarray(mask), **kw))(
        jnp.asarray(s)
    )
    assert bool(jnp.all(jnp.isfinite(got)))
    # With ±1e4 logits the per-token values are ~1e4, whose float32 ulp is ~1e-3; the gradient
    # subtracts such values, so its absolute float32 error is ~1e-3 / tokens.
    atol = 1e-4 if kind == "huge" else 2e-6
    np.testing.assert_allclose(np.asarray(got), ref_grad(name, s, t, mask, **kw), atol=atol, rtol=1e-4)
    if kind == "masked_row":
        assert not np.any(np.asarray(got)[0]), "an all-masked sequence must get no gradient"


@pytest.mark.parametrize(("name", "kw"), CASES, ids=CASE_IDS)
def test_nonnegative_and_zero_at_equality(name, kw):
    s, t, mask = logits_pair("normal")
    tok = losses.token_divergence(name, jnp.asarray(s), jnp.asarray(t), **kw)
    assert bool(jnp.all(tok >= 0)) and float(jnp.min(tok)) > 0  # random pairs differ everywhere
    for x in (s, logits_pair("huge")[0], logits_pair("padded_vocab")[0]):
        same = losses.divergence(name, jnp.asarray(x), jnp.asarray(x), jnp.asarray(mask), **kw)
        assert abs(float(same)) < 1e-6


@pytest.mark.parametrize(("skew", "plain"), [("sfkl", "fkl"), ("srkl", "rkl")])
@pytest.mark.parametrize("kind", KINDS)
def test_skew_edges(skew, plain, kind):
    s, t, mask = (jnp.asarray(x) for x in logits_pair(kind))
    at0 = losses.divergence(skew, s, t, mask, alpha=0.0)
    np.testing.assert_allclose(float(at0), float(losses.divergence(plain, s, t, mask)), rtol=1e-6)
    assert float(losses.divergence(skew, s, t, mask, alpha=1.0)) == 0.0
    for alpha in (0.0, 1.0):
        g = jax.grad(lambda x, a=alpha: losses.divergence(skew, x, t, mask, alpha=a))(s)
        assert bool(jnp.all(jnp.isfinite(g)))


def test_named_functions_equal_registry():
    s, t, mask = (jnp.asarray(x) for x in logits_pair("normal"))
    for fn, name, kw in [
        (losses.fkl, "fkl", {}),
        (losses.rkl, "rkl", {}),
        (losses.sfkl, "sfkl", {"alpha": 0.3}),
        (losses.srkl, "srkl", {"alpha": 0.3}),
        (losses.jsd, "jsd", {"beta": 0.1}),
        (losses.tvd, "tvd", {}),
        (losses.symkl, "symkl", {"lam": 0.5}),
    ]:
        assert float(fn(s, t, mask, **kw)) == float(losses.divergence(name, s, t, mask, **kw))
    assert set(losses.NAMES) == {"fkl", "rkl", "sfkl", "srkl", "jsd", "tvd", "symkl"}


def test_all_masked_batch_is_zero_with_zero_gradient():
    s, t, _ = (jnp.asarray(x) for x in logits_pair("normal"))
    mask = jnp.zeros((B, T))
    assert float(losses.divergence("srkl", s, t, mask)) == 0.0
    assert not bool(jnp.any(jax.grad(lambda x: losses.divergence("srkl", x, t, mask))(s)))


def test_cross_entropy_against_reference():
    s, _, mask = logits_pair("masked_row")
    labels = np.random.default_rng(2).integers(0, V, (B, T))
    labels[mask == 0] = -100  # ignored positions may hold anything
    got = losses.cross_entropy(jnp.asarray(s, jnp.bfloat16), jnp.asarray(labels), jnp.asarray(mask))
    ls = np_log_softmax(np.asarray(jnp.asarray(s, jnp.bfloat16), np.float64))
    nll = -np.take_along_axis(ls, np.where(mask != 0, labels, 0)[..., None], -1)[..., 0]
    want = np.sum(nll * mask) / mask.sum()
    np.testing.assert_allclose(float(got), want, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Bad input: one clear line each.


def test_unknown_name_lists_valid_names():
    s, t, mask = (jnp.asarray(x) for x in logits_pair("normal"))
    with pytest.raises(ValueError, match=r"unknown divergence 'kl'; valid names: fkl, rkl, sfkl"):
        losses.divergence("kl", s, t, mask)


def test_wrong_shapes_name_both_shapes():
    s, t, mask = (jnp.asarray(x) for x in logits_pair("normal"))
    with pytest.raises(ValueError, match=r"student_logits \(2, 3, 9\) and teacher_logits \(2, 3, 8\)"):
        losses.divergence("fkl", s, t[..., :8], mask)
    with pytest.raises(ValueError, match=r"mask \(2, 4\) must have the logits' shape .* \(2, 3\)"):
        losses.divergence("fkl", s, t, jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=r"labels \(2,\) and mask \(2, 3\)"):
        losses.cross_entropy(s, jnp.zeros((2,), jnp.int32), mask)


def test_bad_parameters():
    s, t, mask = (jnp.asarray(x) for x in logits_pair("normal"))
    with pytest.raises(ValueError, match=r"'fkl' takes no parameters; got unexpected alpha"):
        losses.divergence("fkl", s, t, mask, alpha=0.1)
    with pytest.raises(ValueError, match=r"'jsd' takes beta; got unexpected alpha"):
        losses.divergence("jsd", s, t, mask, alpha=0.1)
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\], got 1.5"):
        losses.divergence("srkl", s, t, mask, alpha=1.5)


# ----------------------------------------------------------------------------------------------
# DistiLLM-2's contrastive loss.


def ref_seq_mean(values, mask):
    keep = np.asarray(mask) != 0
    rows = [v[k].mean() for v, k in zip(values, keep, strict=True) if k.any()]
    return float(np.mean(rows)) if rows else 0.0


def ref_srkl_fixed_mix(s, t, q_fixed, alpha):
    """Σ q (log q − log m) with m = (1−α) p + α q_fixed: q inside the mixture held constant."""
    ls = np_log_softmax(s)
    q, p = np.exp(ls), np.exp(np_log_softmax(t))
    return np.sum(q * (ls - np.log((1 - alpha) * p + alpha * q_fixed)), axis=-1)


def test_distillm2_value_and_stop_gradient_against_float64():
    alpha, beta = 0.1, 0.7
    s1, t1, m1 = logits_pair("normal")
    s2, t2, m2 = random_logits(5), random_logits(6), np.ones((B, T), np.float32)
    m2[0, 1:] = 0.0  # a short sequence: per-sequence means weigh it like the long one

    def ours(a, b):
        return losses.distillm2(a, jnp.asarray(t1), m1, b, jnp.asarray(t2), m2, alpha=alpha, beta=beta)

    (value, parts), (g1, g2) = ours(s1, s2), jax.grad(lambda a, b: ours(a, b)[0], (0, 1))(s1, s2)
    skl = ref_seq_mean(ref_token("sfkl", s1, t1, alpha=alpha), m1)
    q0 = np.exp(np_log_softmax(s2))

    def ref_srkl(x):
        return ref_seq_mean(ref_srkl_fixed_mix(x, t2, q0, alpha), m2)

    srkl = ref_srkl(s2)
    np.testing.assert_allclose(float(value), (2 - beta) * skl + beta * srkl, rtol=2e-5)
    np.testing.assert_allclose([float(parts["skl_tgo"]), float(parts["srkl_sgo"])], [skl, srkl], rtol=2e-5)
    # The value equals plain SRKL's (the detached q has the same value) ...
    np.testing.assert_allclose(srkl, ref_seq_mean(ref_token("srkl", s2, t2, alpha=alpha), m2), rtol=1e-12)

    def fd(f, x, h=1e-6):
        x, g = np.asarray(x, np.float64), np.zeros(x.shape)
        for idx in np.ndindex(x.shape):
            hi, lo = x.copy(), x.copy()
            hi[idx] += h
            lo[idx] -= h
            g[idx] = (f(hi) - f(lo)) / (2 * h)
        return g

    # ... but its gradient is the one with the mixture's q held fixed, not plain SRKL's.
    want = beta * fd(ref_srkl, s2)
    plain = beta * fd(lambda x: ref_seq_mean(ref_token("srkl", x, t2, alpha=alpha), m2), s2)
    np.testing.assert_allclose(np.asarray(g2), want, atol=2e-6)
    assert np.abs(want - plain).max() > 1e-3, "the stop-gradient must change the gradient"
    assert not np.any(np.asarray(g2)[0, 1:]), "masked positions get no gradient"
    want1 = (2 - beta) * fd(lambda x: ref_seq_mean(ref_token("sfkl", x, t1, alpha=alpha), m1), s1)
    np.testing.assert_allclose(np.asarray(g1), want1, atol=2e-6)


def test_distillm2_rejects_bad_parameters():
    s, t, m = logits_pair("normal")
    with pytest.raises(ValueError, match="beta must be a number in"):
        losses.distillm2(s, t, m, s, t, m, beta=2.5)
    with pytest.raises(ValueError, match="teacher outputs"):
        losses.distillm2(s[:, :2], t, m, s, t, m)
