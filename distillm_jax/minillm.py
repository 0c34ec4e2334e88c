"""MiniLLM (Gu et al., ICLR 2024; PAPER.md §3): reverse-KL distillation by policy gradient, the one
baseline of the paper's tables that is not "a data strategy plus a divergence".

The student ``q_θ`` is a policy whose per-token reward is ``r_t = log p(y_t) − log q(y_t)`` (summed over a
response it is minus the sequence-level reverse KL). MiniLLM's three devices, all here:

- **Teacher-mixed sampling**: rollouts are drawn from ``p̃ = α·p + (1−α)·q_old`` (α = 0.2), which keeps
  them away from the student's degenerate modes; each token's loss is importance-weighted by
  ``w_t = q_old(y_t) / p̃(y_t)`` (at most ``1/(1−α)``), one token at a time as the paper approximates it.
- **Single-step decomposition**: the reward of the token being chosen is taken exactly, as the
  full-vocabulary reverse KL ``KL(q_θ(·|y<t) ‖ p(·|y<t))`` with its gradient, and only the future
  rewards go through the policy gradient.
- **Length normalisation**: the future reward of position ``t`` is the *mean* of ``r`` over the response
  tokens after ``t``, so long responses are not favoured.

On top of these, PPO-style updates: each rollout batch trains ``ppo_epochs`` optimizer steps with the
ratio ``q_θ/q_old`` clipped to ``[1 − clip, 1 + clip]``; an optional LM loss is the trainer's
``loss.lm_coef``. ``Rollouts`` keeps the current rollout batch (and its scores) for the trainer and in
checkpoints, so a run resumed in the middle of a rollout's epochs trains on the same one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from distillm_jax import losses

Array = jax.Array


def mixture_log_probs(teacher_logp: Array, student_logp: Array, alpha: float) -> Array:
    """``log(α·p + (1−α)·q)`` of the sampled tokens, from their log-probabilities (log space)."""
    if alpha <= 0.0:
        return student_logp
    if alpha >= 1.0:
        return teacher_logp
    return jnp.logaddexp(math.log(alpha) + teacher_logp, math.log1p(-alpha) + student_logp)


def future_mean(rewards: Array, mask: Array) -> Array:
    """Per position ``t`` of ``[B, T]``: the mean of ``rewards`` over the masked positions after ``t``
    (0 where there are none): MiniLLM's length-normalised long-term reward."""
    keep = (mask != 0).astype(jnp.float32)
    r = jnp.where(mask != 0, rewards, 0.0)
    after = jnp.flip(jnp.cumsum(jnp.flip(r, -1), -1), -1) - r
    count = jnp.flip(jnp.cumsum(jnp.flip(keep, -1), -1), -1) - keep
    return jnp.where((mask != 0) & (count > 0), after / jnp.maximum(count, 1.0), 0.0)


def policy_terms(
    logp: Array, old_logp: Array, teacher_logp: Array, mask: Array, *, mix_alpha: float, clip: float
) -> tuple[Array, Array, dict[str, Array]]:
    """The clipped policy-gradient loss over the future rewards, and the per-token importance weights.

    Args:
      logp: ``[B, T]`` log q_θ of the sampled tokens under the params being trained.
      old_logp, teacher_logp: ``[B, T]`` log q_old and log p of the same tokens, scored once when the
        rollout was sampled (constants).
      mask: ``[B, T]``, the response tokens.
    Returns:
      ``(pg_loss, weights, metrics)``: the token-level mean of ``−w·min(ρA, clip(ρ)A)``, the weights
      ``w = q_old/p̃`` [B, T] (for the single-step term) and the mean reward, advantage and ratio.
    """
    old_logp, teacher_logp = jax.lax.stop_gradient((old_logp, teacher_logp))
    weights = jnp.exp(old_logp - mixture_log_probs(teacher_logp, old_logp, mix_alpha))
    advantages = future_mean(teacher_logp - old_logp, mask)
    ratio = jnp.exp(jnp.where(mask != 0, logp - old_logp, 0.0))
    clipped = jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    per_token = -weights * jnp.minimum(ratio * advantages, clipped * advantages)
    metrics = {
        "reward": losses.masked_mean(teacher_logp - old_logp, mask),
        "advantage": losses.masked_mean(advantages, mask),
        "ratio": losses.masked_mean(ratio, mask),
    }
    return losses.masked_mean(per_token, mask), weights, metrics


def loss(
    student_logits: Array,
    teacher_logits: Array,
    labels: Array,
    mask: Array,
    old_logp: Array,
    teacher_logp: Array,
    *,
    mix_alpha: float = 0.2,
    clip: float = 0.2,
) -> tuple[Array, dict[str, Array]]:
    """MiniLLM's loss on a rollout batch: the clipped policy gradient of the future rewards plus the
    importance-weighted single-step reverse KL (``[B, T, V]`` logits, ``[B, T]`` the rest)."""
    logp = losses.label_log_probs(student_logits, labels, mask)
    pg, weights, metrics = policy_terms(logp, old_logp, teacher_logp, mask, mix_alpha=mix_alpha, clip=clip)
    rkl = losses.token_divergence("rkl", student_logits, teacher_logits)
    single = losses.masked_mean(weights * rkl, mask)
    return pg + single, {**metrics, "pg": pg, "rkl": single}


class Rollouts:
    """The rollout batch of the current PPO round: sampled (by ``sample(params, prompts, key)`` -> a
    ``Pending`` of (prompt, response) rows, see ``offpolicy.GenerationWorker``) for the next prompts of
    ``next_rows()`` at every ``epochs``-th step and scored once by ``score(params, rows) -> (old_logp,
    teacher_logp)`` (host ``[B, T]`` arrays in the batch layout of the rows). ``for_step`` hands the same
    rows and scores to the ``epochs`` steps of the round."""

    def __init__(
        self,
        epochs: int,
        sample: Callable,
        score: Callable,
        next_rows: Callable[[], list],
        *,
        seed: int,
        shards: Sequence[int],
    ):
        self.epochs, self.sample, self.score, self.next_rows = epochs, sample, score, next_rows
        self.seed, self.shards = seed, tuple(shards)
        self.round: int | None = None
        self.rows: list = []
        self.scores: tuple[np.ndarray, np.ndarray] | None = None

    def for_step(self, step: int, params) -> tuple[list, tuple[np.ndarray, np.ndarray], dict]:
        """(rows, (old_logp, teacher_logp), info) that step ``step`` trains on."""
        k, info = step // self.epochs, {"source": "sgo", "gen_s": 0.0}
        if k != self.round:
            jax.block_until_ready(params)
            t = time.perf_counter()
            prompts = [p for p, _ in self.next_rows()]
            key = jax.random.fold_in(jax.random.key(self.seed + 0x313), k)
            self.rows = self.sample(params, prompts, key).rows()
            self.scores = self.score(params, self.rows)
            self.round = k
            info["gen_s"] = time.perf_counter() - t
            info["sgo_len"] = float(np.mean([len(r) for _, r in self.rows]))
        return self.rows, self.scores, info

    def state(self) -> dict:
        """The round's rows and scores, keyed by data shard (one slice of the rows each) so that every
        host's states merge into one (``merge_states``) that reshards on load."""
        if self.round is None:
            return {"round": None, "shards": {}}
        n = len(self.rows) // len(self.shards)
        old, teacher = self.scores
        parts = {
            str(s): [
                [list(p), list(r), old[j].tolist(), teacher[j].tolist()]
                for j, (p, r) in enumerate(self.rows[i * n : (i + 1) * n], start=i * n)
            ]
            for i, s in enumerate(self.shards)
        }
        return {"round": self.round, "shards": parts}

    def load(self, state: dict) -> None:
        """Take this host's shards of a (merged) state."""
        if state["round"] is None:
            return
        mine = [state["shards"][str(s)] for s in self.shards if str(s) in state["shards"]]
        if len(mine) != len(self.shards):
            raise ValueError("the checkpoint's MiniLLM rollout was written for other data shards")
        rows = [x for part in mine for x in part]
        self.round = state["round"]
        self.rows = [(p, r) for p, r, _, _ in rows]
        self.scores = tuple(np.asarray([x[i] for x in rows], np.float32) for i in (2, 3))


def merge_states(states: Sequence[dict]) -> dict:
    """One rollout state from every host's (``Rollouts.state``), their shards side by side."""
    return {"round": states[0]["round"], "shards": {k: v for st in states for k, v in st["shards"].items()}}
