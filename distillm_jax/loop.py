"""The training loop's pieces, so that ``trainer.train`` reads as feed → step → log | evaluate | save:
when each is due (``Schedule``), a stop asked for by a signal on any host (``StopRequest``), and what a
log row sums up (``Interval``)."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Callable

import jax
import numpy as np

from distillm_jax import distributed


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss); the message names the step and the last checkpoint."""


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Optimizer updates in all, and the intervals of evaluation, checkpoints and log rows."""

    total: int
    eval_every: int
    save_every: int
    log_every: int

    def due(self, done: int, every: int) -> bool:
        """Whether ``done`` updates end an interval of ``every``; the last step ends every interval."""
        return done % every == 0 or done == self.total


class StopRequest:
    """SIGTERM (a preemption notice) or Ctrl-C on this host, caught while the loop runs: the loop saves
    at the end of the step and stops, every host together. A second Ctrl-C stops at once."""

    def __init__(self, say):
        self.signal: int | None = None
        self.say = say  # how to tell the user (the progress bar's write)
        self._previous: dict = {}

    def __enter__(self) -> StopRequest:
        self._previous = {s: signal.signal(s, self._catch) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _catch(self, sig, frame) -> None:
        if self.signal is not None and sig == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = sig
        if sig == signal.SIGINT:
            self.say("Ctrl-C: saving at the end of this step, then stopping (again: stop at once)")

    def why(self) -> str:
        return signal.Signals(self.signal).name if self.signal else "another process"


def inject_fault(done: int, before_kill) -> None:
    """``DISTILLM_KILL_AT_STEP`` (and, with several processes, ``DISTILLM_KILL_PROCESS``): the tests'
    way to signal a run after a step — ``DISTILLM_KILL_SIGNAL`` KILL (the default: a preemption without
    notice; ``before_kill()`` first lets pending checkpoint writes finish), TERM (a notice) or INT."""
    if os.environ.get("DISTILLM_KILL_AT_STEP") != str(done):
        return
    only = os.environ.get("DISTILLM_KILL_PROCESS")
    if only is not None and only != str(jax.process_index()):
        return
    sig = signal.Signals["SIG" + os.environ.get("DISTILLM_KILL_SIGNAL", "KILL")]
    if sig == signal.SIGKILL:
        before_kill()
    os.kill(os.getpid(), sig)


class Interval:
    """What the loop gathers between two log rows: each micro-batch's metrics (device arrays, read only
    when the row is written), real tokens, and each step's batch-source info."""

    def __init__(self, accum: int, *, sgo: bool = False, adaptive: bool = False, hosts_share: float = 1.0):
        """``accum``: micro-batches per step; ``sgo``: add the batch sources' metrics (``adaptive``: φ
        too); ``hosts_share``: all data shards over this host's (a buffer's rows → all hosts')."""
        self.accum, self.sgo, self.adaptive, self.hosts_share = accum, sgo, adaptive, hosts_share
        self._reset()

    def _reset(self) -> None:
        self.metrics: list[dict] = []
        self.tokens: list = []
        self.infos: list[dict] = []
        self.start = time.time()

    def step(self, info: dict) -> None:
        self.infos.append(info)

    def micro(self, metrics: dict, tokens) -> None:
        self.metrics.append(metrics)
        self.tokens.append(tokens)

    def row(self, done: int, asked_stop: bool, where_saved: Callable[[], str]) -> tuple[dict, bool]:
        """(the log row, whether any host asked to stop). Every host's news is gathered (each knows its
        own signals, tokens and SGO lengths); a non-finite metric is a ``TrainingError`` naming the step
        and ``where_saved()``, the last good checkpoint."""
        local = jax.device_get((self.metrics, self.tokens))
        lengths = [float(x) for i in self.infos for x in jax.device_get(i.get("sgo_len", []))]
        news = {"stop": asked_stop, "tokens": float(sum(local[1])), "sgo_len": lengths}
        every_host = distributed.gather_objects(news)
        rows = local[0]
        bad = next((i for i, r in enumerate(rows) if not all(np.isfinite(v) for v in r.values())), None)
        if bad is not None:
            bad_step = done - len(rows) // self.accum + bad // self.accum + 1
            values = ", ".join(f"{k} {float(v)}" for k, v in rows[bad].items() if not np.isfinite(v))
            raise TrainingError(
                f"non-finite training metrics at step {bad_step} ({values}): lower optim.lr or check the "
                f"data; last good checkpoint: {where_saved()}"
            )
        seconds = max(time.time() - self.start, 1e-9)
        mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        mean["tokens_per_s"] = sum(h["tokens"] for h in every_host) / seconds
        if self.sgo:
            mean.update(self._sources(seconds, [x for h in every_host for x in h["sgo_len"]]))
        self._reset()
        return mean, any(h["stop"] for h in every_host)

    def _sources(self, seconds: float, sgo_lengths: list) -> dict:
        """The SGO metrics: φ (``adaptive``: DistiLLM's scheduler; the others have none), the share of
        each batch source, the buffer size, the mean SGO length, and the seconds the loop was blocked on
        generation (paper mode: all of it; overlap mode: what training did not hide) out of the
        interval's wall-clock."""
        infos = self.infos
        out = {
            "buffer": infos[-1]["buffer"]
            * self.hosts_share,  # rows in all hosts' buffers (each holds as many)
            "gen_s": sum(i["gen_s"] for i in infos),
            "interval_s": seconds,
        }
        if self.adaptive:
            out["phi"] = infos[-1]["phi"]
        for source in ("data", "sgo", "replay"):
            out[f"src_{source}"] = float(np.mean([i["source"] == source for i in infos]))
        if sgo_lengths:
            out["sgo_len"] = float(np.mean(sgo_lengths))
        return out
