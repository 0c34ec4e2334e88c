"""Processes on one machine stand in for the hosts of a pod (docs/architecture.md §7): 2 processes with 4
CPU devices each against 1 process with 8, on the demo pair with ImitKD in overlap mode (every step
generates into the replay buffer, two steps ahead, and trains on a replayed sample, so SGOs in flight,
the buffer and sampled evaluation all cross hosts and checkpoints). Runs are killed with SIGKILL, as a
preemption without notice would, and resumed.
"""

import shutil
import time

import numpy as np
import pytest
from pod_runs import launch, rows

pytestmark = pytest.mark.slow  # end-to-end: the full suite (CI) runs them, -m 'not slow' skips


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
