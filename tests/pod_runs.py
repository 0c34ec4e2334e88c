"""Training runs launched as a pod would launch them: ``processes`` processes on this machine, each with
8 / processes CPU devices (the demo pair with ImitKD in overlap mode, ``COMMON``), for the pod and bucket
tests."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from distillm_jax import storage

ROOT = Path(__file__).resolve().parents[1]
COMMON = [
    "--config=configs/demo.py:tiny",
    "--config.compare=()",
    "--config.data.test_split=",
    "--config.teacher.train_steps=0",  # random tiny models: the path is what is tested
    "--config.student.train_steps=0",
    "--config.method=imitkd",
    "--config.offpolicy.overlap=True",  # steps decided ahead: SGOs in flight at every checkpoint
    "--config.offpolicy.max_staleness=2",
    "--config.offpolicy.capacity=16",  # 2 rows a data shard: the buffer evicts from step 3 on
    "--config.optim.steps=4",
    "--config.eval.interval=2",
    "--config.checkpoint.interval=1",
    "--config.checkpoint.keep=4",
    "--config.resume=True",
    "--config.start_if_empty=True",  # the first launch starts; a relaunch continues
]
HOST_ONLY = ("tokens_per_s", "gen_s", "interval_s", "train_s", "kind")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def user_env(env: dict | None = None) -> dict:
    """The environment a user's command would have: this one with ``env``, on the CPU, without what
    ``storage.configure_emulator`` derived in the test process (a command must derive it itself)."""
    kept = {k: v for k, v in os.environ.items() if k not in storage.EMULATED}
    return {**kept, "JAX_PLATFORMS": "cpu", **(env or {})}


def launch(
    processes: int, run_dir: Path | str, *flags: str, env: dict | None = None, timeout: float = 300
) -> list:
    """Run the trainer as ``processes`` processes of 8 / processes CPU devices; returns (returncode,
    output) of each."""
    port, procs = free_port(), []
    for i in range(processes):
        cmd = [
            sys.executable,
            str(ROOT / "launch" / "train.py"),
            *COMMON,
            f"--config.run_dir={run_dir}",
            *flags,
        ]
        if processes > 1:
            cmd += [
                f"--config.distributed.coordinator=127.0.0.1:{port}",
                f"--config.distributed.num_processes={processes}",
                f"--config.distributed.process_id={i}",
            ]
        e = user_env({"JAX_DISABLE_MOST_OPTIMIZATIONS": "1", **(env or {})})
        e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // processes}"
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    deadline, out = time.time() + timeout, []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=max(deadline - time.time(), 1))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, text.decode(errors="replace")))
    return out


def rows(run_dir: Path | str) -> list[dict]:
    """A run's ``metrics.jsonl`` rows (its folder on disk or in a bucket) without what is per host."""
    lines = storage.read_text(storage.join(str(run_dir), "metrics.jsonl")).splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in HOST_ONLY} for line in lines]
