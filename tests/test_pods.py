"""Processes on one machine stand in for the hosts of a pod (docs/architecture.md §7): 2 processes with 4
CPU devices each against 1 process with 8, on the demo pair with ImitKD in overlap mode (every step
generates into the replay buffer, two steps ahead, and trains on a replayed sample, so SGOs in flight,
the buffer and sampled evaluation all cross hosts and checkpoints). Runs are killed with SIGKILL, as a
preemption without notice would, and resumed.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

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

pytestmark = pytest.mark.slow  # end-to-end: the full suite (CI) runs them, -m 'not slow' skips


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int, run_dir: Path, *flags: str, env: dict | None = None, timeout: float = 300) -> list:
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
        e = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1", **(env or {})}
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


def rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in HOST_ONLY} for line in lines]


def test_two_processes_train_as_one_and_checkpoints_reshard(tmp_path):
    """The same losses, SGO buffer and sampled ROUGE-L whether 1 process or 2 feed the 8 devices, and a
    checkpoint moves between them: 1 process -> 2 (resumed at step 1) -> 1 (resumed at step 2)."""
    one = tmp_path / "one"
    [(rc, err)] = launch(1, one)
    assert rc == 0, err[-3000:]
    mixed = tmp_path / "mixed"
    shutil.copytree(one, mixed)
    for step in (2, 3, 4):  # back to the checkpoint of step 1, written by one process
        shutil.rmtree(mixed / "checkpoints" / str(step))
    shutil.rmtree(mixed / "final")
    two = launch(2, mixed, env={"DISTILLM_KILL_AT_STEP": "3"})  # both hosts die after step 3
    assert all(rc != 0 for rc, _ in two), [out[-2000:] for _, out in two]
    assert "resumed" in two[0][1] and "at step 1 of 4" in two[0][1] and "resumed" not in two[1][1]
    assert max(int(p.name) for p in (mixed / "checkpoints").iterdir() if p.name.isdigit()) == 2
    assert not (mixed / "final").exists()  # killed: no clean-up ran
    [(rc, out)] = launch(1, mixed)  # the checkpoint of step 2, written by two processes
    assert rc == 0, out[-3000:]
    assert "at step 2 of 4" in out
    a, b = rows(one), rows(mixed)
    assert [(r["step"], "ce" in r) for r in a] == [(r["step"], "ce" in r) for r in b]
    assert [r["buffer"] for r in b if "buffer" in r] == [8, 16, 16, 16]  # global rows, whatever the hosts
    for x, y in zip(a, b, strict=True):
        for k in x:
            np.testing.assert_allclose(y[k], x[k], rtol=1e-5, err_msg=f"step {x['step']} {k}")


def test_a_lost_process_stops_the_others(tmp_path):
    """Process 1 dies without notice at step 2: process 0 must not wait for it forever."""
    start = time.time()
    out = launch(
        2,
        tmp_path / "run",
        "--config.distributed.heartbeat_timeout=5",
        "--config.eval.generate=False",
        env={"DISTILLM_KILL_AT_STEP": "2", "DISTILLM_KILL_PROCESS": "1"},
        timeout=240,
    )
    (rc0, err0), (rc1, _) = out
    assert rc1 != 0 and rc0 != 0
    # JAX's heartbeat check aborts it ("another task died"), or a collective times out first (our line)
    assert "another task died" in err0 or "another process stopped or lost contact" in err0, err0[-2000:]
    assert time.time() - start < 240


def test_minillm_rollouts_cross_hosts_and_resume_mid_round(tmp_path):
    """MiniLLM on 2 processes gives the losses of 1, resumed from a checkpoint written by 1 process in the
    middle of a rollout round (each host samples and scores its own rows; the round's rows and scores in
    the checkpoint are split by data shard)."""
    flags = (
        "--config.method=minillm",
        "--config.loss.name=rkl",
        "--config.minillm.ppo_epochs=3",  # rounds: steps 0-2, 3-4; the checkpoint of step 1 is inside one
        "--config.eval.generate=False",
    )
    one = tmp_path / "one"
    [(rc, out)] = launch(1, one, *flags)
    assert rc == 0, out[-3000:]
    mixed = tmp_path / "mixed"
    shutil.copytree(one, mixed)
    for step in (2, 3, 4):
        shutil.rmtree(mixed / "checkpoints" / str(step))
    two = launch(2, mixed, *flags)
    assert all(rc == 0 for rc, _ in two), [out[-2000:] for _, out in two]
    assert "at step 1 of 4" in two[0][1]
    a, b = rows(one), rows(mixed)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        for k in x:
            np.testing.assert_allclose(y[k], x[k], rtol=1e-5, err_msg=f"step {x['step']} {k}")
