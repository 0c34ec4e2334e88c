"""A run's rows: read from their source (columns checked before any model loads), tokenized once
(each host a share), and turned into fixed-shape batches on the mesh (``Batches``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from distillm_jax import distributed, sharding
from distillm_jax.data import batching, tasks
from distillm_jax.data.batching import Row
from distillm_jax.errors import ConfigError


def read(task: tasks.Task, source: str, split: str, *, max_rows: int, demo_rows: int) -> list[dict]:
    """A split's rows as read (the task's columns checked), at most ``max_rows`` (0: all); a missing
    file or column is a ``ConfigError`` (one line for the user)."""
    try:
        return tasks.load_rows(task, source, split, demo_rows=demo_rows, max_rows=max_rows)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None


def tokenize(
    task: tasks.Task,
    split: str,
    rows: list[dict],
    tokenizer,
    lengths: batching.Lengths,
    *,
    encoder_decoder: bool,
) -> tuple[list[Row], list[str | list[str]]]:
    """(prompt, response) token ids of a split's rows, and their references (a text, or several: the
    metric takes the best). Each process tokenizes every n-th row and all of them are put back in
    order; skipped and cut rows are counted aloud."""
    pairs = tasks.to_pairs(task, rows, encoder_decoder=encoder_decoder)
    refs = [tasks.references(task, row, r) for row, (_, r) in zip(rows, pairs, strict=True) if r.strip()]
    kept = [x for x in pairs if x[1].strip()]  # an empty response is skipped (and counted)
    processes, me = jax.process_count(), jax.process_index()
    tokenized, skipped = batching.tokenize_pairs(
        kept[me::processes], tokenizer, lengths, encoder_decoder=encoder_decoder
    )
    if processes > 1:
        parts = distributed.gather_objects([tokenized, skipped["prompt_truncated"]])
        tokenized = [tuple(parts[i % processes][0][i // processes]) for i in range(len(kept))]
        skipped["prompt_truncated"] = sum(n for _, n in parts)
    skipped["empty_response"] = len(pairs) - len(kept)
    if any(skipped.values()) and me == 0:
        print(
            f"{split}: {len(tokenized)} rows; "
            f"skipped {skipped['empty_response']} with an empty or missing response; "
            f"cut {skipped['prompt_truncated']} prompts longer than {lengths.max_prompt_length} tokens"
        )
    return tokenized, refs


class Batches:
    """Rows -> fixed-shape batches (``data/batching.py``'s layouts) -> global arrays on the mesh, rows
    over the data axes. Each process builds only its data shards' part of a global batch."""

    def __init__(
        self, mesh: Mesh, lengths: batching.Lengths, pad: int, *, encoder_decoder: bool, start_id: int
    ):
        self.mesh, self.lengths, self.pad = mesh, lengths, pad
        self.encoder_decoder, self.start_id = encoder_decoder, start_id
        self.shards, self.num_shards = sharding.data_shards(mesh)

    def host(self, rows: Sequence[Row]) -> dict:
        """A numpy batch of (prompt, response) rows."""
        if self.encoder_decoder:
            return batching.encoder_decoder_batch(rows, self.lengths, self.pad, self.start_id)
        return batching.decoder_only_batch(rows, self.lengths, self.pad)

    def sharding(self, rows: int, ndim: int) -> NamedSharding:
        """Where a global batch of ``rows`` rows lives: split over the data axes, or replicated when
        it does not divide them (one process only: ``Run`` refuses it with several)."""
        if rows % self.num_shards:
            return self.replicated
        return sharding.batch_sharding(self.mesh, ndim)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def to_devices(self, batch: dict) -> dict:
        """A host batch (this process's rows) -> global arrays."""

        def put(x):
            if isinstance(x, dict):
                return {k: put(v) for k, v in x.items()}
            rows = x.shape[0] * self.num_shards // len(self.shards)  # the global batch
            return jax.make_array_from_process_local_data(
                self.sharding(rows, x.ndim), x, (rows, *x.shape[1:])
            )

        return put(batch)

    def mine(self, rows: Sequence) -> list:
        """This process's part of a global batch's rows."""
        return batching.shard_rows(rows, self.shards, self.num_shards)

    def fixed(self, rows: Sequence[Row], size: int) -> Iterator[tuple[dict, int]]:
        """``rows`` in global batches of ``size`` (this process's part of each); the last one filled
        with copies of row 0 whose loss mask is zeroed. Yields (host batch, number of real rows)."""
        for i in range(0, len(rows), size):
            chunk = rows[i : i + size]
            real = len(chunk)
            mine = self.mine([(r, True) for r in chunk] + [(rows[0], False)] * (size - real))
            b = self.host([r for r, _ in mine])
            b["loss_mask"][[j for j, (_, keep) in enumerate(mine) if not keep]] = 0
            yield b, real

    def prompts(self, prompts: Sequence[list[int]]) -> dict:
        """This process's prompts of a global batch, on the devices, in the layout the sampler reads
        (and the training batch holds): ``input_ids`` / ``attention_mask`` for an encoder,
        ``prompt_ids`` / ``prompt_mask`` (left padding) for a decoder-only model."""
        b = self.host([(p, [self.pad]) for p in prompts])
        keys = ("input_ids", "attention_mask") if self.encoder_decoder else ("prompt_ids", "prompt_mask")
        return self.to_devices({k: b[k] for k in keys})
