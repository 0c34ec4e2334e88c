"""What a training method is to the rest of the package: one object of this protocol, registered by
name (``methods.register``). The trainer, the settings, the config checks and the memory planner call
only these attributes and hooks; no code outside ``methods/`` compares a method's name.

A method says
- what it needs: a teacher in its loss, a chunked loss form, dropout in its steps, the samplers it runs;
- its own config keys (``defaults``: a group of its own, or keys it adds to a shared group such as
  ``offpolicy``), their checks (``check``, every run: the keys exist in every config; ``check_run``, when
  it trains) and its typed settings (``settings``), built once;
- its loss (``loss``, traced inside the jitted train step), its rows (``training_rows``) and its batch
  source (``source``: each step's micro-batches; the source's ``state`` is what it checkpoints);
- what it does after an evaluation (``after_eval``: DistiLLM's φ) and what its summary adds.

The defaults are a method that trains on ground truth with the step's CE + divergence loss: ``kd``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ml_collections import ConfigDict

from distillm_jax import step
from distillm_jax.methods import sources

if TYPE_CHECKING:
    from distillm_jax.run.build import Run
    from distillm_jax.run.state import RunState


class Method:
    name: str = ""
    about: str = ""  # one line on what it does
    teacher: bool = True  # its loss runs the teacher (SFT's does not: CE only)
    chunked: bool = True  # its loss has the chunked large-vocabulary form
    # The student's dropout is on in its train steps (the authors train in model.train()).
    dropout: bool = True
    # The samplers it runs while it trains or prepares, each a tuple of the models one loop holds KV
    # caches for (the memory planner counts the largest).
    samplers: tuple[tuple[str, ...], ...] = ()
    sgo: bool = False  # trains on student-generated outputs: the feeder's metrics and summary line
    adaptive: bool = False  # has DistiLLM's φ (logged, in the summary, on the tables)
    group: str | None = None  # the config group it owns, if any (its ``defaults`` define it)

    # --- config ------------------------------------------------------------------------------------
    def defaults(self) -> dict[str, ConfigDict]:
        """Its config keys by group: a group of its own (``{"minillm": ConfigDict(...)}``) or keys it
        adds to a shared group (``{"offpolicy": ConfigDict({"gkd_lambda": 0.5})}``)."""
        return {}

    def check(self, c: ConfigDict) -> None:
        """Raise ``errors.ConfigError`` for a bad value of its own keys (every run checks every method's:
        a typo is caught whichever method runs)."""

    def check_run(self, c: ConfigDict) -> None:
        """Raise ``errors.ConfigError`` when its keys do not fit the rest of a config it trains with."""

    def settings(self, c: ConfigDict) -> Any:
        """Its typed settings (a frozen dataclass, or None), built once from a checked config; the loss
        sees them as ``LossConfig.own``."""
        return None

    # --- training ----------------------------------------------------------------------------------
    def loss(
        self, student, teacher, batch: dict, cfg: step.LossConfig
    ) -> tuple[Any, dict]:  # traced in the step
        """The train step's loss on a batch and its metrics: CE and the divergence (``step``)."""
        return step.ce_and_divergence(student, teacher, batch, cfg)

    def batch_like(self, batch: dict) -> dict:
        """The batch its loss reads, shaped from a ground-truth host batch of the same rows (what
        ``config/compiled.py`` compiles the train step for)."""
        return batch

    def training_rows(self, run: Run) -> list:
        """The rows its epochs go over: ground truth (a cache of a model's responses for some)."""
        return run.train_rows

    def updates_per_epoch(self, batches: int, own: Any) -> int:
        """Optimizer updates per epoch of ``batches`` global batches of its rows."""
        return batches

    def strategy(self, own: Any) -> Callable | None:
        """Each step's source among ground truth / fresh SGOs / a replayed sample (``offpolicy``); None:
        ground truth every step."""
        return None

    def source(self, run: Run, rows: list, total: int, model_of: Callable, teacher_state) -> sources.Source:
        """Its batches over ``rows`` for ``total`` updates; ``model_of(params)`` is the student."""
        return sources.Feed(run, rows, model_of, total, self.strategy(run.settings.own))

    def after_eval(self, source: sources.Source, metrics: dict, state: RunState, done: int) -> dict:
        """React to an evaluation at update ``done``; returns fields for its log row."""
        return {}

    def summary(self, run: Run, source: sources.Source, state: RunState) -> dict:
        """Fields it adds to the run's summary."""
        return {}

    def report(self, summary: dict) -> str | None:
        """A line printed under the summary table, or None."""
        return None
