"""MiniLLM: the policy-gradient terms against a hand-computed example, and a tiny run that lowers the
student's reverse KL on its own samples."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distillm_jax.methods import minillm

# One rollout row: a prompt position (masked out) and four response tokens.
MASK = np.array([[0, 1, 1, 1, 1]], np.float32)
OLD = np.array([[0.0, -1.0, -0.5, -2.0, -0.3]], np.float32)  # log q_old of the sampled tokens
TEACHER = np.array([[0.0, -0.5, -1.5, -1.0, -0.1]], np.float32)  # log p
NOW = np.array([[0.0, -1.5, -0.5, -1.2, -0.3]], np.float32)  # log q_θ after some updates


def lmops_advantages(rewards, mask, gamma):
    """LMOps' ``_get_advantages_and_returns`` in float64, loop for loop: the discounted return from each
    token (its own reward included), divided by the response tokens left, whitened (over the response
    tokens here; unbiased variance, as ``torch.var_mean``)."""
    rewards, mask = np.asarray(rewards, np.float64) * mask, np.asarray(mask, np.float64)
    lens = mask - np.cumsum(mask, -1) + np.cumsum(mask, -1)[:, -1:]
    lens[lens == 0] = 1
    last, out = np.zeros(len(rewards)), []
    for t in reversed(range(rewards.shape[1])):
        last = rewards[:, t] + gamma * last
        out.append(last)
    rw = np.stack(out[::-1], 1) / lens
    x = rw[mask > 0]
    return np.where(mask > 0, (rw - x.mean()) / np.sqrt(x.var(ddof=1) + 1e-8), 0.0)


def test_advantages_match_lmops_by_hand():
    rng = np.random.default_rng(0)
    mask = np.array([[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], np.float32)
    r = rng.standard_normal(mask.shape).astype(np.float32)
    got = np.asarray(minillm.advantages(jnp.asarray(r), jnp.asarray(mask), gamma=0.95))
    np.testing.assert_allclose(got, lmops_advantages(r, mask, 0.95), rtol=1e-5, atol=1e-6)
    # One row by hand: returns 0.5 − 0.95 + 0.95²·1 + 0.95³·0.2 ... over 4, 3, 2, 1 tokens left.
    r1 = np.array([[0.0, 0.5, -1.0, 1.0, 0.2]], np.float32)
    m1 = np.array([[0, 1, 1, 1, 1]], np.float32)
    g = 0.95
    rw = [(0.5 - g + g**2 + 0.2 * g**3) / 4, (-1.0 + g + 0.2 * g**2) / 3, (1.0 + 0.2 * g) / 2, 0.2]
    want = (np.array(rw) - np.mean(rw)) / np.sqrt(np.var(rw, ddof=1) + 1e-8)
    got = np.asarray(minillm.advantages(jnp.asarray(r1), jnp.asarray(m1), gamma=g))
    np.testing.assert_allclose(got[0, 1:], want, rtol=1e-5)
    assert got[0, 0] == 0.0


def test_rewards_are_scaled_and_clipped():
    r = minillm.rewards(jnp.asarray(OLD), jnp.asarray(TEACHER), jnp.asarray(MASK), scale=0.5, clip=1.5)
    np.testing.assert_allclose(np.asarray(r)[0], [0.0, 1.0, -1.5, 1.5, 0.4], rtol=1e-6)


def test_policy_loss_and_gradient_by_hand():
    settings = minillm.MiniLLMSettings(
        mix_alpha=0.2, clip=0.2, gamma=0.95, reward_scale=0.5, reward_clip=100.0
    )
    pg, metrics = minillm.policy_terms(jnp.asarray(NOW), OLD, TEACHER, MASK, settings)
    # By hand, as LMOps: advantages of the scaled rewards, ratios q_θ/q_old times the importance
    # weights q_old / (α p + (1 − α) q_old), PPO's max(−A·ρw, −A·clip(ρw)).
    adv = lmops_advantages((TEACHER - OLD) / 0.5, MASK, 0.95)[0, 1:]
    ratio = np.exp(NOW[0, 1:] - OLD[0, 1:])
    w = 1 / (0.2 * np.exp(TEACHER[0, 1:] - OLD[0, 1:]) + 0.8)
    rw = ratio * w
    terms = np.maximum(-adv * rw, -adv * np.clip(rw, 0.8, 1.2))
    np.testing.assert_allclose(float(pg), terms.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["weight"]), w.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["reward"]), (0.5 - 1.0 + 1.0 + 0.2) / 4, rtol=1e-5)
    grad = jax.grad(lambda x: minillm.policy_terms(x, OLD, TEACHER, MASK, settings)[0])(jnp.asarray(NOW))
    # d/d log q_θ of −A·ρw is −A·ρw (over the 4 tokens) where the unclipped side is the max; 0 where
    # the clipped side is (the ratio went past 1 ± clip in the direction the advantage pushes).
    active = -adv * rw >= -adv * np.clip(rw, 0.8, 1.2)
    want = np.where(active, -adv * rw / 4, 0.0)
    np.testing.assert_allclose(np.asarray(grad)[0, 1:], want, rtol=1e-5, atol=1e-8)
    assert np.asarray(grad)[0, 0] == 0.0 and not active.all() and active.any()


def test_no_teacher_share_means_unit_weights():
    _, metrics = minillm.policy_terms(
        jnp.asarray(OLD), OLD, TEACHER, MASK, minillm.MiniLLMSettings(mix_alpha=0.0)
    )
    np.testing.assert_allclose(float(metrics["weight"]), 1.0, rtol=1e-6)


def test_loss_adds_the_unweighted_single_step_reverse_kl():
    rng = np.random.default_rng(0)
    s, t = rng.standard_normal((2, 1, 5, 7)).astype(np.float32)
    labels = np.array([[0, 3, 1, 6, 2]])
    old = np.asarray(jax.nn.log_softmax(s))[0, np.arange(5), labels[0]][None]
    total, parts = minillm.loss(s, t, labels, MASK, old, TEACHER)
    ls, lt = jax.nn.log_softmax(s), jax.nn.log_softmax(t)
    rkl = np.asarray(jnp.sum(jnp.exp(ls) * (ls - lt), -1))
    want = float(np.sum(rkl * MASK) / MASK.sum())
    np.testing.assert_allclose(float(parts["rkl"]), want, rtol=1e-5)
    np.testing.assert_allclose(float(total), float(parts["pg"]) + want, rtol=1e-5)
    np.testing.assert_allclose(float(parts["ratio"]), 1.0, rtol=1e-6)  # first pass: q_θ == q_old


class Done:
    def __init__(self, rows):
        self._rows = rows

    def rows(self):
        return self._rows


def make_rollouts(calls: list, next_rows, shards=(0, 1), units=4, accum=2, epochs=2):
    """Rollouts whose sampler answers prompt [i] with response [i, 1]; row [i] scores -i and -2i."""

    def sample(params, prompts, key):
        calls.append(len(prompts))
        return Done([(p, [p[0], 1]) for p in prompts])

    def score(params, rows):
        ids = np.array([p[0] for p, _ in rows], np.float32)[:, None].repeat(3, 1)
        return -ids, -2 * ids

    return minillm.Rounds(epochs, units, accum, sample, score, next_rows, seed=0, shards=shards)


def counter(per_call: int):
    it = iter(range(10**6))
    return lambda: [([next(it)], [0]) for _ in range(per_call)]


def test_rollout_rounds_train_shuffled_mini_batches_for_their_epochs_and_resume():
    calls: list = []
    r = make_rollouts(calls, counter(4))  # micro-batches of 4 rows over 2 data shards, 4 a round
    assert r.steps_per_round == 4  # 2 passes x (4 micro-batches / 2 per step)
    seen = []
    for at in range(4):
        parts, info = r.for_step(at, jnp.zeros(()))
        assert len(parts) == 2 and all(len(rows) == 4 for rows, _ in parts)
        assert ("sgo_len" in info) == (at == 0) and info["source"] == "sgo"
        for rows, (old, teacher) in parts:
            ids = [p[0] for p, _ in rows]
            assert [resp for _, resp in rows] == [[i, 1] for i in ids]  # rows and scores stay together
            np.testing.assert_array_equal(old[:, 0], [-i for i in ids])
            np.testing.assert_array_equal(teacher[:, 1], [-2 * i for i in ids])
            # each shard's half of a micro-batch comes from that shard's rollouts (prompt i: shard (i//2)%2)
            assert [(i // 2) % 2 for i in ids] == [0, 0, 1, 1]
            seen.append(ids)
    assert calls == [4] * 4  # the round sampled once, a micro-batch at a time
    first, second = sorted(np.concatenate(seen[:4])), sorted(np.concatenate(seen[4:]))
    assert first == second == list(range(16))  # every pass trains on each rollout once
    assert seen[:4] != seen[4:]  # in a fresh order
    r.for_step(4, jnp.zeros(()))
    assert calls == [4] * 8  # the next round

    # A checkpoint inside a round: a fresh Rounds continues with the same micro-batches.
    calls2: list = []
    again = make_rollouts(calls2, counter(4))
    again.load({"round": None, "shards": {}})  # saved before the first rollout
    assert again.round is None
    again.load(r.state())
    want = r.for_step(6, None)[0]
    got = again.for_step(6, None)[0]
    assert calls2 == [] and [rows for rows, _ in got] == [rows for rows, _ in want]
    # Two hosts (one data shard each) save their halves; a one-host run loads the merged state, and a
    # host of other shards is refused.
    halves = []
    for shard in (0, 1):
        h = make_rollouts([], counter(2), shards=(shard,))
        h.for_step(0, jnp.zeros(()))
        halves.append(h.state())
    one = make_rollouts([], counter(4))
    one.load(minillm.merge_states(halves))
    assert one.round == 0 and [len(one.pools[s]) for s in (0, 1)] == [8, 8]
    with pytest.raises(ValueError, match="other data shards"):
        make_rollouts([], counter(4), shards=(2,)).load(minillm.merge_states(halves))
