"""Several processes, one program (docs/architecture.md §7): start-up of JAX's multi-controller runtime and
the few host-side operations that must see every process.

A pod slice or a multi-node GPU job runs the same command on every host. Each process owns the devices
of its host and a share of every global batch; the jitted steps and the sampler are SPMD over the global
mesh. What crosses hosts outside those programs is here: the rows of a global array that this process
fed (``local_rows``), a whole array on every host (``gather``), and small host values collected from every
process (``gather_objects``).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from ml_collections import ConfigDict


def initialize(config: ConfigDict) -> None:
    """Join the run's processes before any device is touched: from ``distributed.coordinator``,
    ``num_processes``, ``process_id`` when given (local simulation, custom clusters); by JAX's cluster
    detection (TPU pod slices, SLURM, ...) with ``distributed.auto`` (the launch scripts set it) or
    under a SLURM job with several tasks; otherwise one process, nothing to do."""
    d = config.distributed
    timeouts = {"heartbeat_timeout_seconds": d.heartbeat_timeout, "initialization_timeout": d.init_timeout}
    if d.coordinator:
        jax.distributed.initialize(d.coordinator, d.num_processes, d.process_id, **timeouts)
    elif d.auto or (int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ):
        jax.distributed.initialize(**timeouts)


def local_rows(x: jax.Array) -> np.ndarray:
    """The rows (first axis) of a batch-sharded global array that live on this process's devices, in
    order: exactly what this process passed to ``make_array_from_process_local_data``. Replicated
    copies (over the tensor axis) are taken once; a fully replicated array is returned whole."""
    if jax.process_count() == 1 or x.is_fully_replicated:
        return np.asarray(x)
    pieces: dict[int, np.ndarray] = {}
    for shard in x.addressable_shards:
        start = shard.index[0].start or 0
        if start not in pieces:
            pieces[start] = np.asarray(shard.data)
    return np.concatenate([pieces[k] for k in sorted(pieces)])


def gather(x: jax.Array) -> np.ndarray:
    """The whole of a global array on every process (a collective: every process must call it)."""
    if jax.process_count() == 1 or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def gather_objects(value) -> list:
    """``value`` (anything JSON can hold) of every process, in process order, on every process (a
    collective). Used for the per-host parts of a checkpoint's host state (replay buffers)."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([data.size], np.int64))
    # padded to a power of two: each distinct length compiles its own all-gather, so a value whose size
    # changes at every log interval must not bring a compile every time
    padded = np.zeros(1 << max(int(np.max(sizes)) - 1, 255).bit_length(), np.uint8)
    padded[: data.size] = data
    everyone = multihost_utils.process_allgather(padded)
    return [
        json.loads(bytes(row[: int(n)]).decode()) for row, n in zip(everyone, np.ravel(sizes), strict=True)
    ]
