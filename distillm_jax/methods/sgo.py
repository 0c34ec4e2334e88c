"""The methods that train on student-generated outputs (SGOs), each a data strategy over the same
pieces (``offpolicy.py``: the feeder, the replay buffer, the sampler's worker) with the step's CE +
divergence loss:

- ``distillm``: ground truth until the validation CE stops improving, then SGOs with a probability φ
  that rises at each evaluation whose CE got worse (``offpolicy.AdaptiveScheduler``), fresh or replayed;
- ``imitkd``: fresh SGOs into the buffer every step, trained on a buffer sample;
- ``gkd``: with probability λ ImitKD's step, else ground truth (as the DistiLLM authors run GKD);
- ``gkd_onpolicy``: with probability λ a step on the fresh SGOs themselves (GKD's paper, TRL);
- ``onpolicy``: fresh SGOs every step.

The SGO sampling settings (``offpolicy.temperature``, ``capacity``, ``overlap``, ...) are shared and
checked with the config; each method here owns only its own keys.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ml_collections import ConfigDict

from distillm_jax.errors import ConfigError
from distillm_jax.methods import base, offpolicy, register, sources

if TYPE_CHECKING:
    from distillm_jax.run.build import Run
    from distillm_jax.run.state import RunState


class SGOMethod(base.Method):
    sgo = True
    samplers = (("student",),)
    decide: offpolicy.Strategy = staticmethod(offpolicy.ground_truth)

    def strategy(self, own) -> offpolicy.Strategy:
        return self.decide

    def summary(self, run: Run, source: sources.Feed, state: RunState) -> dict:
        """φ and its path, the replay buffer's fill (rows over all hosts, capacity) and the sampler's
        seconds (in overlap mode mostly hidden behind training)."""
        b = run.batches
        return {
            "phi": source.feeder.scheduler.phi,
            "phi_path": state.phi_path,
            "buffer": [len(source.feeder.buffer) * b.num_shards // len(b.shards), run.settings.sgo.capacity],
            "gen_total_seconds": state.gen_total_seconds,
        }

    def report(self, s: dict) -> str:
        """One line that says whether student-generated outputs were used, and how: φ's path, steps per
        batch source, the replay buffer's fill, and the generation time hidden behind training."""
        src = s["sources"]
        hidden = s["gen_total_seconds"] - s["gen_seconds"]
        phi = ""
        if self.adaptive:  # the adaptive scheduler's path
            path = " → ".join(["0"] + [f"{phi:g} at step {at}" for at, phi in s["phi_path"]])
            phi = f"φ {path} (final {s['phi']:g}); "
        return (
            f"{s['method']} SGOs: {phi}steps on data {src['data']}, fresh SGOs "
            f"{src['sgo']}, replayed {src['replay']}; buffer {s['buffer'][0]} of {s['buffer'][1]} rows; "
            f"generation {s['gen_total_seconds']:.1f} s, "
            f"{max(hidden, 0.0):.1f} s of it hidden behind training"
        )


@dataclasses.dataclass(frozen=True)
class Adaptive:
    """DistiLLM's scheduler (``offpolicy.*``): φ at the start, the CE rise that raises it, and how its
    SGO steps divide between fresh and replayed samples over the run."""

    init_phi: float
    loss_eps: float
    replay_ratio: str


class DistiLLM(SGOMethod):
    name, about = "distillm", "adaptive off-policy SGOs (φ from the validation CE, replay buffer)"
    adaptive = True
    decide = staticmethod(offpolicy.adaptive)

    def defaults(self) -> dict[str, ConfigDict]:
        return {
            "offpolicy": ConfigDict(
                {
                    "init_phi": 0.0,  # φ at the start (the official code's --init-threshold)
                    "loss_eps": 0.1,  # φ += 0.1 when the validation CE rises this much over prev_loss
                    "replay_ratio": "decreasing",  # fresh vs replayed share: decreasing|constant|increasing
                }
            )
        }

    def check(self, c: ConfigDict) -> None:
        o = c.offpolicy
        if o.replay_ratio not in offpolicy.REPLAY_RATIOS:
            ratios = ", ".join(offpolicy.REPLAY_RATIOS)
            raise ConfigError(f"offpolicy.replay_ratio must be one of {ratios}, got {o.replay_ratio!r}")
        if o.loss_eps < 0:
            raise ConfigError(f"offpolicy.loss_eps must be >= 0, got {o.loss_eps}")
        if not 0.0 <= o.init_phi <= 1.0:
            raise ConfigError(f"offpolicy.init_phi must be in [0, 1], got {o.init_phi}")

    def settings(self, c: ConfigDict) -> Adaptive:
        o = c.offpolicy
        return Adaptive(float(o.init_phi), float(o.loss_eps), str(o.replay_ratio))

    def source(self, run: Run, rows: list, total: int, model_of, teacher_state) -> sources.Feed:
        a = run.settings.own
        scheduler = offpolicy.AdaptiveScheduler(a.loss_eps, a.replay_ratio, phi=a.init_phi)
        return sources.Feed(run, rows, model_of, total, self.decide, scheduler=scheduler)

    def after_eval(self, source: sources.Feed, metrics: dict, state: RunState, done: int) -> dict:
        """φ follows the validation CE; a change is kept in ``state.phi_path``."""
        scheduler = source.feeder.scheduler
        before = scheduler.phi
        scheduler.update(metrics["val_ce"])
        if scheduler.phi != before:
            state.phi_path = [*state.phi_path, [done, scheduler.phi]]
        return {"phi": scheduler.phi}


class ImitKD(SGOMethod):
    name, about = "imitkd", "fresh SGOs into the buffer every step, trained on a buffer sample"
    decide = staticmethod(offpolicy.replay_every_step)


class OnPolicy(SGOMethod):
    name, about = "onpolicy", "fresh SGOs every step"
    decide = staticmethod(offpolicy.fresh_every_step)


@dataclasses.dataclass(frozen=True)
class Lambda:
    gkd_lambda: float  # the probability of a step on SGOs


class GKD(SGOMethod):
    """GKD's two readings: ``fresh`` trains on the fresh SGOs (its paper, TRL); else ImitKD's step."""

    def __init__(self, name: str, about: str, *, fresh: bool):
        self.name, self.about, self.fresh = name, about, fresh

    def defaults(self) -> dict[str, ConfigDict]:
        return {"offpolicy": ConfigDict({"gkd_lambda": 0.5})}  # the probability of a step on SGOs

    def check(self, c: ConfigDict) -> None:
        lam = c.offpolicy.gkd_lambda
        if not 0.0 <= lam <= 1.0:
            raise ConfigError(f"offpolicy.gkd_lambda must be in [0, 1], got {lam}")

    def settings(self, c: ConfigDict) -> Lambda:
        return Lambda(float(c.offpolicy.gkd_lambda))

    def strategy(self, own: Lambda) -> offpolicy.Strategy:
        return (offpolicy.fresh_with if self.fresh else offpolicy.replay_with)(own.gkd_lambda)


for _method in (
    DistiLLM(),
    ImitKD(),
    GKD(
        "gkd",
        "with probability λ fresh SGOs into the buffer and a step on a buffer sample, else ground truth",
        fresh=False,
    ),
    GKD(
        "gkd_onpolicy",
        "GKD as its paper and TRL run it: a step on fresh SGOs with probability λ, else ground truth",
        fresh=True,
    ),
    OnPolicy(),
):
    register(_method)
