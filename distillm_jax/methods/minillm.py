"""MiniLLM (Gu et al., ICLR 2024): reverse-KL distillation by policy gradient, the one baseline of the
paper's tables that is not "a data strategy plus a divergence". Implemented as the authors' code
(microsoft/LMOps, ``minillm/``) runs it; where we differ and why: docs/method.md.

The student ``q_θ`` is a policy whose per-token reward is ``r_t = log p(y_t) − log q_old(y_t)`` (summed
over a response it is minus the sequence-level reverse KL), scaled and clipped. MiniLLM's devices:

- **Teacher-mixed sampling**: rollouts are drawn from ``p̃ = α·p + (1−α)·q_old`` (α = 0.2); the PPO
  ratio is importance-weighted by ``w_t = q_old(y_t) / p̃(y_t)`` token by token.
- **Single-step decomposition**: the full-vocabulary reverse KL ``KL(q_θ(·|y<t) ‖ p(·|y<t))`` of every
  position, with its exact gradient, beside the policy gradient.
- **Length-normalised, discounted, whitened advantages** (``advantages``).
- **PPO**: rounds of rollouts (256 prompts), each trained for 4 passes of shuffled mini-batches with the
  weighted ratio clipped to ``[1 − clip, 1 + clip]`` (``Rounds``); an LM term on pre-training text is
  the trainer's ``loss.lm_coef`` (with ``loss.lm_kd_ratio``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from distillm_jax import distributed, losses, step
from distillm_jax.errors import ConfigError
from distillm_jax.methods import base, offpolicy, register, sources

if TYPE_CHECKING:
    from distillm_jax.run.build import Run

Array = jax.Array


def mixture_log_probs(teacher_logp: Array, student_logp: Array, alpha: float) -> Array:
    """``log(α·p + (1−α)·q)`` of the sampled tokens, from their log-probabilities (log space)."""
    if alpha <= 0.0:
        return student_logp
    if alpha >= 1.0:
        return teacher_logp
    return jnp.logaddexp(math.log(alpha) + teacher_logp, math.log1p(-alpha) + student_logp)


def rewards(old_logp: Array, teacher_logp: Array, mask: Array, *, scale: float, clip: float) -> Array:
    """Per-token rewards ``r_t = log p(y_t) − log q_old(y_t)``, divided by ``scale`` and clipped to
    ``±clip`` as LMOps' MiniLLM does (``--reward-scaling 0.5``, ``--cliprange-reward 100``); 0 off the
    response."""
    r = jnp.clip((teacher_logp - old_logp) / scale, -clip, clip)
    return jnp.where(mask != 0, r, 0.0)


def advantages(rewards: Array, mask: Array, *, gamma: float) -> Array:
    """MiniLLM's advantage of each response token ``t`` of ``[B, T]``: the discounted return from ``t``
    on (``Σ_{s≥t} γ^{s−t} r_s``, the current token included), divided by the number of response tokens
    from ``t`` on (length normalisation), then whitened over the batch's response tokens (mean 0,
    unbiased variance 1). 0 off the response; constants for the gradient."""
    keep = (mask != 0).astype(jnp.float32)
    steps = jnp.arange(rewards.shape[-1])
    gap = steps[:, None] - steps[None, :]  # [s, t]: s − t
    discount = jnp.where(gap >= 0, gamma ** jnp.maximum(gap, 0).astype(jnp.float32), 0.0)
    returns = jnp.matmul(rewards * keep, discount, precision=jax.lax.Precision.HIGHEST)
    remaining = jnp.flip(jnp.cumsum(jnp.flip(keep, -1), -1), -1)
    normed = returns / jnp.maximum(remaining, 1.0)
    n = jnp.maximum(keep.sum(), 1.0)
    mean = jnp.sum(normed * keep) / n
    var = jnp.sum(jnp.square(normed - mean) * keep) / jnp.maximum(n - 1.0, 1.0)
    return jax.lax.stop_gradient(jnp.where(keep > 0, (normed - mean) * jax.lax.rsqrt(var + 1e-8), 0.0))


@dataclasses.dataclass(frozen=True)
class MiniLLMSettings:
    """MiniLLM's knobs, as the authors ran them (``minillm.*`` in the config; ``DEFAULTS``)."""

    mix_alpha: float = 0.2  # rollouts from mix_alpha·p + (1 − mix_alpha)·q_old
    clip: float = 0.2  # PPO clipping of (q_θ / q_old)·w
    gamma: float = 0.95  # discount of future rewards
    reward_scale: float = 0.5  # rewards divided by it
    reward_clip: float = 100.0  # then clipped to ±reward_clip
    rollouts: int = 256  # prompts sampled per round (a multiple of optim.batch_size)
    ppo_epochs: int = 4  # passes over a round's rollouts, in shuffled mini-batches


def policy_terms(
    logp: Array,
    old_logp: Array,
    teacher_logp: Array,
    mask: Array,
    settings: MiniLLMSettings = MiniLLMSettings(),
) -> tuple[Array, dict[str, Array]]:
    """The clipped policy-gradient loss, as LMOps computes it.

    Args:
      logp: ``[B, T]`` log q_θ of the sampled tokens under the params being trained.
      old_logp, teacher_logp: ``[B, T]`` log q_old and log p of the same tokens, scored once when the
        rollout was sampled (constants).
      mask: ``[B, T]``, the response tokens.
    Returns:
      ``(pg_loss, metrics)``: the token-level mean of ``max(−A·ρw, −A·clip(ρw, 1 ± clip))`` with
      ``ρ = q_θ/q_old`` and the importance weight ``w = q_old/p̃`` (PPO clips the weighted ratio), and
      the mean raw reward, weight and ratio.
    """
    old_logp, teacher_logp = jax.lax.stop_gradient((old_logp, teacher_logp))
    weights = jnp.exp(old_logp - mixture_log_probs(teacher_logp, old_logp, settings.mix_alpha))
    r = rewards(old_logp, teacher_logp, mask, scale=settings.reward_scale, clip=settings.reward_clip)
    adv = advantages(r, mask, gamma=settings.gamma)
    ratio = jnp.exp(jnp.where(mask != 0, logp - old_logp, 0.0))
    weighted = ratio * weights
    clipped = jnp.clip(weighted, 1.0 - settings.clip, 1.0 + settings.clip)
    per_token = jnp.maximum(-adv * weighted, -adv * clipped)
    metrics = {
        "reward": losses.masked_mean(teacher_logp - old_logp, mask),
        "weight": losses.masked_mean(weights, mask),
        "ratio": losses.masked_mean(ratio, mask),
    }
    return losses.masked_mean(per_token, mask), metrics


def loss(
    student_logits: Array,
    teacher_logits: Array,
    labels: Array,
    mask: Array,
    old_logp: Array,
    teacher_logp: Array,
    settings: MiniLLMSettings = MiniLLMSettings(),
) -> tuple[Array, dict[str, Array]]:
    """MiniLLM's loss on a rollout batch: the clipped policy gradient plus the single-step term, the
    full-vocabulary reverse KL ``KL(q_θ(·|y<t) ‖ p(·|y<t))`` of each response position (not importance
    weighted, as LMOps' ``--single-step-reg``). ``[B, T, V]`` logits, ``[B, T]`` the rest."""
    logp = losses.label_log_probs(student_logits, labels, mask)
    pg, metrics = policy_terms(logp, old_logp, teacher_logp, mask, settings)
    single = losses.masked_mean(losses.token_divergence("rkl", student_logits, teacher_logits), mask)
    return pg + single, {**metrics, "pg": pg, "rkl": single}


class Rounds:
    """MiniLLM's PPO rounds, as LMOps runs them. Round ``k`` samples ``units`` micro-batches of prompts
    (``next_rows()``: this host's rows of one global micro-batch, the sampler's batch shape) from the
    teacher-mixed policy (``submit(params, prompts, key)`` -> a ``Pending`` of (prompt, response) rows,
    see ``offpolicy.GenerationWorker``), scores each once (``score(params, rows) -> (old_logp,
    teacher_logp)``, host ``[b, T]`` arrays) and then trains ``epochs`` passes over them, each pass a
    fresh shuffle of every data shard's rollouts cut into steps of ``accum`` micro-batches: a round is
    ``epochs · units / accum`` optimizer steps. The round's rollouts (and scores) go into checkpoints,
    so a run resumed inside a round trains on the same ones in the same order."""

    def __init__(
        self,
        epochs: int,
        units: int,
        accum: int,
        submit: Callable,
        score: Callable,
        next_rows: Callable[[], list],
        *,
        seed: int,
        shards: Sequence[int],
    ):
        if units % accum:
            raise ValueError(f"a round of {units} micro-batches does not split into steps of {accum}")
        self.epochs, self.units, self.accum = epochs, units, accum
        self.submit, self.score, self.next_rows = submit, score, next_rows
        self.seed, self.shards = seed, tuple(shards)
        self.round: int | None = None
        self.pools: dict[int, list] = {}  # data shard -> [(prompt, response, old_logp, teacher_logp)]

    @property
    def steps_per_round(self) -> int:
        return self.epochs * self.units // self.accum

    def _sample_round(self, k: int, params) -> dict:
        jax.block_until_ready(params)
        t = time.perf_counter()
        pools: dict[int, list] = {s: [] for s in self.shards}
        lengths = []
        for u in range(self.units):
            prompts = [p for p, _ in self.next_rows()]
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed + 0x313), k), u)
            rows = self.submit(params, prompts, key).rows()
            old, teacher = self.score(params, rows)
            n = len(rows) // len(self.shards)
            for i, s in enumerate(self.shards):
                for j in range(i * n, (i + 1) * n):
                    pools[s].append((list(rows[j][0]), list(rows[j][1]), old[j], teacher[j]))
            lengths += [len(r) for _, r in rows]
        self.round, self.pools = k, pools
        return {"gen_s": time.perf_counter() - t, "sgo_len": [float(np.mean(lengths))]}

    def for_step(self, step: int, params) -> tuple[list[tuple[list, tuple]], dict]:
        """The ``accum`` micro-batches step ``step`` trains on, each ``(rows, (old_logp, teacher_logp))``,
        and the step's info (a round's first step: the seconds spent sampling and scoring it)."""
        k, j = divmod(step, self.steps_per_round)
        info = {"source": "sgo", "gen_s": 0.0}
        if k != self.round:
            info.update(self._sample_round(k, params))
        epoch, m = divmod(j, self.units // self.accum)
        out = []
        for unit in range(m * self.accum, (m + 1) * self.accum):
            picked = []
            for s in self.shards:
                pool = self.pools[s]
                n = len(pool) // self.units
                order = np.random.default_rng([self.seed, k, epoch, s]).permutation(len(pool))
                picked += [pool[i] for i in order[unit * n : (unit + 1) * n]]
            rows = [(p, r) for p, r, _, _ in picked]
            scores = tuple(np.stack([x[i] for x in picked]).astype(np.float32) for i in (2, 3))
            out.append((rows, scores))
        return out, info

    def state(self) -> dict:
        """The round's rollouts and scores, keyed by data shard, so that every host's states merge into
        one (``merge_states``) that reshards on load."""
        shards = {
            str(s): [[p, r, np.asarray(o).tolist(), np.asarray(t).tolist()] for p, r, o, t in pool]
            for s, pool in self.pools.items()
        }
        return {"round": self.round, "shards": shards if self.round is not None else {}}

    def load(self, state: dict) -> None:
        """Take this host's shards of a (merged) state."""
        if state["round"] is None:
            return
        if any(str(s) not in state["shards"] for s in self.shards):
            raise ValueError("the checkpoint's MiniLLM rollout was written for other data shards")
        self.round = state["round"]
        self.pools = {
            s: [
                (p, r, np.asarray(o, np.float32), np.asarray(t, np.float32))
                for p, r, o, t in state["shards"][str(s)]
            ]
            for s in self.shards
        }


def merge_states(states: Sequence[dict]) -> dict:
    """One rollout state from every host's (``Rounds.state``), their shards side by side."""
    return {"round": states[0]["round"], "shards": {k: v for st in states for k, v in st["shards"].items()}}


def label_log_probs(student, teacher, batch: dict) -> tuple[Array, Array]:
    """log q and log p of every label [B, T] (0 off the loss mask): how a rollout is scored once, with
    the same forward pass (and vocabulary rows) its loss uses."""
    s_logits, t_logits = step.both_logits(student, teacher, batch)
    labels, mask = batch["labels"], batch["loss_mask"]
    return losses.label_log_probs(s_logits, labels, mask), losses.label_log_probs(t_logits, labels, mask)


def make_score_step(student, teacher) -> Callable:
    """``score(params, teacher_state, batch) -> (log q, log p)`` of the batch's labels [B, T], sharded
    as the labels are (so that every process reads back the rows it fed)."""
    s_graph, _, frozen = step.split_student(student)
    t_graph = nnx.graphdef(teacher)

    def score(params, frozen, teacher_state, batch):
        model = nnx.merge(s_graph, params, frozen)
        return label_log_probs(model, nnx.merge(t_graph, teacher_state), batch)

    jitted: dict = {}

    def call(params, teacher_state, batch):
        rows = getattr(batch["labels"], "sharding", None)  # None: a host batch, placed by jit
        if rows not in jitted:
            jitted[rows] = jax.jit(score, out_shardings=None if rows is None else (rows, rows))
        return jitted[rows](params, frozen, teacher_state, batch)

    return call


class RolloutSource(sources.Source):
    """MiniLLM's rollout rounds (``Rounds``) on the training prompts: ``minillm.rollouts`` prompts a
    round, sampled a micro-batch at a time from the teacher-mixed policy with ``offpolicy.*`` settings,
    scored once by the student that sampled them and the teacher."""

    merge = staticmethod(merge_states)

    def __init__(self, run: Run, rows: list, model_of: Callable, teacher_state):
        super().__init__(run, rows, run.settings.seed)
        s, own = run.settings, run.settings.own
        new, mix = s.new_tokens(s.sgo), (run.teacher, own.mix_alpha)
        worker = offpolicy.GenerationWorker(
            lambda params, prompts, key: run.sampler.sample(
                model_of(params), prompts, new, s.sgo.sampling, key, mix=mix
            ),
            threaded=False,
        )
        score_step = make_score_step(run.student, run.teacher)

        def score(params, rows):
            out = score_step(params, teacher_state, run.batches.to_devices(run.batches.host(rows)))
            return tuple(np.asarray(distributed.local_rows(x), np.float32) for x in out)

        self.rounds = Rounds(
            own.ppo_epochs,
            own.rollouts // s.optim.micro,
            s.optim.grad_accum,
            worker.submit,
            score,
            self.next_rows,
            seed=s.seed,
            shards=run.batches.shards,
        )

    def for_step(self, index: int, params) -> tuple[list[tuple[dict, int]], dict]:
        parts, info = self.rounds.for_step(index, params)
        out = []
        for rows, (old_logp, teacher_logp) in parts:
            batch = {**self.run.batches.host(rows), "old_logp": old_logp, "teacher_logp": teacher_logp}
            out.append(sources.placed(self.run, batch))
        return out, info

    def state(self) -> dict:
        return self.rounds.state()

    def load(self, state: dict) -> None:
        self.rounds.load(state)


class MiniLLM(base.Method):
    name, about = "minillm", "policy gradient of the reverse KL on teacher-mixed rollouts"
    chunked = False
    samplers = (("student", "teacher"),)
    dropout = False  # its policy trains in eval mode ("no dropout for RL", microsoft/LMOps)
    group = "minillm"

    def defaults(self) -> dict[str, ConfigDict]:
        d = MiniLLMSettings()
        # As LMOps runs it (docs/method.md); its sampling is offpolicy.*.
        return {"minillm": ConfigDict({f.name: getattr(d, f.name) for f in dataclasses.fields(d)})}

    def check(self, c: ConfigDict) -> None:
        m = c.minillm
        if not 0.0 <= m.mix_alpha <= 1.0 or m.ppo_epochs < 1 or not 0.0 < m.clip < 1.0:
            raise ConfigError(
                "minillm: need mix_alpha in [0, 1], ppo_epochs >= 1 and clip in (0, 1), got "
                f"{m.mix_alpha}, {m.ppo_epochs}, {m.clip}"
            )
        if not 0.0 < m.gamma <= 1.0 or m.reward_scale <= 0 or m.reward_clip <= 0:
            raise ConfigError(
                "minillm: need gamma in (0, 1], reward_scale > 0 and reward_clip > 0, got "
                f"{m.gamma}, {m.reward_scale}, {m.reward_clip}"
            )

    def check_run(self, c: ConfigDict) -> None:
        m = c.minillm
        if m.rollouts < 1 or m.rollouts % c.optim.batch_size:
            raise ConfigError(
                f"minillm.rollouts ({m.rollouts}) must be a positive multiple of optim.batch_size "
                f"({c.optim.batch_size}): each round trains whole mini-batches"
            )

    def settings(self, c: ConfigDict) -> MiniLLMSettings:
        m = c.minillm
        floats = [float(m[k]) for k in ("mix_alpha", "clip", "gamma", "reward_scale", "reward_clip")]
        return MiniLLMSettings(*floats, int(m.rollouts), int(m.ppo_epochs))

    def loss(self, student, teacher, batch: dict, cfg: step.LossConfig) -> tuple[Array, dict]:
        s_logits, t_logits = step.both_logits(student, teacher, batch)
        return loss(
            s_logits,
            t_logits,
            batch["labels"],
            batch["loss_mask"],
            batch["old_logp"],
            batch["teacher_logp"],
            cfg.own,
        )

    def batch_like(self, batch: dict) -> dict:
        logp = np.zeros(batch["labels"].shape, np.float32)
        return {**batch, "old_logp": logp, "teacher_logp": logp}

    def updates_per_epoch(self, batches: int, own: MiniLLMSettings) -> int:
        """An epoch of prompts: every rollout trains ``ppo_epochs`` steps' worth."""
        return batches * own.ppo_epochs

    def source(self, run: Run, rows: list, total: int, model_of: Callable, teacher_state) -> RolloutSource:
        return RolloutSource(run, rows, model_of, teacher_state)


register(MiniLLM())
