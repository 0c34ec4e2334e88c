"""The run's sampler: a model's responses to prompt token ids, in the run's fixed shapes.

Three uses: fresh SGOs (``sgo``: the training batch built on the devices from the prompts and the
sampled tokens, so a step on fresh SGOs never sends them through the host), responses to a whole set
of rows (``responses``: evaluation, the SeqKD / DistiLLM-2 caches), and MiniLLM's teacher-mixed
rollouts (``sample`` with ``mix``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from distillm_jax import distributed, generate
from distillm_jax.generate import Sampling
from distillm_jax.methods import offpolicy
from distillm_jax.run.data import Batches


def sgo_batch(inputs: dict, tokens, mask, *, batches: Batches) -> tuple[dict, dict]:
    """The training batch of prompts (``inputs``, ``Batches.prompts``' layout) and sampled responses
    (``generate``'s tokens and mask), as ``batching`` would build it from the same rows on the host,
    and its ``stats``: ``sgo_len`` (the mean response length) and ``tokens`` (real tokens in all).
    Traced inside a jit."""
    n = batches.lengths.max_response
    mask = mask.astype(jnp.int32)[:, :n]
    tokens = jnp.where(mask != 0, tokens[:, :n], batches.pad).astype(jnp.int32)
    room = n - tokens.shape[1]  # a sampler of fewer new tokens than the response's room
    tokens = jnp.pad(tokens, ((0, 0), (0, room)), constant_values=batches.pad)
    mask = jnp.pad(mask, ((0, 0), (0, room)))
    b = tokens.shape[0]
    column = functools.partial(jnp.full, (b, 1), dtype=jnp.int32)
    if batches.encoder_decoder:
        batch = {
            **inputs,
            "decoder_input_ids": jnp.concatenate([column(batches.start_id), tokens[:, :-1]], axis=1),
            "decoder_attention_mask": jnp.concatenate([column(1), mask[:, :-1]], axis=1),
            "labels": tokens,
            "loss_mask": mask,
        }
    else:
        ids = jnp.concatenate([inputs["prompt_ids"], tokens], axis=1)
        response = jnp.concatenate([jnp.zeros_like(inputs["prompt_mask"]), mask], axis=1)
        batch = {
            "input_ids": ids,
            "attention_mask": jnp.concatenate([inputs["prompt_mask"], mask], axis=1),
            "labels": jnp.concatenate([ids[:, 1:], column(batches.pad)], axis=1),
            "loss_mask": jnp.concatenate([response[:, 1:], column(0)], axis=1),
            **inputs,
        }
    real = sum(jnp.sum(batch[k]) for k in ("attention_mask", "decoder_attention_mask") if k in batch)
    stats = {"sgo_len": jnp.mean(jnp.sum(mask, axis=1).astype(jnp.float32)), "tokens": real}
    return batch, stats


class Sampler:
    """``generate`` on the run's mesh and batch layouts, with the tokenizer's EOS and pad ids."""

    def __init__(self, batches: Batches, eos_id: int):
        self.batches, self.eos_id = batches, eos_id
        self._assemble: dict[int, object] = {}  # one jitted sgo_batch per global batch size

    def sample(
        self,
        model: nnx.Module,
        prompts: Sequence[list[int]],
        new: int,
        sampling: Sampling,
        rng,
        ngram: int = 0,
        mix: tuple[nnx.Module, float] | None = None,
        inputs: dict | None = None,
    ):
        """Dispatch the sampler on ``prompts`` (this process's token-id lists of a global batch, or
        their device ``inputs``); returns device ``(tokens, mask)`` without waiting. ``mix``: (another
        model, its share) to sample from a mixture of the two (MiniLLM)."""
        ids, mask = (inputs or self.batches.prompts(prompts)).values()
        return generate.generate(
            model,
            ids,
            mask,
            new,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            rng=rng,
            eos_token_id=self.eos_id,
            pad_token_id=self.batches.pad,
            no_repeat_ngram_size=ngram,
            mix_model=None if mix is None else mix[0],
            mix_alpha=0.0 if mix is None else mix[1],
        )

    def sgo(self, model: nnx.Module, prompts: Sequence[list[int]], new: int, sampling: Sampling, rng):
        """Fresh SGOs for ``prompts`` with their training batch, all on the devices."""
        inputs = self.batches.prompts(prompts)
        tokens, mask = self.sample(model, prompts, new, sampling, rng, inputs=inputs)
        rows = tokens.shape[0]
        if rows not in self._assemble:
            out = (self.batches.sharding(rows, 2), self.batches.replicated)
            fn = functools.partial(sgo_batch, batches=self.batches)
            self._assemble[rows] = jax.jit(fn, out_shardings=out)
        batch, stats = self._assemble[rows](inputs, tokens, mask)
        return offpolicy.Sampled(tokens, mask, batch, stats)

    def responses(
        self,
        model: nnx.Module,
        rows: Sequence,
        sampling: Sampling,
        *,
        batch_size: int,
        new: int,
        seed: int,
        ngram: int = 0,
    ) -> list[list[int]]:
        """Token ids of ``model``'s response to every row's prompt (EOS kept when produced), sampled in
        global batches of ``batch_size`` and, when ``ngram`` > 0, with no repeated ``ngram``-gram."""
        out, key = [], jax.random.key(seed)
        for i in range(0, len(rows), batch_size):
            prompts = [p for p, _ in rows[i : i + batch_size]]
            prompts += [rows[0][0]] * (batch_size - len(prompts))  # fixed shape: one compile
            mine = self.batches.mine(list(enumerate(prompts, start=i)))
            tokens, mask = self.sample(
                model, [p for _, p in mine], new, sampling, jax.random.fold_in(key, i // batch_size), ngram
            )
            done = offpolicy.cut_at_eos(distributed.local_rows(tokens), distributed.local_rows(mask))
            out += [(j, o) for (j, _), o in zip(mine, done, strict=True) if j < len(rows)]
        if jax.process_count() > 1:  # every process gets all rows
            out = [tuple(x) for part in distributed.gather_objects(out) for x in part]
        return [o for _, o in sorted(out)]
