"""Student-generated outputs (SGOs): where each training step's batch comes from (docs/method.md).

DistiLLM's second idea: train on ground truth until the student's validation loss stops improving, then on
the student's own samples with a probability ``φ`` that rises each time it gets worse, and reuse those
samples from a replay buffer instead of generating every step (generation is what makes on-policy
distillation slow). The baselines are other data strategies over the same pieces: ImitKD generates every
step into the buffer and trains on a buffer sample; GKD, as the DistiLLM authors run it, does the same
with a fixed probability λ (else ground truth); GKD as its own paper (and TRL) runs it trains on the
fresh samples themselves with probability λ; ``onpolicy`` on fresh samples every step.

Everything here is host-side: the choice of source is a pure function of (seed, step, scheduler state,
buffer size), so every host of a pod picks the same source for a step (docs/architecture.md §7), and a
resumed run picks what the killed one would have. The device work — the sampler — is issued by the
caller's thread through ``GenerationWorker.submit``; only copying its result to the host and cutting rows
at their EOS happen on the worker's thread.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import numpy as np

from distillm_jax.data.batching import Row
from distillm_jax.distributed import local_rows

REPLAY_RATIOS = ("decreasing", "constant", "increasing")
PHI_STEP = 0.1
_SLACK = 1e-9  # ``0.3 >= 0.2 + 0.1`` holds as written, not as float rounding would have it


def uniform(seed: int, step: int) -> float:
    """The step's draw in [0, 1): the same on every host and on a resumed run (no state to carry)."""
    return float(np.random.default_rng([seed, 0x5EED, step]).random())


@dataclasses.dataclass
class AdaptiveScheduler:
    """``φ``, the probability of training on SGOs, raised by 0.1 (to at most 1) at each evaluation whose
    validation CE is at least ``loss_eps`` above ``prev_loss``; ``prev_loss`` starts at the CE measured
    before training and moves only when ``φ`` rises."""

    loss_eps: float = 0.1
    replay_ratio: str = "decreasing"
    phi: float = 0.0
    prev_loss: float | None = None

    def __post_init__(self):
        if self.replay_ratio not in REPLAY_RATIOS:
            raise ValueError(
                f"replay_ratio must be one of {', '.join(REPLAY_RATIOS)}, got {self.replay_ratio!r}"
            )

    def update(self, val_loss: float) -> bool:
        """Take an evaluation's validation CE; True when ``φ`` rose."""
        if self.prev_loss is None:
            self.prev_loss = float(val_loss)
            return False
        if val_loss - self.prev_loss >= self.loss_eps - _SLACK:
            self.phi = min(round(self.phi + PHI_STEP, 6), 1.0)
            self.prev_loss = float(val_loss)
            return True
        return False

    def fresh_threshold(self, step: int, total: int) -> float:
        """Below this draw a step generates fresh SGOs even when the buffer is full; the rest of ``φ``
        replays. ``decreasing`` (the default) moves from all fresh to all replay over the run."""
        frac = step / max(total, 1)
        scale = {"decreasing": 1.0 - frac, "constant": 0.5, "increasing": frac}[self.replay_ratio]
        return self.phi * scale

    def choose(self, r: float, step: int, total: int, buffer_full: bool) -> str:
        """``"sgo"`` (fresh, into the buffer), ``"replay"`` or ``"data"`` for the draw ``r``."""
        if r < self.fresh_threshold(step, total) or (r < self.phi and not buffer_full):
            return "sgo"
        return "replay" if r < self.phi else "data"

    def state(self) -> dict:
        return {"phi": self.phi, "prev_loss": self.prev_loss}

    def load(self, state: dict) -> None:
        self.phi, self.prev_loss = float(state["phi"]), state["prev_loss"]


@dataclasses.dataclass(frozen=True)
class Decision:
    """What one step trains on: ``source`` (``data``, ``sgo`` or ``replay``, for the metrics);
    ``generate``: sample fresh SGOs for the step's prompts; ``store``: push them into the buffer."""

    source: str
    generate: bool = False
    store: bool = False


Strategy = Callable[["AdaptiveScheduler", float, int, int, bool], Decision]
"""A method's data strategy: (scheduler, draw r, step, total steps, buffer full) -> the step's
``Decision``; each SGO method (``methods/sgo.py``) names its own."""


def ground_truth(
    scheduler: AdaptiveScheduler, r: float, step: int, total: int, buffer_full: bool
) -> Decision:
    return Decision("data")


def adaptive(scheduler: AdaptiveScheduler, r: float, step: int, total: int, buffer_full: bool) -> Decision:
    """DistiLLM: SGOs with probability φ, fresh or replayed as the scheduler's replay ratio says."""
    source = scheduler.choose(r, step, total, buffer_full)
    fresh = source == "sgo"
    return Decision(source, generate=fresh, store=fresh)


def replay_every_step(
    scheduler: AdaptiveScheduler, r: float, step: int, total: int, buffer_full: bool
) -> Decision:
    """ImitKD: every step fresh SGOs into the buffer, train on a buffer sample."""
    return Decision("replay", generate=True, store=True)


def replay_with(lam: float) -> Strategy:
    """GKD as the DistiLLM authors run it (``mixed-jsd``): with probability ``lam`` fresh SGOs into the
    buffer and a step on a buffer sample (ImitKD's step), else ground truth."""

    def strategy(
        scheduler: AdaptiveScheduler, r: float, step: int, total: int, buffer_full: bool
    ) -> Decision:
        return Decision("replay", generate=True, store=True) if r < lam else Decision("data")

    return strategy


def fresh_with(lam: float) -> Strategy:
    """GKD as its paper and TRL run it: a step on fresh SGOs with probability ``lam``, else ground truth."""

    def strategy(
        scheduler: AdaptiveScheduler, r: float, step: int, total: int, buffer_full: bool
    ) -> Decision:
        return Decision("sgo", generate=True) if r < lam else Decision("data")

    return strategy


def fresh_every_step(
    scheduler: AdaptiveScheduler, r: float, step: int, total: int, buffer_full: bool
) -> Decision:
    """On-policy: fresh SGOs every step."""
    return Decision("sgo", generate=True)


class ReplayBuffer:
    """The last SGO rows (FIFO), as token ids — never logits: the teacher is re-run on replayed rows.

    The buffer is split like the batch: one FIFO per data-parallel shard of the mesh (a slice of every
    batch's rows), of ``capacity`` rows each. A host keeps the shards its devices feed (``shards``: their
    global indices), so no row crosses hosts; a replayed batch takes the same number of rows from every
    shard, drawn by a generator seeded with (seed, step, micro-batch, shard). The rows a step replays are
    therefore the same however many processes share the shards, and a checkpoint reshards exactly.
    """

    def __init__(self, capacity: int, shards: Sequence[int] = (0,)):
        if capacity < 1:
            raise ValueError(f"replay buffer capacity must be >= 1 row per shard, got {capacity}")
        self.capacity, self.shards = capacity, tuple(shards)
        self.rows = {s: collections.deque(maxlen=capacity) for s in self.shards}

    def __len__(self) -> int:
        """Rows held on this host."""
        return sum(len(d) for d in self.rows.values())

    def full_after(self, extra: int = 0) -> bool:
        """Whether every shard is full once ``extra`` more rows (this host's) have been added."""
        return min(len(d) for d in self.rows.values()) + extra // len(self.shards) >= self.capacity

    @property
    def full(self) -> bool:
        return self.full_after(0)

    def _split(self, n: int) -> int:
        if n % len(self.shards):
            raise ValueError(f"{n} rows do not split over this host's {len(self.shards)} data shards")
        return n // len(self.shards)

    def slices(self, rows: Sequence[Row]) -> dict[int, list[Row]]:
        """This host's rows of a batch, in order, cut into the slices of its data shards."""
        k = self._split(len(rows))
        return {
            s: [(list(p), list(r)) for p, r in rows[i * k : (i + 1) * k]] for i, s in enumerate(self.shards)
        }

    def add(self, rows: Sequence[Row]) -> None:
        """This host's rows of a batch: each shard's slice goes to its FIFO."""
        for s, part in self.slices(rows).items():
            self.rows[s].extend(part)

    def draw(self, n: int, seed: int, step: int, micro: int = 0) -> list[Row]:
        """``n`` rows for this host, as many from each shard, distinct within a shard, uniformly."""
        k, out = self._split(n), []
        for s in self.shards:
            rows = self.rows[s]
            if k > len(rows):
                raise ValueError(f"cannot sample {k} rows from a replay buffer shard holding {len(rows)}")
            rng = np.random.default_rng([seed, 0xB0F, step, micro, s])
            out += [rows[i] for i in rng.choice(len(rows), k, replace=False)]
        return out

    def state(self) -> dict:
        return {str(s): [[p, r] for p, r in d] for s, d in self.rows.items()}

    def load(self, state: dict) -> None:
        """Take this host's shards from a state that may hold others too (a resharded restore)."""
        for s in self.shards:
            self.rows[s].clear()
            self.rows[s].extend((list(p), list(r)) for p, r in state.get(str(s), []))


def cut_at_eos(tokens: np.ndarray, mask: np.ndarray) -> list[list[int]]:
    """Each row's generated tokens up to and including its first EOS (the sampler's mask), or all of
    them when it produced none. A pad id equal to the EOS id changes nothing: the mask is not inferred
    from token values."""
    return [[int(t) for t in row[m != 0]] for row, m in zip(tokens, mask, strict=True)]


@dataclasses.dataclass
class Sampled:
    """What a sampler returns for a micro-batch of prompts: device ``tokens`` / ``mask`` (``generate``'s)
    and, where the caller builds it, the training ``batch`` they make together with the prompts, on the
    devices, with its ``stats`` (device scalars: ``sgo_len``, the mean response length; ``tokens``)."""

    tokens: Any
    mask: Any
    batch: dict | None = None
    stats: dict | None = None


class Pending:
    """Fresh SGOs of one micro-batch. Their training batch (``sampled.batch``) stays on the devices;
    ``rows()`` brings the rows to the host (the replay buffer, a checkpoint), waiting for them.
    ``ready()`` waits until the sampler has finished, without copying anything."""

    def __init__(self, prompts: list[list[int]], sampled: Sampled, start: float):
        self.prompts, self.sampled, self.start = prompts, sampled, start
        self._future: Future | None = None
        self._rows: list[Row] | None = None
        self.wait_seconds = 0.0  # how long the loop was blocked on them
        self.ready_seconds = 0.0  # from dispatch to the sampler done (overlap: mostly behind training)

    def __len__(self) -> int:
        return len(self.prompts)

    def finish(self, to_host: bool) -> None:
        """Wait for the sampler (and, ``to_host``, copy this host's rows, cut at their EOS)."""
        jax.block_until_ready((self.sampled.tokens, self.sampled.mask))
        self.ready_seconds = time.perf_counter() - self.start
        if to_host:
            self._copy()

    def _copy(self) -> None:
        responses = cut_at_eos(local_rows(self.sampled.tokens), local_rows(self.sampled.mask))
        self._rows = list(zip(self.prompts, responses, strict=True))

    def ready(self) -> None:
        if self._future is not None:
            t = time.perf_counter()
            self._future.result()
            self._future = None
            self.wait_seconds += time.perf_counter() - t

    def rows(self) -> list[Row]:
        self.ready()
        if self._rows is None:
            t = time.perf_counter()
            self._copy()
            self.wait_seconds += time.perf_counter() - t
        return self._rows


class GenerationWorker:
    """Turns prompts and the student's params into SGOs through the sampler.

    ``sample(params, prompts, key)`` dispatches the sampler and returns device arrays without waiting:
    a ``Sampled``, or just ``(tokens, mask)``. ``submit`` calls it on the caller's (main) thread, so device
    calls keep one order on every host (docs/architecture.md §7). With ``threaded=False`` (paper mode)
    it then waits for the sampler; with a thread (overlap mode) the waiting, and the copy to the host
    when ``to_host`` (rows for the replay buffer), happen on that thread while training goes on.
    """

    def __init__(self, sample: Callable, *, threaded: bool):
        self.sample = sample
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="sgo") if threaded else None

    def submit(self, params, prompts: Sequence[list[int]], key, *, to_host: bool = True) -> Pending:
        start = time.perf_counter()
        out = self.sample(params, prompts, key)
        pending = Pending(
            [list(p) for p in prompts], out if isinstance(out, Sampled) else Sampled(*out), start
        )
        if self.pool is None:
            pending.finish(to_host)
        else:
            pending._future = self.pool.submit(pending.finish, to_host)
        return pending

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


class Feeder:
    """The rows every step trains on, for any method: ground truth, fresh SGOs or a replayed sample.

    Steps are decided ``lookahead`` steps before they train. With 0 (paper mode) a step's SGOs come from
    the params that train on them: exactly on-policy. With ``k > 0`` (overlap mode) the sampler for step
    ``t + k`` is dispatched at step ``t`` and its rows reach the host on the worker's thread while steps
    ``t .. t + k - 1`` train: SGOs at most ``k`` updates stale, generation hidden behind training.

    ``next_rows()`` returns the ground-truth rows of the next micro-batch (the data order); its prompts
    are also the prompts SGOs answer.
    """

    def __init__(
        self,
        strategy: Strategy,
        scheduler: AdaptiveScheduler,
        buffer: ReplayBuffer,
        worker: GenerationWorker | None,
        next_rows: Callable[[], list[Row]],
        *,
        seed: int,
        total: int,
        micro_batches: int = 1,
        lookahead: int = 0,
    ):
        self.strategy, self.scheduler, self.buffer, self.worker = strategy, scheduler, buffer, worker
        self.next_rows, self.seed, self.total = next_rows, seed, total
        self.micro_batches, self.lookahead = micro_batches, lookahead
        self.queue: collections.deque[dict] = collections.deque()  # decided steps, oldest first
        self.decided = 0  # steps decided so far

    def _decide(self, step: int, params) -> None:
        pending = sum(len(r) for q in self.queue if q["plan"].store for r in q["rows"])
        full = self.buffer.full_after(pending)
        p = self.strategy(self.scheduler, uniform(self.seed, step), step, self.total, full)
        rows = [self.next_rows() for _ in range(self.micro_batches)]
        t = time.perf_counter()
        if p.generate:
            if self.worker.pool is None:  # paper mode: time the sampler, not the steps queued before it
                jax.block_until_ready(params)
                t = time.perf_counter()
            rows = [
                self.worker.submit(params, [pr for pr, _ in micro], self._key(step, k), to_host=p.store)
                for k, micro in enumerate(rows)
            ]
        self.queue.append({"step": step, "plan": p, "rows": rows, "gen_s": time.perf_counter() - t})
        self.decided = step + 1

    def _key(self, step: int, micro: int) -> jax.Array:
        return jax.random.fold_in(jax.random.key(self.seed + 0x5C0), step * self.micro_batches + micro)

    def rows_for(self, step: int, params) -> tuple[list[list[Row] | Pending], dict]:
        """The micro-batches step ``step`` trains on, and its metrics (``phi``, ``source``, ``buffer``,
        ``gen_s``: seconds blocked on generation, ``gen_total_s``: the sampler's seconds, ``sgo_len``:
        each fresh micro-batch's mean response length). A micro-batch is host rows, or — fresh SGOs
        whose training batch the sampler built on the devices — their ``Pending``, whose rows reach the
        host only when the replay buffer keeps them. ``params``: the student's, for SGOs decided now."""
        while self.decided <= min(step + self.lookahead, self.total - 1):
            self._decide(self.decided, params)
        q = self.queue.popleft()
        if q["step"] != step:
            raise RuntimeError(f"feeder out of order: asked for step {step}, next decided is {q['step']}")
        p, info = q["plan"], {"phi": self.scheduler.phi, "source": q["plan"].source, "gen_s": q["gen_s"]}
        micro = q["rows"]
        if p.generate:
            pending = [m for m in micro if isinstance(m, Pending)]
            for m in pending:
                m.ready()
            if p.store:
                for m in micro:
                    self.buffer.add(_rows(m))
            micro = [m if isinstance(m, Pending) and m.sampled.batch is not None else _rows(m) for m in micro]
            info["gen_s"] += sum(m.wait_seconds for m in pending)
            # the sampler's own time; in overlap mode most of it ran while earlier steps trained
            info["gen_total_s"] = max(info["gen_s"], sum(m.ready_seconds for m in pending))
            info["sgo_len"] = [_mean_length(m) for m in micro]
        if p.source == "replay":
            micro = [self.buffer.draw(len(m), self.seed, step, k) for k, m in enumerate(micro)]
        info["buffer"] = len(self.buffer)
        return micro, info

    def state(self) -> dict:
        """Everything a resumed run needs: φ, the buffer, and the steps decided but not trained yet
        (their SGOs waited for). Rows are keyed by data shard, so the states of all hosts merge into one
        (``merge_states``) that any number of processes can load."""

        def by_shard(rows: list) -> dict:
            return {str(s): part for s, part in self.buffer.slices(rows).items()}

        queue = [
            {
                "step": q["step"],
                "plan": list(dataclasses.astuple(q["plan"])),
                "rows": [by_shard(_rows(m)) for m in q["rows"]],
                "gen_s": q["gen_s"],
            }
            for q in self.queue
        ]
        return {
            "scheduler": self.scheduler.state(),
            "buffer": self.buffer.state(),
            "queue": queue,
            "decided": self.decided,
        }

    def load(self, state: dict) -> None:
        """Take this host's shards of a (merged) state."""
        mine = [str(s) for s in self.buffer.shards]
        missing = [s for q in state["queue"] for m in q["rows"] for s in mine if s not in m]
        if missing or any(s not in state["buffer"] for s in mine):
            raise ValueError(
                "the checkpoint's SGO state was written for other data shards (data x fsdp of the mesh "
                "must stay the same to resume an SGO run)"
            )
        self.scheduler.load(state["scheduler"])
        self.buffer.load(state["buffer"])
        self.queue = collections.deque(
            {
                **q,
                "plan": Decision(*q["plan"]),  # "plan": the key checkpoints have always used
                "rows": [[(p, r) for s in mine for p, r in m[s]] for m in q["rows"]],
            }
            for q in state["queue"]
        )
        self.decided = state["decided"]


def _rows(m: list[Row] | Pending) -> list[Row]:
    return m.rows() if isinstance(m, Pending) else m


def _mean_length(m: list[Row] | Pending):
    """A micro-batch's mean response length: a device scalar while its batch is on the devices."""
    if isinstance(m, Pending):
        return m.sampled.stats["sgo_len"]
    return float(np.mean([len(r) for _, r in m]))


def merge_states(states: Sequence[dict]) -> dict:
    """One feeder state from every host's (``Feeder.state``), their shards side by side."""
    first = states[0]
    buffer = {k: v for st in states for k, v in st["buffer"].items()}
    queue = [
        {
            **q,
            "rows": [
                {k: v for st in states for k, v in st["queue"][i]["rows"][j].items()}
                for j in range(len(q["rows"]))
            ],
        }
        for i, q in enumerate(first["queue"])
    ]
    return {**first, "buffer": buffer, "queue": queue}
