"""One run per run folder: ``with hold(run_dir):`` refuses a second process on the same folder (the same
command started twice would train twice and write every ``metrics.jsonl`` row twice).

The lock is a plain file, ``run_dir/.lock``, not ``fcntl.flock``/``lockf``: those are unreliable or missing
on NFS, FUSE-mounted buckets (gcsfuse) and buckets (``gs://``), where pods keep their runs. What all of
them provide is an exclusive create (``O_CREAT | O_EXCL``; in a bucket, and under gcsfuse, a create-if-absent
precondition), a whole-file replace and modification times, and that is all this module uses, through
``storage`` (``create``, ``write``, ``read_stamped``, ``touch``).

A lock file outlives a process killed without notice (SIGKILL, OOM, a lost VM), so it proves nothing by
existing; a holder proves it is alive by touching it every ``HEARTBEAT`` seconds. A lock is stale, and
taken over, when its process is gone (same host: the pid is not running) or when nobody touched it for
``STALE_AFTER`` seconds (any host). Ages are measured on the file system's own clock (see ``_fs_now``),
so clock skew between hosts does not count on NFS.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from distillm_jax import storage
from distillm_jax.errors import ConfigError
from distillm_jax.run.folder import RunDir

HEARTBEAT = 10.0  # seconds between touches of a held lock
STALE_AFTER = 60.0  # seconds untouched that make a lock stale (6 heartbeats: one slow NFS write is no death)
TAKE_OVER_WAIT = 5.0  # seconds to wait for another process that is taking over the same stale lock

_held: dict[str, tuple[RunLock, int]] = {}  # realpath of a run folder -> (its lock, nesting depth)
_live: set[str] = set()  # tokens of the locks this process holds (a pid of ours does not prove it is ours)
_guard = threading.Lock()


class RunLock:
    """The lock file of one run folder, held by this process between ``acquire`` and ``release``. Not
    re-entrant (``hold`` is): a second ``RunLock`` of a folder this process holds is refused."""

    def __init__(self, run_dir: RunDir | str):
        folder = RunDir.of(run_dir)
        self.run_dir, self.path = folder.path, folder.lock
        self.host = socket.gethostname()
        self.token = uuid.uuid4().hex
        self.lost = False  # another process took the lock over (we were thought dead): see _beat
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Create the lock file, or take over a stale one; raise ``ConfigError`` (one line) if the folder
        is held by a live run or cannot be written."""
        _live.add(self.token)  # before the file exists: our pid in it must never look like a dead process's
        try:
            self._acquire()
        except BaseException:
            _live.discard(self.token)
            raise
        self._thread = threading.Thread(target=self._beat, name=f"runlock {self.run_dir}", daemon=True)
        self._thread.start()

    def _acquire(self) -> None:
        deadline = time.monotonic() + TAKE_OVER_WAIT
        while not self._create():
            try:
                raw, mtime = _read(self.path)
            except FileNotFoundError:  # released meanwhile: try again
                continue
            info = _parse(raw)
            age = _fs_now(self.run_dir) - mtime
            why = self._stale(info, age)
            if why is None:
                raise ConfigError(self._in_use(info, age))
            if self._take_over(raw):
                print(f"note: took over {_who(info, self.path)} ({why})", flush=True)
                return
            if time.monotonic() > deadline:  # another process is taking it over and does not finish
                raise ConfigError(self._in_use(None, age, "another process is taking over its stale lock"))
            time.sleep(0.05)  # lost a take-over race: the winner's lock is refused on the next pass

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file, unless another process took it over: its lock is
        not ours to delete."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        _live.discard(self.token)
        with suppress(OSError):
            if _parse(_read(self.path)[0]).get("token") == self.token:
                storage.remove(self.path)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _record(self) -> bytes:
        info = {
            "host": self.host,
            "boot": _BOOT,
            "pid": os.getpid(),
            "started": time.time(),
            "token": self.token,
        }
        return json.dumps(info).encode()

    def _create(self) -> bool:
        """Create the lock file if there is none (atomic, also on NFS, gcsfuse and buckets); False if
        there is."""
        try:
            return storage.create(self.path, self._record())
        except OSError as e:
            raise ConfigError(
                f"cannot write the lock file {self.path} ({storage.reason(e)}); choose another run_dir"
            ) from None

    def _stale(self, info: dict, age: float) -> str | None:
        """Why the lock described by ``info`` (empty: unreadable) and untouched for ``age`` seconds is
        stale, or None while its holder may be alive."""
        pid = info.get("pid")
        if info.get("host") == self.host and isinstance(pid, int):
            if info.get("boot", _BOOT) != _BOOT:  # a VM rebooted under the same name: its pids start over
                return "process gone, host rebooted"
            if pid == os.getpid():  # our pid, not our token: an earlier process (a restarted container)
                if info.get("token") not in _live:
                    return "process gone"
            elif not _running(pid):
                return "process gone"
        if age > STALE_AFTER:
            return f"no heartbeat for {age:.0f} s"
        return None

    def _take_over(self, raw: bytes) -> bool:
        """Replace the stale lock whose content is ``raw`` by ours; True if ours is now the lock.

        ``os.replace`` then re-reading is not enough on its own: two racers may each replace and each read
        their own token back. So a racer first creates ``.lock.break.<hash of raw>`` exclusively, then
        checks the lock still holds ``raw``, and only then replaces it: one racer per stale lock gets past
        the break file, and a late one finds the lock changed. A break file left by a racer killed in
        those few milliseconds is removed once it is ``STALE_AFTER`` old."""
        brk = f"{self.path}.break.{hashlib.sha1(raw).hexdigest()[:16]}"
        if not storage.create(brk, b""):
            with suppress(FileNotFoundError):
                if _fs_now(self.run_dir) - storage.modified(brk) > STALE_AFTER:
                    storage.remove(brk)
            return False
        try:
            if _read(self.path)[0] != raw:
                return False
            storage.write(self.path, self._record())
            return _parse(_read(self.path)[0]).get("token") == self.token
        except FileNotFoundError:  # released meanwhile: the next pass creates it
            return False
        finally:
            with suppress(FileNotFoundError):
                storage.remove(brk)

    def _beat(self) -> None:
        """Touch the lock every ``HEARTBEAT`` seconds while it is still ours (a transient write error is
        retried at the next beat); say so once and stop if another process took it over."""
        while not self._stop.wait(HEARTBEAT):
            try:
                raw = _read(self.path)[0]
                if _parse(raw).get("token") != self.token:
                    self.lost = True
                    theirs = _parse(raw)
                    who = f"{theirs.get('host')} pid {theirs.get('pid')}" if theirs else "another process"
                    print(f"warning: the lock of {self.run_dir} was taken over by {who}", flush=True)
                    return
                storage.touch(self.path)
            except FileNotFoundError:
                self.lost = True
                print(f"warning: the lock file {self.path} was removed by another process", flush=True)
                return
            except OSError:
                pass

    def _in_use(self, info: dict | None, age: float, what: str = "") -> str:
        """The one-line refusal: who holds the folder (``info``; None: unreadable) and since when."""
        if not what and info:
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
            pid, host = info.get("pid"), info.get("host")
            what = f"pid {pid} on host {host}, started {started}, alive {age:.0f} s ago"
        elif not what:
            what = f"unreadable lock file {self.path}, touched {age:.0f} s ago, stale at {STALE_AFTER:.0f} s"
        advice = "wait for it, stop it, or choose another run_dir"
        return f"{self.run_dir} is in use by another run ({what}); {advice}"


@contextmanager
def hold(run_dir: RunDir | str) -> Iterator[None]:
    """Hold ``run_dir`` for this run (re-entrant: the pipeline holds a folder and the trainer inside it may
    take the same one again; the file is removed when the outermost ``hold`` exits, exception or not).

    The caller has created ``run_dir`` (``preflight.writable``). In a multi-process run all processes
    share the folder and only process 0 takes the lock; the others pass through."""
    import jax  # asked when the lock is taken, after jax.distributed.initialize, not at import time

    if jax.process_index() != 0:
        yield
        return
    key = str(run_dir) if storage.is_remote(str(run_dir)) else os.path.realpath(str(run_dir))
    with _guard:
        lock, depth = _held.get(key, (None, 0))
        if lock is None:
            lock = RunLock(run_dir)
            lock.acquire()
        _held[key] = (lock, depth + 1)
    try:
        yield
    finally:
        with _guard:
            lock, depth = _held.pop(key)
            if depth > 1:
                _held[key] = (lock, depth - 1)
            else:
                lock.release()


def _read(path: str) -> tuple[bytes, float]:
    """The lock's content and modification time (``storage.read_stamped``: fresh on NFS too)."""
    return storage.read_stamped(path)


def _parse(raw: bytes) -> dict:
    """A lock's record; empty if unreadable (a crash between create and write): judged by its mtime only."""
    try:
        info = json.loads(raw)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _who(info: dict, path: str) -> str:
    """The holder of a lock, as notes name it."""
    if not info:
        return f"the unreadable lock file {path}"
    return f"the lock of {info.get('host')} pid {info.get('pid')}"


def _running(pid: int) -> bool:
    """Whether a process of this host has ``pid`` (one of another user counts: PermissionError). A zombie
    (killed, not yet reaped by its parent) answers ``kill(pid, 0)`` but runs nothing: not running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (macOS): kill(pid, 0) alone
        return True


def _boot_id() -> str:
    """This boot of this host (Linux), so a lock of a host that rebooted under the same name is stale."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _fs_now(folder: str) -> float:
    """The file system's "now", as a heartbeat there would record it (``storage.fs_now``): on NFS and in a
    bucket both this and the holder's heartbeat are the server's clock, so a host whose clock is off does
    not see live locks as stale."""
    return storage.fs_now(RunDir.of(folder).path)


_BOOT = _boot_id()  # read once: it cannot change while this process runs
