"""Helpers every benchmark shares: a machine note, a wall-clock timer for compiled calls, and the
compiled memory of a jitted function. Benchmarks report ratios measured side by side in one run."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def machine_note() -> str:
    """One line naming the hardware and software a result was measured on."""
    dev = jax.devices()[0]
    kind = dev.device_kind if dev.platform != "cpu" else (platform.processor() or platform.machine())
    return (
        f"{jax.device_count()}x {dev.platform}:{kind}, {os.cpu_count()} host cores, "
        f"jax {jax.__version__}, python {platform.python_version()}"
    )


def median_seconds(fn: Callable[..., Any], *args: Any, repeats: int = 3) -> float:
    """Median wall-clock seconds of ``fn(*args)`` after one warm-up call, waiting for the device."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak_flop_s(dtype: str = "float32", n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of the fastest of ``repeats`` jitted n x n matmuls in ``dtype`` (float32 at full
    precision, no TF32): the device's practical peak, measured in the run that quotes a utilisation."""
    a = jax.random.normal(jax.random.key(1), (n, n), dtype)
    b = jax.random.normal(jax.random.key(2), (n, n), dtype)
    precision = jax.lax.Precision.HIGHEST if dtype == "float32" else None
    mm = jax.jit(lambda x, y: jax.numpy.matmul(x, y, precision=precision))
    jax.block_until_ready(mm(a, b))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(mm(a, b))
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def stream_bytes_per_s(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s of the fastest of ``repeats`` jitted sums over a float32 array far larger than any cache:
    the memory bandwidth a computation that streams its operands once (a decode step) can reach."""
    x = jax.numpy.ones((megabytes * 2**20 // 4,), jax.numpy.float32)
    total = jax.jit(jax.numpy.sum)
    jax.block_until_ready(total(x))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(total(x))
        best = min(best, time.perf_counter() - start)
    return x.nbytes / best


def temp_bytes(compiled: jax.stages.Compiled) -> int:
    """Scratch memory XLA reserves for one call of a compiled function (beyond inputs and outputs)."""
    return int(compiled.memory_analysis().temp_size_in_bytes)


def free_memory_bytes() -> int:
    """Memory the first device can still give a computation: the device's limit on accelerators,
    MemAvailable on a CPU host."""
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        return int(stats.get("bytes_limit", 0)) - int(stats.get("bytes_in_use", 0))
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def versions() -> dict[str, str]:
    """Versions of the packages a benchmark compares (absent ones left out)."""
    from importlib import metadata

    out = {}
    for name in ("jax", "jaxlib", "flax", "torch", "transformers", "trl"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def write_rows(path: str | None, args: Any, rows: list[dict], **extra: Any) -> None:
    """Save a benchmark's rows with the machine, date, versions and arguments they were measured with."""
    if path:
        result = {
            "machine": machine_note(),
            "date": time.strftime("%Y-%m-%d"),
            "versions": versions(),
            "args": vars(args),
            **extra,
            "rows": rows,
        }
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


def torch_and_ours(config, seed: int = 0):
    """A transformers PyTorch model with random weights and the same weights loaded by our
    ``models.from_pretrained`` (saved and read back, as a user's checkpoint would be)."""
    import tempfile

    import torch
    import transformers

    from distillm_jax import models

    torch.manual_seed(seed)
    auto = (
        transformers.AutoModelForSeq2SeqLM if config.is_encoder_decoder else transformers.AutoModelForCausalLM
    )
    hf = auto.from_config(config).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = models.from_pretrained(d)
    return hf, ours
