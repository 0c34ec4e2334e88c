"""DistiLLM-2 (Ko et al., 2025): a contrastive loss, ``(2 − β)·SKL`` on the teacher's responses plus
``β·SRKL`` on the initial student's, both sampled once for the training prompts with its own settings
(``distillm2.temperature`` / ``top_p``: its official generation's 0.8 / 0.95, no n-gram ban) and cached
in the run folder. Where we differ from its code: docs/method.md."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
from ml_collections import ConfigDict

from distillm_jax import losses, step
from distillm_jax.errors import ConfigError
from distillm_jax.generate import Sampling
from distillm_jax.methods import base, register, sources
from distillm_jax.methods.plain import check_sampling

if TYPE_CHECKING:
    from distillm_jax.run.build import Run


@dataclasses.dataclass(frozen=True)
class Contrastive:
    beta: float  # (2 − β)·SKL + β·SRKL
    sampling: Sampling  # of both models' responses


class DistiLLM2(base.Method):
    name = "distillm2"
    about = "contrastive SKL / SRKL on the teacher's and the student's cached responses"
    chunked = False
    samplers = (("teacher",), ("student",))
    group = "distillm2"

    def defaults(self) -> dict[str, ConfigDict]:
        # The responses of the teacher and the initial student to the training prompts, sampled once
        # and cached; their sampling as DistiLLM-2's official generation (no n-gram ban).
        return {"distillm2": ConfigDict({"beta": 1.0, "temperature": 0.8, "top_p": 0.95})}

    def check(self, c: ConfigDict) -> None:
        if not 0.0 <= c.distillm2.beta <= 2.0:
            raise ConfigError(f"distillm2.beta must be in [0, 2], got {c.distillm2.beta}")
        check_sampling(c, "distillm2")

    def settings(self, c: ConfigDict) -> Contrastive:
        return Contrastive(float(c.distillm2.beta), Sampling.of(c.distillm2))

    def loss(self, student, teacher, batch: dict, cfg: step.LossConfig) -> tuple[jax.Array, dict]:
        """``batch``: the teacher's responses; ``batch["sgo"]``: the student's, to the same prompts."""
        s_tgo, t_tgo = step.both_logits(student, teacher, batch)
        s_sgo, t_sgo = step.both_logits(student, teacher, batch["sgo"])
        loss, parts = losses.distillm2(
            s_tgo,
            t_tgo,
            batch["loss_mask"],
            s_sgo,
            t_sgo,
            batch["sgo"]["loss_mask"],
            alpha=dict(cfg.params).get("alpha", 0.1),
            beta=cfg.own.beta,
        )
        ce = losses.cross_entropy(jax.lax.stop_gradient(s_tgo), batch["labels"], batch["loss_mask"])
        return loss, {"ce": ce, **parts}

    def batch_like(self, batch: dict) -> dict:
        return {**batch, "sgo": dict(batch)}

    def training_rows(self, run: Run) -> list:
        """(prompt, teacher's response, initial student's response) for every training prompt."""
        sampling = run.settings.own.sampling
        teacher = sources.cached_responses(run, run.teacher, "distillm2_teacher", sampling)
        student = sources.cached_responses(run, run.student, "distillm2_student", sampling)
        return [(p, t, s) for (p, t), (_, s) in zip(teacher, student, strict=True)]

    def source(self, run: Run, rows: list, total: int, model_of, teacher_state) -> sources.Feed:
        def to_batch(rows: list) -> dict:  # the teacher-output batch, the student-output one under "sgo"
            host = run.batches.host
            return {**host([(p, t) for p, t, _ in rows]), "sgo": host([(p, s) for p, _, s in rows])}

        return sources.Feed(run, rows, model_of, total, to_batch=to_batch)


register(DistiLLM2())
