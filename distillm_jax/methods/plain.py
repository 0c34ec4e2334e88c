"""The methods that train on fixed rows with the step's CE + divergence loss: ``sft`` (CE only, no
teacher), ``kd`` (the divergence on ground truth) and ``seqkd`` (on the teacher's responses to the
training prompts, sampled once with ``seqkd.*`` and cached in the run folder)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ml_collections import ConfigDict

from distillm_jax.errors import ConfigError
from distillm_jax.generate import Sampling
from distillm_jax.methods import base, register, sources

if TYPE_CHECKING:
    from distillm_jax.run.build import Run


class SFT(base.Method):
    name, about = "sft", "CE on ground truth"
    teacher = False


class KD(base.Method):
    name, about = "kd", "the divergence on ground truth"


def check_sampling(c: ConfigDict, group: str) -> None:
    """A method's own sampling group (temperature, top_p, top_k)."""
    g = c[group]
    if g.temperature < 0 or not 0 < g.top_p <= 1 or g.get("top_k", 0) < 0:
        raise ConfigError(f"{group}: need temperature >= 0, top_p in (0, 1] and top_k >= 0")


class SeqKD(base.Method):
    name, about = "seqkd", "the divergence on the teacher's responses"
    samplers = (("teacher",),)
    group = "seqkd"

    def defaults(self) -> dict[str, ConfigDict]:
        return {
            "seqkd": ConfigDict(
                {
                    "temperature": 1.0,  # teacher sampling for SeqKD's responses (0 = greedy); no n-gram ban
                    "top_k": 0,
                    "top_p": 1.0,
                }
            )
        }

    def check(self, c: ConfigDict) -> None:
        check_sampling(c, "seqkd")

    def settings(self, c: ConfigDict) -> Sampling:
        return Sampling.of(c.seqkd)

    def training_rows(self, run: Run) -> list:
        """The teacher's responses to the training prompts (SeqKD's data)."""
        return sources.cached_responses(run, run.teacher, "seqkd_train", run.settings.own)


for _method in (SFT(), KD(), SeqKD()):
    register(_method)
