"""Helpers every benchmark shares: a machine note, a wall-clock timer for compiled calls, and the
compiled memory of a jitted function. Benchmarks report ratios measured side by side in one run."""

from __future__ import annotations

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


def write_rows(path: str | None, args: Any, rows: list[dict]) -> None:
    """Save a benchmark's rows with the machine and the arguments they were measured with."""
    if path:
        with open(path, "w") as f:
            json.dump({"machine": machine_note(), "args": vars(args), "rows": rows}, f, indent=1)


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
