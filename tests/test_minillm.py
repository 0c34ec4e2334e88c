"""MiniLLM: the policy-gradient terms against a hand-computed example, and a tiny run that lowers the
student's reverse KL on its own samples."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distillm_jax import minillm

# One rollout row: a prompt position (masked out) and four response tokens.
MASK = np.array([[0, 1, 1, 1, 1]], np.float32)
OLD = np.array([[0.0, -1.0, -0.5, -2.0, -0.3]], np.float32)  # log q_old of the sampled tokens
TEACHER = np.array([[0.0, -0.5, -1.5, -1.0, -0.1]], np.float32)  # log p
NOW = np.array([[0.0, -0.7, -0.5, -2.3, -0.3]], np.float32)  # log q_θ after some updates


def test_future_mean_is_the_length_normalised_reward_after_each_token():
    rewards = TEACHER - OLD  # 0.5, -1.0, 1.0, 0.2 on the response
    got = np.asarray(minillm.future_mean(jnp.asarray(rewards), jnp.asarray(MASK)))
    want = [0.0, (-1.0 + 1.0 + 0.2) / 3, (1.0 + 0.2) / 2, 0.2, 0.0]
    np.testing.assert_allclose(got[0], want, rtol=1e-6, atol=1e-7)


def test_policy_loss_and_gradient_by_hand():
    alpha, clip = 0.2, 0.2
    pg, weights, metrics = minillm.policy_terms(
        jnp.asarray(NOW), OLD, TEACHER, MASK, mix_alpha=alpha, clip=clip
    )
    # By hand: advantages, ratios q_θ/q_old, importance weights q_old / (α p + (1 − α) q_old).
    adv = [0.2 / 3, 0.6, 0.2, 0.0]
    ratio = [math.exp(0.3), 1.0, math.exp(-0.3), 1.0]  # the first is clipped to 1.2
    w = [1 / (alpha * math.exp(t - o) + 1 - alpha) for t, o in zip(TEACHER[0, 1:], OLD[0, 1:], strict=True)]
    terms = [
        -wi * min(r * a, min(max(r, 1 - clip), 1 + clip) * a) for wi, r, a in zip(w, ratio, adv, strict=True)
    ]
    np.testing.assert_allclose(float(pg), sum(terms) / 4, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(weights)[0, 1:], w, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["reward"]), (0.5 - 1.0 + 1.0 + 0.2) / 4, rtol=1e-5)
    assert max(w) <= 1 / (1 - alpha) + 1e-6  # the weights are bounded by the mixture
    grad = jax.grad(lambda x: minillm.policy_terms(x, OLD, TEACHER, MASK, mix_alpha=alpha, clip=clip)[0])(
        jnp.asarray(NOW)
    )
    # d/d log q_θ of −w·ρ·A is −w·ρ·A (over the 4 tokens); the clipped token gets none.
    want = [0.0, 0.0] + [-w[i] * ratio[i] * adv[i] / 4 for i in (1, 2, 3)]
    np.testing.assert_allclose(np.asarray(grad)[0], want, rtol=1e-5, atol=1e-8)


def test_no_teacher_share_means_unit_weights():
    _, weights, _ = minillm.policy_terms(jnp.asarray(NOW), OLD, TEACHER, MASK, mix_alpha=0.0, clip=0.2)
    np.testing.assert_allclose(np.asarray(weights), 1.0)


def test_loss_adds_the_weighted_single_step_reverse_kl():
    rng = np.random.default_rng(0)
    s, t = rng.standard_normal((2, 1, 5, 7)).astype(np.float32)
    labels = np.array([[0, 3, 1, 6, 2]])
    old = np.asarray(jax.nn.log_softmax(s))[0, np.arange(5), labels[0]][None]
    total, parts = minillm.loss(s, t, labels, MASK, old, TEACHER, mix_alpha=0.2, clip=0.2)
    ls, lt = jax.nn.log_softmax(s), jax.nn.log_softmax(t)
    rkl = np.asarray(jnp.sum(jnp.exp(ls) * (ls - lt), -1))
    _, w, _ = minillm.policy_terms(jnp.asarray(old), old, TEACHER, MASK, mix_alpha=0.2, clip=0.2)
    want = float(np.sum(np.asarray(w) * rkl * MASK) / MASK.sum())
    np.testing.assert_allclose(float(parts["rkl"]), want, rtol=1e-5)
    np.testing.assert_allclose(float(total), float(parts["pg"]) + want, rtol=1e-5)
    np.testing.assert_allclose(float(parts["ratio"]), 1.0, rtol=1e-6)  # first epoch: q_θ == q_old


def test_rollouts_keep_a_round_for_its_epochs_and_through_a_checkpoint():
    calls = []

    class Done:
        def __init__(self, rows):
            self._rows = rows

        def rows(self):
            return self._rows

    def sample(params, prompts, key):
        calls.append(len(prompts))
        return Done([(p, [5, 1]) for p in prompts])

    def score(params, rows):
        return np.full((len(rows), 3), -1.0, np.float32), np.full((len(rows), 3), -2.0, np.float32)

    r = minillm.Rollouts(2, sample, score, lambda: [([1, 2], [3])] * 4, seed=0, shards=(0, 1))
    rows0, _, info = r.for_step(0, jnp.zeros(()))
    rows1, _, _ = r.for_step(1, jnp.zeros(()))
    assert rows0 is rows1 and calls == [4] and info["sgo_len"] == 2.0
    r.for_step(2, jnp.zeros(()))
    assert calls == [4, 4]
    fresh = minillm.Rollouts(2, sample, score, lambda: [], seed=0, shards=(0, 1))
    fresh.load({"round": None, "shards": {}})  # saved before the first rollout
    assert fresh.round is None
    fresh.load(r.state())
    assert fresh.round == 1 and fresh.rows == r.rows
    np.testing.assert_array_equal(fresh.scores[1], r.scores[1])
    fresh.for_step(3, None)  # same round: no new sampling
    assert calls == [4, 4]
    # Two hosts (one data shard each) save their halves; a one-host run loads the merged state, and a
    # host of other shards is refused.
    halves = []
    for shard in (0, 1):
        prompts = [([shard], [3])] * 2
        h = minillm.Rollouts(2, sample, score, lambda p=prompts: p, seed=0, shards=(shard,))
        h.for_step(0, jnp.zeros(()))
        halves.append(h.state())
    merged = minillm.merge_states(halves)
    one = minillm.Rollouts(2, sample, score, lambda: [], seed=0, shards=(0, 1))
    one.load(merged)
    assert [p for p, _ in one.rows] == [[0], [0], [1], [1]] and one.scores[0].shape == (4, 3)
    with pytest.raises(ValueError, match="other data shards"):
        minillm.Rollouts(2, sample, score, lambda: [], seed=0, shards=(2,)).load(merged)
