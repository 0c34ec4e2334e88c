"""The run-folder lock (distillm_jax/run/lock.py): a live holder refuses a second run, a dead one's lock is
taken over (SIGKILL on this host: at once; another host: after STALE_AFTER without a heartbeat), nested
holds of one folder in one process share the lock, and racers for a stale lock leave exactly one winner.
Waits are on conditions with generous deadlines, never on bare sleeps."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import pytest

from distillm_jax.config import ConfigError
from distillm_jax.run import lock as runlock
from distillm_jax.run.folder import RunDir

LOCK = os.path.basename(RunDir("any").lock)

ROOT = Path(__file__).resolve().parents[1]
HOLDER = """
import sys, time
from distillm_jax.run import lock as runlock
with runlock.hold(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def write_lock(folder: Path, age: float = 0.0, **info) -> Path:
    """A lock file as another process would leave it, touched ``age`` seconds ago."""
    path = folder / LOCK
    record = {"host": "elsewhere", "pid": 4321, "started": time.time() - 3600, "token": "theirs"} | info
    path.write_text(json.dumps(record))
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def test_killed_holder_is_taken_over_at_once(tmp_path, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        while not lines or lines[-1].strip() != "held":
            lines.append(holder.stdout.readline())
            assert lines[-1], f"the holder exited before holding: {''.join(lines)}"
        with pytest.raises(ConfigError) as refused, runlock.hold(str(tmp_path)):
            pass
        message = str(refused.value)
        assert f"{tmp_path} is in use by another run (pid {holder.pid} on host " in message
        assert "choose another run_dir" in message and "\n" not in message
        holder.kill()  # SIGKILL: no clean-up, the lock file stays
        holder.wait(timeout=30)
        assert (tmp_path / LOCK).exists()
        capsys.readouterr()
        with runlock.hold(str(tmp_path)):
            held = json.loads((tmp_path / LOCK).read_text())
            assert held["pid"] == os.getpid()
        assert f"note: took over the lock of {held['host']} pid {holder.pid} (process gone)" in (
            capsys.readouterr().out
        )
        assert not (tmp_path / LOCK).exists()
    finally:
        holder.kill()
        holder.wait(timeout=30)
        holder.stdout.close()


def test_other_host_is_stale_only_without_heartbeat(tmp_path, capsys):
    write_lock(tmp_path, age=1)
    with pytest.raises(ConfigError, match=r"in use by another run \(pid 4321 on host elsewhere, started "):
        runlock.hold(str(tmp_path)).__enter__()
    write_lock(tmp_path, age=600)
    with runlock.hold(str(tmp_path)):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    out = capsys.readouterr().out
    assert "note: took over the lock of elsewhere pid 4321 (no heartbeat for 600 s)" in out


def test_unreadable_lock_is_judged_by_its_mtime(tmp_path, capsys):
    path = tmp_path / LOCK
    path.write_text("")  # a crash between the create and the write
    with pytest.raises(ConfigError, match="unreadable lock file"):
        runlock.hold(str(tmp_path)).__enter__()
    os.utime(path, (time.time() - 600, time.time() - 600))
    with runlock.hold(str(tmp_path)):
        pass
    assert f"note: took over the unreadable lock file {path} (no heartbeat for" in capsys.readouterr().out


def test_our_pid_with_another_token_is_an_earlier_process(tmp_path, capsys):
    """A restarted container runs the new process under the old one's pid and host name."""
    write_lock(tmp_path, host=socket.gethostname(), pid=os.getpid())
    with runlock.hold(str(tmp_path)):
        pass
    assert "(process gone)" in capsys.readouterr().out


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="zombies are told apart through /proc")
def test_a_killed_process_not_yet_reaped_is_gone(tmp_path, capsys):
    """A zombie still answers ``kill(pid, 0)`` until its parent waits for it."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        child.kill()
        stat = Path(f"/proc/{child.pid}/stat")
        wait_until(lambda: stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")
        write_lock(tmp_path, host=socket.gethostname(), pid=child.pid)
        with runlock.hold(str(tmp_path)):
            pass
        assert f"pid {child.pid} (process gone)" in capsys.readouterr().out
    finally:
        child.kill()
        child.wait(timeout=30)


def test_a_host_rebooted_under_the_same_name(tmp_path, capsys):
    """After a reboot the pids start over: the old lock's pid may be any live process (here our parent)."""
    write_lock(tmp_path, host=socket.gethostname(), pid=os.getppid(), boot="an earlier boot")
    with runlock.hold(str(tmp_path)):
        pass
    assert "(process gone, host rebooted)" in capsys.readouterr().out


def test_reentrant_in_one_process_separate_per_folder(tmp_path):
    path, sub = tmp_path / LOCK, tmp_path / "teacher"
    sub.mkdir()
    with runlock.hold(str(tmp_path)):
        token = json.loads(path.read_text())["token"]
        with runlock.hold(str(tmp_path)), runlock.hold(str(sub)):  # the trainer inside the pipeline
            assert json.loads(path.read_text())["token"] == token  # the same lock, no second file
            assert (sub / LOCK).exists()
        assert path.exists() and not (sub / LOCK).exists()
    assert not path.exists()
    assert os.listdir(tmp_path) == ["teacher"]  # no probe or break files left behind


def test_heartbeat_touches_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "HEARTBEAT", 0.05)
    path = tmp_path / LOCK
    with runlock.hold(str(tmp_path)):
        old = time.time() - 1000
        os.utime(path, (old, old))
        wait_until(lambda: os.stat(path).st_mtime > old + 500)


def test_released_on_an_exception(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), runlock.hold(str(tmp_path)):
        assert (tmp_path / LOCK).exists()
        raise RuntimeError("boom")
    assert not (tmp_path / LOCK).exists()
    with runlock.hold(str(tmp_path)):  # and taken again without a take-over
        pass


def test_a_lock_taken_over_is_not_removed_by_the_old_holder(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runlock, "HEARTBEAT", 0.05)
    lock = runlock.RunLock(str(tmp_path))
    lock.acquire()
    path = write_lock(tmp_path, host="newer", pid=99)  # we were thought dead (a long pause)
    wait_until(lambda: lock.lost)
    lock.release()
    assert json.loads(path.read_text())["host"] == "newer"
    assert f"warning: the lock of {tmp_path} was taken over by newer pid 99" in capsys.readouterr().out


@pytest.mark.parametrize("forced", [True, False], ids=["all-judged-stale", "free"])
def test_racers_for_a_stale_lock_leave_one_winner(tmp_path, monkeypatch, forced):
    """``forced``: every racer has judged the lock stale before any replaces it (the case where replacing
    and reading one's token back would let several win)."""
    racers, rounds = 4, 8
    take_over = runlock.RunLock._take_over
    gate = threading.Barrier(racers, timeout=30)
    local = threading.local()

    def gated(self, raw):
        if forced and not getattr(local, "passed", False):
            local.passed = True
            gate.wait()
        return take_over(self, raw)

    def race(start: threading.Barrier, won: list, refused: list) -> None:
        local.passed = False
        lock = runlock.RunLock(str(tmp_path))
        start.wait()
        try:
            lock.acquire()
            won.append(lock)
        except ConfigError as e:
            refused.append(str(e))

    monkeypatch.setattr(runlock.RunLock, "_take_over", gated)
    for _ in range(rounds):
        write_lock(tmp_path, age=600)
        start, won, refused = threading.Barrier(racers, timeout=30), [], []
        threads = [threading.Thread(target=race, args=(start, won, refused)) for _ in range(racers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert len(won) == 1 and len(refused) == racers - 1, (won, refused)
        assert json.loads((tmp_path / LOCK).read_text())["token"] == won[0].token
        assert all("is in use by another run" in message for message in refused)
        won[0].release()
        assert os.listdir(tmp_path) == []


def test_only_process_zero_locks(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    write_lock(tmp_path)  # process 0 holds it; the others share the folder
    with runlock.hold(str(tmp_path)):
        assert json.loads((tmp_path / LOCK).read_text())["host"] == "elsewhere"


def test_a_folder_that_cannot_be_written(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot write the lock file .*missing.* choose another run_dir"):
        runlock.hold(str(tmp_path / "missing")).__enter__()


def test_the_pipeline_and_the_trainer_refuse_a_folder_another_process_trains_in(tmp_path):
    """The same command started twice: the second start is one line, before any model loads, and
    writes nothing into the folder (it used to train beside the first, every metrics row twice)."""
    from distillm_jax import config as cfglib
    from distillm_jax import pipeline, trainer

    c = cfglib.load_file(str(ROOT / "configs" / "demo.py"), "tiny")
    c.run_dir, c.resume = str(tmp_path / "run"), False
    (tmp_path / "run").mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, c.run_dir], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        says = rf"run is in use by another run \(pid {holder.pid} on host {socket.gethostname()}"
        for entry in (pipeline.run, trainer.train):
            with pytest.raises(ConfigError, match=says):
                entry(c)
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK]
    finally:
        holder.kill()
        holder.wait()
