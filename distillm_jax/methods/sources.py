"""Where a training step's micro-batches come from (a method's ``source``), and the pieces every
source is made of:

- ``Ordered``: rows a micro-batch at a time in a seeded, resumable order, each host its shards' rows;
- ``Feed``: ground truth or a cache (a model's responses to the training prompts, ``cached_responses``),
  each step through an ``offpolicy.Feeder`` — which, for the SGO methods, also picks fresh student
  samples or a replayed sample;
- ``LMText``: the plain text of the LM loss, beside any source.

A source gives the loop device batches and checkpoints what a resumed run needs (``state``/``load``, into
``RunState.source``, every host's shards merged by ``merge``). MiniLLM's rollout rounds are a source of
its own (``methods/minillm.py``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
from flax import nnx

from distillm_jax import distributed, storage
from distillm_jax.data import batching
from distillm_jax.generate import Sampling
from distillm_jax.methods import offpolicy
from distillm_jax.run.state import RunState

if TYPE_CHECKING:
    from distillm_jax.run.build import Run


def cached_responses(run: Run, model: nnx.Module, name: str, sampling: Sampling) -> list:
    """``model``'s responses to the training prompts as (prompt, response) rows, sampled with
    ``sampling`` (the model's own samples: no n-gram ban, which belongs to the evaluation protocol
    only), generated once and cached in the run folder as ``name``."""
    s = run.settings
    path = s.run_dir.cache(name)
    if storage.exists(path):
        return [tuple(json.loads(line)) for line in storage.read_text(path).splitlines() if line.strip()]
    outs = run.sampler.responses(
        model,
        run.train_rows,
        sampling,
        batch_size=s.eval.batch_size,
        new=s.new_tokens(s.eval),
        seed=s.seed,
    )
    eos = run.tokenizer.eos_token_id
    rows = [(p, [int(t) for t in o] or [eos]) for (p, _), o in zip(run.train_rows, outs, strict=True)]
    if jax.process_index() == 0:
        storage.write(path, "".join(json.dumps([[int(t) for t in p], r]) + "\n" for p, r in rows))
    return rows


class Ordered:
    """Rows taken a micro-batch at a time in a seeded, resumable order (``order.position`` is what a
    checkpoint keeps): each host reads only its data shards' rows."""

    def __init__(self, run: Run, rows, seed: int):
        b = run.batches
        self.run, self.rows = run, rows
        self.order = batching.BatchOrder(
            len(rows), run.settings.optim.micro, seed, shards=b.shards, num_shards=b.num_shards
        )
        self._indices = iter(self.order)  # reads order.position at the first call: set it before

    def next_rows(self) -> list:
        return [self.rows[i] for i in next(self._indices)]


class Source(Ordered):
    """A method's batches: ``for_step(index, params)`` gives step ``index``'s micro-batches on the
    devices; ``state()`` / ``load(state)`` are what a checkpoint keeps of it (one host's), and ``merge``
    turns every host's states into one that any number of processes can load."""

    def for_step(self, index: int, params) -> tuple[list[tuple[dict, object]], dict]:
        raise NotImplementedError

    def state(self) -> dict:
        raise NotImplementedError

    def load(self, state: dict) -> None:
        raise NotImplementedError

    @staticmethod
    def merge(states: list[dict]) -> dict:
        raise NotImplementedError

    def save(self, state: RunState) -> None:
        state.source = self.merge(distributed.gather_objects(self.state()))

    def restore(self, state: RunState) -> None:
        if state.source is not None:
            self.load(state.source)

    def close(self) -> None:
        """Stop the source's threads, if any."""


def placed(run: Run, b: dict) -> tuple[dict, int]:
    """A host batch on the devices, and its real tokens."""
    tokens = sum(int(b[k].sum()) for k in ("attention_mask", "decoder_attention_mask") if k in b)
    return run.batches.to_devices(b), tokens


class Feed(Source):
    """Ground truth, a cache, or (SGO methods: a ``strategy``) the student's samples: an
    ``offpolicy.Feeder`` over the rows' order, its fresh SGOs sampled by a ``GenerationWorker`` and kept on
    the devices. ``to_batch(rows)`` makes a host batch of the method's rows (default: (prompt, response)
    pairs); ``scheduler``: the adaptive scheduler of DistiLLM's φ."""

    merge = staticmethod(offpolicy.merge_states)

    def __init__(
        self,
        run: Run,
        rows: list,
        model_of: Callable,
        total: int,
        strategy: offpolicy.Strategy | None = None,
        *,
        scheduler: offpolicy.AdaptiveScheduler | None = None,
        to_batch: Callable[[list], dict] | None = None,
    ):
        super().__init__(run, rows, run.settings.seed)
        s = run.settings
        o, worker = s.sgo, None
        if strategy is not None:
            new = s.new_tokens(o)
            worker = offpolicy.GenerationWorker(
                lambda params, prompts, key: run.sampler.sgo(model_of(params), prompts, new, o.sampling, key),
                threaded=o.overlap,
            )
        self.to_batch = to_batch or run.batches.host
        self.feeder = offpolicy.Feeder(
            strategy or offpolicy.ground_truth,
            scheduler or offpolicy.AdaptiveScheduler(),
            offpolicy.ReplayBuffer(max(o.capacity // run.batches.num_shards, 1), run.batches.shards),
            worker,
            self.next_rows,
            seed=s.seed,
            total=total,
            micro_batches=s.optim.grad_accum,
            lookahead=o.max_staleness if o.overlap else 0,
        )

    def for_step(self, index: int, params) -> tuple[list[tuple[dict, object]], dict]:
        """Step ``index``'s micro-batches on the devices, each with its real tokens (an int, or a device
        scalar for fresh SGOs), and the step's info (``offpolicy.Feeder.rows_for``)."""
        micro, info = self.feeder.rows_for(index, params)
        out = []
        for m in micro:
            if isinstance(m, offpolicy.Pending):
                out.append((m.sampled.batch, m.sampled.stats["tokens"]))
            else:
                out.append(placed(self.run, self.to_batch(m)))
        return out, info

    def state(self) -> dict:
        return self.feeder.state()

    def load(self, state: dict) -> None:
        self.feeder.load(state)

    def close(self) -> None:
        if self.feeder.worker is not None:
            self.feeder.worker.close()


class LMText(Ordered):
    """The LM loss's plain text (``data.lm_source``): a micro-batch of it beside every training one,
    in its own seeded order."""

    def __init__(self, run: Run):
        super().__init__(run, run.lm_rows, run.settings.seed + 1)

    def next(self) -> dict:
        length = self.run.settings.data.lengths.max_length
        return self.run.batches.to_devices(
            batching.text_batch(self.next_rows(), length, self.run.batches.pad)
        )
