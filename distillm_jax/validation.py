"""A run's evaluation on its validation rows: the token-level validation losses (CE, which drives φ,
and the divergence) and the task's metric (ROUGE-L / BLEU) of sampled generations."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from distillm_jax import metrics
from distillm_jax.config.settings import Eval
from distillm_jax.run.data import Batches, Row
from distillm_jax.sampling import Sampler

DRAW_SEED_STRIDE = 1_000_003  # a prime past any step count: no two evaluations' draws share a seed


class Validator:
    def __init__(
        self,
        batches: Batches,
        sampler: Sampler,
        tokenizer,
        metric: str,
        rows: Sequence[Row],
        references: Sequence[str | Sequence[str]],
        settings: Eval,
        new_tokens: int,
    ):
        self.batches, self.sampler, self.tokenizer = batches, sampler, tokenizer
        self.metric_name, self.rows, self.references = metric, rows, references
        self.settings, self.new_tokens = settings, new_tokens

    @property
    def key_metric(self) -> str:
        """What picks ``best/``: the task's metric when evaluations generate, else the validation CE."""
        return self.metric_name if self.settings.generate else "val_ce"

    def better(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value > best if self.settings.generate else value < best

    def losses(self, eval_step: Callable, params, teacher_state) -> dict:
        """Token-level means over the validation rows: ``val_ce`` (and ``val_<divergence>``)."""
        sums: dict = {}
        for b, _ in self.batches.fixed(self.rows, self.settings.batch_size):
            out = eval_step(params, teacher_state, self.batches.to_devices(b))
            sums = {k: sums.get(k, 0.0) + v for k, v in out.items()}
        sums = jax.device_get(sums)
        tokens = max(float(sums.pop("tokens")), 1.0)
        return {"val_" + k.removesuffix("_sum"): float(v) / tokens for k, v in sums.items()}

    def metric(self, model: nnx.Module, seed: int, *, final: bool = False) -> float:
        """The task's metric of ``model``'s generations on the validation rows, sampled with ``eval.*``.
        Only a ``final`` evaluation (the test stage, ``launch/evaluate.py``) bans repeated
        ``eval.no_repeat_ngram_size``-grams: the evaluations that pick ``best/`` sample without the ban,
        as the official code does (docs/method.md)."""
        e = self.settings
        outs = self.sampler.responses(
            model,
            self.rows,
            e.sampling,
            batch_size=e.batch_size,
            new=self.new_tokens,
            seed=seed,
            ngram=e.no_repeat_ngram_size if final else 0,
        )
        preds = self.tokenizer.batch_decode(outs, skip_special_tokens=True)
        return metrics.METRICS[self.metric_name](preds, self.references)

    def evaluate(
        self, eval_step: Callable, params, teacher_state, model: nnx.Module, seed: int, at: int
    ) -> dict:
        """An evaluation during training at step ``at``: the validation losses and, when evaluations
        generate, the metric's mean over ``eval.draws`` sampled generations, each its own seed."""
        out = self.losses(eval_step, params, teacher_state)
        if self.settings.generate:
            seeds = [seed * 1000 + at + DRAW_SEED_STRIDE * k for k in range(self.settings.draws)]
            scores = [self.metric(model, s) for s in seeds]
            out[self.metric_name] = float(np.mean(scores))
            if len(scores) > 1:
                out[self.metric_name + "_std"] = float(np.std(scores))
        return out
