"""The chunked divergence equals the plain one on full logits, in value and gradient, sharded or not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from distillm_jax import losses

B, T, DS, DT, V = 8, 12, 16, 24, 64


def inputs(dtype=jnp.float32):
    k = jax.random.split(jax.random.key(0), 5)
    hs = jax.random.normal(k[0], (B, T, DS), dtype)
    ht = jax.random.normal(k[1], (B, T, DT), dtype)
    ws = (jax.random.normal(k[2], (DS, V)) / DS**0.5).astype(dtype)
    wt = (jax.random.normal(k[3], (DT, V)) * 2 / DT**0.5).astype(dtype)
    mask = (jax.random.uniform(k[4], (B, T)) < 0.8).astype(jnp.int32).at[3].set(0)
    return hs, ht, ws, wt, mask


def plain(name, hs, ht, ws, wt, mask, **kw):
    logits = lambda h, w: jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)  # noqa: E731
    return losses.divergence(name, logits(hs, ws), logits(ht, wt), mask, **kw)


def chunked(name, hs, ht, ws, wt, mask, chunk_size=5, **kw):
    return losses.chunked_divergence(name, hs, ht, ws, wt, mask, chunk_size=chunk_size, **kw)


def value_and_student_grads(fn, name, args, **kw):
    hs, ht, ws, wt, mask = args
    f = lambda hs, ws: fn(name, hs, ht, ws, wt, mask, **kw)  # noqa: E731
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(hs, ws)


@pytest.mark.parametrize("chunk_size", [1, 5, 12, 64])  # 5 leaves a padded last chunk
@pytest.mark.parametrize("name", losses.NAMES)
def test_chunked_equals_plain(name, chunk_size):
    args = inputs()
    v0, (dh0, dw0) = value_and_student_grads(plain, name, args)
    v1, (dh1, dw1) = value_and_student_grads(chunked, name, args, chunk_size=chunk_size)
    np.testing.assert_allclose(v1, v0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dh1, dh0, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(dw1, dw0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["srkl", "jsd", "tvd"])
def test_chunked_sharded_over_8_devices_equals_unsharded_plain(name, mesh):
    args = inputs()
    v0, (dh0, dw0) = value_and_student_grads(plain, name, args)
    batch = NamedSharding(mesh, P(("data", "fsdp")))  # batch rows over data x fsdp
    head = NamedSharding(mesh, P(None, "tensor"))  # vocabulary over tensor
    hs, ht, ws, wt, mask = args
    placed = (
        jax.device_put(hs, batch),
        jax.device_put(ht, batch),
        jax.device_put(ws, head),
        jax.device_put(wt, head),
        jax.device_put(mask, batch),
    )
    v1, (dh1, dw1) = value_and_student_grads(chunked, name, placed, chunk_size=5)
    assert dh1.sharding.spec[0] == ("data", "fsdp"), "gradient must keep the batch sharding"
    np.testing.assert_allclose(v1, v0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dh1, dh0, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(dw1, dw0, atol=1e-5, rtol=1e-5)


def test_chunked_bfloat16_keeps_dtypes_and_matches_plain():
    args = inputs(jnp.bfloat16)
    v0, (dh0, dw0) = value_and_student_grads(plain, "srkl", args)
    v1, (dh1, dw1) = value_and_student_grads(chunked, "srkl", args)
    assert v1.dtype == jnp.float32 and dh1.dtype == jnp.bfloat16 and dw1.dtype == jnp.bfloat16
    np.testing.assert_allclose(v1, v0, rtol=1e-5)
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    np.testing.assert_allclose(f32(dh1), f32(dh0), atol=1e-3, rtol=2e-2)
    np.testing.assert_allclose(f32(dw1), f32(dw0), atol=1e-3, rtol=2e-2)


def test_gradient_for_one_student_input_only_and_teacher_is_constant():
    hs, ht, ws, wt, mask = inputs()
    _, (dh0, dw0) = value_and_student_grads(plain, "sfkl", (hs, ht, ws, wt, mask))
    d_hidden = jax.grad(lambda h: chunked("sfkl", h, ht, ws, wt, mask))(hs)
    d_head = jax.grad(lambda w: chunked("sfkl", hs, ht, w, wt, mask))(ws)
    np.testing.assert_allclose(d_hidden, dh0, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(d_head, dw0, atol=1e-5, rtol=1e-5)
    d_teacher = jax.grad(lambda h: chunked("sfkl", hs, h, ws, wt, mask))(ht)
    assert not bool(jnp.any(d_teacher))


def test_chunked_bad_shapes_and_chunk_size():
    hs, ht, ws, wt, mask = inputs()
    with pytest.raises(ValueError, match=r"got \(8, 12, 16\), \(8, 12, 24\), \(16, 64\), \(24, 63\)"):
        chunked("fkl", hs, ht, ws, wt[:, :63], mask)
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int, got 0"):
        chunked("fkl", hs, ht, ws, wt, mask, chunk_size=0)
    with pytest.raises(ValueError, match=r"unknown divergence 'skl'"):
        chunked("skl", hs, ht, ws, wt, mask)


@pytest.mark.parametrize("chunk_size", [5, 12])
def test_chunked_cross_entropy_matches_plain(chunk_size):
    hs, _, ws, _, mask = inputs()
    labels = jax.random.randint(jax.random.key(7), (B, T), 0, V).at[0, 0].set(-100)  # any value where masked

    def plain_ce(hs, ws):
        logits = jnp.einsum("btd,dv->btv", hs, ws, preferred_element_type=jnp.float32)
        return losses.cross_entropy(logits, labels, mask)

    def chunked_ce(hs, ws):
        return losses.chunked_cross_entropy(hs, ws, labels, mask, chunk_size=chunk_size)

    (v0, g0), (v1, g1) = (
        jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(hs, ws) for f in (plain_ce, chunked_ce)
    )
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    for a, b in zip(g0, g1, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_positions_without_targets_cost_no_logits():
    """Prompt and padding positions are moved behind each row's targets and their chunks are never
    computed: a non-finite hidden state there (which any logits computed from it would carry into the
    head's gradient) leaves the divergence, CE and their gradients those of the plain form."""
    hs, ht, ws, wt, _ = inputs()
    mask = jnp.zeros((B, T), jnp.int32).at[:, 1::4].set(1)  # 3 targets a row: one chunk of 3 computed
    labels = jax.random.randint(jax.random.key(7), (B, T), 0, V)
    poisoned = jnp.where(mask[..., None] != 0, hs, jnp.inf)
    v0, (dh0, dw0) = value_and_student_grads(plain, "srkl", (hs, ht, ws, wt, mask))
    v1, (dh1, dw1) = value_and_student_grads(chunked, "srkl", (poisoned, ht, ws, wt, mask), chunk_size=3)
    np.testing.assert_allclose(v1, v0, rtol=1e-5)
    np.testing.assert_allclose(dh1, dh0, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(dw1, dw0, atol=1e-5, rtol=1e-5)

    def ce(hidden, head):
        return losses.chunked_cross_entropy(hidden, head, labels, mask, chunk_size=3)

    (c0, g0), (c1, g1) = (jax.value_and_grad(ce, argnums=(0, 1))(h, ws) for h in (hs, poisoned))
    np.testing.assert_allclose(c1, c0, rtol=1e-6)
    for a, b in zip(g0, g1, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("chunk_size", [1, 5])
def test_divergence_and_reported_ce_from_one_chunk_loop(chunk_size):
    """The CE a pure distillation step reports comes out of the divergence's chunk loop: the divergence
    and its gradients are the chunked form's, the CE is the plain cross-entropy, and it carries no
    gradient."""
    hs, ht, ws, wt, mask = inputs()
    labels = jax.random.randint(jax.random.key(7), (B, T), 0, V)
    both = lambda h, w: losses.chunked_divergence_and_ce(  # noqa: E731
        "jsd", h, ht, w, wt, mask, labels, chunk_size=chunk_size, beta=0.3
    )
    d1, ce = jax.jit(both)(hs, ws)
    grads = jax.jit(jax.grad(lambda h, w: both(h, w)[0], argnums=(0, 1)))(hs, ws)
    args = (hs, ht, ws, wt, mask)
    d0, (dh0, dw0) = value_and_student_grads(chunked, "jsd", args, chunk_size=chunk_size, beta=0.3)
    np.testing.assert_allclose(d1, d0, rtol=1e-6)
    np.testing.assert_allclose(grads[0], dh0, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grads[1], dw0, rtol=1e-5, atol=1e-7)
    logits = jnp.einsum("btd,dv->btv", hs, ws, preferred_element_type=jnp.float32)
    np.testing.assert_allclose(ce, losses.cross_entropy(logits, labels, mask), rtol=1e-6)
    ce_grads = jax.grad(lambda h, w: both(h, w)[1], argnums=(0, 1))(hs, ws)
    assert all(not np.any(np.asarray(g)) for g in ce_grads)
