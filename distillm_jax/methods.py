"""Every training method as one entry: what scores its batches, where its rows come from, which models
sample while it trains, what it needs. Config checks, the planner, the trainer and the step ask this
registry, never a method's name, so a method is added here (plus its loss), not in four files.
The method and its baselines: docs/method.md."""

from __future__ import annotations

import dataclasses

from distillm_jax import offpolicy


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    summary: str
    # What scores a training batch (a loss of step.LOSSES): distill | minillm | distillm2.
    objective: str = "distill"
    teacher: bool = True  # its loss runs the teacher (SFT's does not: CE only)
    # Its rows: "data" (ground truth, or SGOs by ``strategy``), "seqkd" (the teacher's responses, sampled
    # once and cached), "distillm2" (both models' responses, cached), "rollouts" (MiniLLM's rounds).
    rows: str = "data"
    strategy: offpolicy.Strategy | None = None  # SGO methods: each step's source (offpolicy.Feeder)
    adaptive: bool = False  # φ follows the validation CE (DistiLLM's scheduler)
    chunked: bool = True  # its loss has the chunked large-vocabulary form
    # The samplers it runs while it trains or prepares, each a tuple of the models one loop holds KV
    # caches for (the memory planner counts the largest).
    samplers: tuple[tuple[str, ...], ...] = ()
    # The student's dropout is on in its train steps (the authors train in model.train()); MiniLLM's
    # policy trains in eval mode ("no dropout for RL", microsoft/LMOps), so its steps drop nothing.
    dropout: bool = True

    @property
    def sgo(self) -> bool:
        """Trains on student-generated outputs through the feeder (fresh and / or replayed)."""
        return self.strategy is not None


REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        Method("sft", "CE on ground truth", teacher=False),
        Method("kd", "the divergence on ground truth"),
        Method("seqkd", "the divergence on the teacher's responses", rows="seqkd", samplers=(("teacher",),)),
        Method(
            "distillm",
            "adaptive off-policy SGOs (φ from the validation CE, replay buffer)",
            strategy=offpolicy.adaptive,
            adaptive=True,
            samplers=(("student",),),
        ),
        Method(
            "imitkd",
            "fresh SGOs into the buffer every step, trained on a buffer sample",
            strategy=offpolicy.replay_every_step,
            samplers=(("student",),),
        ),
        Method(
            "gkd",
            "with probability λ fresh SGOs into the buffer and a step on a buffer sample, else ground truth",
            strategy=offpolicy.replay_with_lambda,
            samplers=(("student",),),
        ),
        Method(
            "gkd_onpolicy",
            "GKD as its paper and TRL run it: a step on fresh SGOs with probability λ, else ground truth",
            strategy=offpolicy.fresh_with_lambda,
            samplers=(("student",),),
        ),
        Method(
            "onpolicy", "fresh SGOs every step", strategy=offpolicy.fresh_every_step, samplers=(("student",),)
        ),
        Method(
            "minillm",
            "policy gradient of the reverse KL on teacher-mixed rollouts",
            objective="minillm",
            rows="rollouts",
            chunked=False,
            samplers=(("student", "teacher"),),
            dropout=False,
        ),
        Method(
            "distillm2",
            "contrastive SKL / SRKL on the teacher's and the student's cached responses",
            objective="distillm2",
            rows="distillm2",
            chunked=False,
            samplers=(("teacher",), ("student",)),
        ),
    )
}


def get(name: str) -> Method:
    """The registry entry of ``name`` (``KeyError`` for an unknown one: ``config.check`` refuses it first)."""
    return REGISTRY[name]
