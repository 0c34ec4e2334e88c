"""Runs, models and data in a bucket (``gs://``), against a GCS emulator on 127.0.0.1 that the tests start
(``gcs`` in conftest.py, tests/gcs_emulator.py) and name by ``STORAGE_EMULATOR_HOST`` only, as a user
would: every file of a run goes through ``distillm_jax.storage`` and orbax writes its checkpoints there
itself. The end-to-end runs are the pod tests' (tests/pod_runs.py): a bucket run, killed with SIGKILL and
started again with the same command, and a run of 2 processes x 4 devices, give the losses of one
process's run on disk that was never killed."""

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from pod_runs import ROOT, launch, rows, user_env

from distillm_jax import models, storage
from distillm_jax.config import ConfigError
from distillm_jax.data import demo, sources
from distillm_jax.data import tokenizers as toklib
from distillm_jax.models import hub
from distillm_jax.run import lock as runlock

TEACHER = str(demo.TEACHER)


@pytest.fixture(scope="module")
def bucket(gcs) -> str:
    """A bucket holding the demo teacher's checkpoint folder at ``models/teacher``."""
    url = gcs.bucket("distillm-tests")
    storage.upload(TEACHER, f"{url}/models/teacher")
    return url


def test_files_in_a_bucket(bucket):
    """What the run folder needs of a bucket: whole-file writes, ranged reads, listings, an exclusive
    create, a modification time that moves, folders copied and removed."""
    d = f"{bucket}/prims"
    assert not storage.exists(d) and storage.listdir(d) == [] and not storage.isdir(d)
    storage.write(f"{d}/a.json", '{"x": 1}')
    storage.write(f"{d}/sub/b.bin", bytes(range(10)))
    assert (
        storage.listdir(d) == ["a.json", "sub"]
        and storage.isdir(f"{d}/sub")
        and storage.isfile(f"{d}/a.json")
    )
    assert json.loads(storage.read_text(f"{d}/a.json")) == {"x": 1}
    assert (
        storage.read_bytes(f"{d}/sub/b.bin", 3, 6) == bytes([3, 4, 5])
        and storage.size(f"{d}/sub/b.bin") == 10
    )
    assert storage.create(f"{d}/c", b"first") and not storage.create(f"{d}/c", b"second")
    assert storage.read_stamped(f"{d}/c")[0] == b"first"
    before = storage.modified(f"{d}/c")
    time.sleep(1.1)
    storage.touch(f"{d}/c")
    assert storage.modified(f"{d}/c") > before and storage.read_bytes(f"{d}/c") == b"first"
    assert abs(storage.fs_now(d) - time.time()) < 5
    storage.rename(f"{d}/sub", f"{d}/moved")
    assert storage.listdir(d) == ["a.json", "c", "moved"] and storage.listdir(f"{d}/moved") == ["b.bin"]
    storage.rmtree(d)
    assert not storage.exists(d)
    with pytest.raises(FileNotFoundError):
        storage.remove(f"{d}/a.json")


def test_the_run_lock_in_a_bucket(bucket):
    """One run per bucket folder: a second holder is refused in one line, a dead holder's lock is taken
    over, and a release removes the lock object."""
    folder = f"{bucket}/locked"
    with runlock.RunLock(folder):
        assert storage.exists(f"{folder}/.lock")
        with pytest.raises(ConfigError, match="is in use by another run"):
            runlock.RunLock(folder).acquire()
    assert not storage.exists(f"{folder}/.lock")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    record = {
        "host": runlock.socket.gethostname(),
        "boot": runlock._BOOT,
        "pid": int(dead.stdout),
        "token": "x",
    }
    storage.write(f"{folder}/.lock", json.dumps(record))  # a holder killed without notice
    lock = runlock.RunLock(folder)
    lock.acquire()
    try:
        assert json.loads(storage.read_text(f"{folder}/.lock"))["token"] == lock.token
    finally:
        lock.release()


def test_models_and_data_from_a_bucket(bucket, tmp_path):
    """A checkpoint folder in a bucket loads the weights of the same folder on disk, read in place (only
    its small files are copied, for transformers); its tokenizer is the same; data files of every format
    read the rows of their local copies."""
    url = f"{bucket}/models/teacher"
    here, there = models.from_pretrained(TEACHER), models.from_pretrained(url)
    for a, b in zip(jax.tree.leaves(nnx.state(here)), jax.tree.leaves(nnx.state(there)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    cached = os.listdir(hub.local_dir(url))
    assert "config.json" in cached and not any(name.endswith(".safetensors") for name in cached)
    assert toklib.load("", url).get_vocab() == toklib.load("", TEACHER).get_vocab()

    rows = [{"prompt": f"p{i}", "response": f"r {i}", "n": i} for i in range(7)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "t.csv").write_text("prompt,response,n\n" + "".join(f"p{i},r {i},{i}\n" for i in range(7)))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    for name in ("train.jsonl", "t.csv", "t.parquet"):
        storage.upload(str(tmp_path / name), f"{bucket}/data/{name}")
        assert sources.read(f"{bucket}/data/{name}", "train[2:5]") == sources.read(
            str(tmp_path / name), "train[2:5]"
        )
    assert sources.read(f"{bucket}/data", "train") == rows  # a folder: its train.jsonl
    for k, part in enumerate((rows[:3], rows[3:])):  # a pattern: its files in the order of their names
        storage.write(f"{bucket}/parts/part-{k}.jsonl", "".join(json.dumps(r) + "\n" for r in part))
    assert sources.read(f"{bucket}/parts/*.jsonl", "train[1:]") == rows[1:]


@pytest.fixture(scope="module")
def s3():
    """An S3 stand-in on 127.0.0.1 (moto's server), named by the standard ``AWS_ENDPOINT_URL``."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test"}
    env |= {"AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem(anon=False).mkdir("distillm-tests")  # the bucket
    yield "s3://distillm-tests"
    server.stop()
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_models_and_data_from_s3(s3, tmp_path):
    """The same layer serves s3:// for models and data (a run folder there is refused: orbax 0.12 writes
    checkpoints to gs:// only), with the exclusive create the run lock needs."""
    assert storage.create(f"{s3}/x/c", b"1") and not storage.create(f"{s3}/x/c", b"2")
    storage.upload(TEACHER, f"{s3}/teacher")
    here, there = models.from_pretrained(TEACHER), models.from_pretrained(f"{s3}/teacher")
    for a, b in zip(jax.tree.leaves(nnx.state(here)), jax.tree.leaves(nnx.state(there)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    (tmp_path / "d.jsonl").write_text(
        "".join(json.dumps({"prompt": f"p{i}", "response": "r"}) + "\n" for i in range(3))
    )
    storage.upload(str(tmp_path / "d.jsonl"), f"{s3}/d.jsonl")
    assert sources.read(f"{s3}/d.jsonl", "train") == sources.read(str(tmp_path / "d.jsonl"), "train")
    from configs.demo import get_config
    from distillm_jax.config import checks

    config = get_config("tiny")
    config.run_dir = f"{s3}/run"
    with pytest.raises(ConfigError, match="gs:// only"):
        checks.check(config)


def _cli(*flags: str, env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "launch/train.py", "--config=configs/demo.py:tiny", *flags]
    return subprocess.run(cmd, cwd=ROOT, env=user_env(env), capture_output=True, text=True, timeout=180)


class _Forbidden(BaseHTTPRequestHandler):
    """A storage endpoint that refuses every request, as GCS does a caller without permission."""

    def _refuse(self) -> None:
        body = json.dumps({"error": {"code": 403, "message": "caller does not have storage.objects access"}})
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _refuse

    def log_message(self, *args) -> None:
        pass


@pytest.mark.slow
def test_a_missing_bucket_or_no_permission_is_one_line(gcs, bucket, tmp_path):
    """Before anything loads: a bucket that does not exist, one that refuses us (for the run folder, a
    model or the data), an endpoint that does not answer, a model folder or data file that is not
    there."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Forbidden)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    forbidden = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{server.server_address[1]}"}
    cases = [
        (("--config.run_dir=gs://no-such-bucket-here/run",), gcs.env, "no such bucket"),
        ((f"--config.run_dir={bucket}/refused",), forbidden, "permission denied"),
        (
            (f"--config.run_dir={tmp_path}/a", f"--config.teacher.path={bucket}/m"),
            forbidden,
            "permission denied",
        ),
        (
            (f"--config.run_dir={tmp_path}/b", f"--config.data.source={bucket}/d.jsonl"),
            forbidden,
            "permission",
        ),
        (
            (f"--config.run_dir={bucket}/r0",),
            {"STORAGE_EMULATOR_HOST": "http://127.0.0.1:9"},
            "cannot be reached",
        ),
        (
            (f"--config.run_dir={bucket}/r1", f"--config.teacher.path={bucket}/models/none"),
            gcs.env,
            "no config.json",
        ),
        (
            (f"--config.run_dir={bucket}/r2", f"--config.data.source={bucket}/none.jsonl"),
            gcs.env,
            "does not exist",
        ),
    ]
    try:
        for flags, env, words in cases:
            start = time.time()
            out = _cli(*flags, env=env)
            lines = [x for x in out.stderr.splitlines() if x.strip()]
            assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
            assert lines[0].startswith("error:") and words in lines[0], lines[0]
            assert "stage 1/" not in out.stdout and time.time() - start < 90
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def on_disk(tmp_path_factory) -> Path:
    """The pod tests' run, one process, on disk, never killed, with the shipped teacher: what the bucket
    runs, with the teacher's copy in the bucket, must reproduce."""
    run_dir = tmp_path_factory.mktemp("disk") / "run"
    [(rc, out)] = launch(1, run_dir, f"--config.teacher.path={TEACHER}")
    assert rc == 0, out[-3000:]
    return run_dir


def _same_rows(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        for k in x:
            np.testing.assert_allclose(y[k], x[k], rtol=1e-5, err_msg=f"step {x['step']} {k}")


@pytest.mark.slow
def test_a_bucket_run_killed_and_continued_gives_the_run_on_disk(gcs, bucket, on_disk):
    """``run_dir=gs://…`` with the teacher read from the bucket: SIGKILL after step 3, the same command
    continues from the bucket's checkpoint of step 2 and ends with the losses, buffer and ROUGE-L of the
    run on disk; the bucket holds every file of a run, its student loads as the disk run's, the command
    once more finds the run done (another config is refused), and ``launch/export.py`` writes a kept
    checkpoint into the bucket."""
    run = f"{bucket}/run"
    flags = (f"--config.teacher.path={bucket}/models/teacher",)
    [(rc, out)] = launch(1, run, *flags, env={**gcs.env, "DISTILLM_KILL_AT_STEP": "3"})
    assert rc != 0 and "final" not in storage.listdir(run), out[-3000:]
    assert storage.exists(f"{run}/.lock")  # killed: left behind, to be taken over
    [(rc, out)] = launch(1, run, *flags, env=gcs.env)
    assert rc == 0, out[-3000:]
    assert "took over" in out and "at step 2 of 4" in out  # killed before the save of step 3
    _same_rows(rows(on_disk), rows(run))
    held = storage.listdir(run)
    for name in (
        "checkpoints",
        "metrics.jsonl",
        "summary.json",
        "curves.png",
        "best",
        "final",
        "tensorboard",
    ):
        assert name in held, held
    assert ".lock" not in held and not any(name.endswith(".tmp") for name in held)
    assert any(name.startswith("events.out.tfevents") for name in storage.listdir(f"{run}/tensorboard"))
    assert json.loads(storage.read_text(f"{run}/summary.json"))["steps"] == 4
    here, there = models.from_pretrained(str(on_disk / "final")), models.from_pretrained(f"{run}/final")
    for a, b in zip(jax.tree.leaves(nnx.state(here)), jax.tree.leaves(nnx.state(there)), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    [(rc, out)] = launch(1, run, *flags, env=gcs.env)  # the same command once more: nothing to do
    assert rc == 0 and "done before" in out, out[-2000:]
    [(rc, out)] = launch(1, run, *flags, "--config.optim.steps=5", env=gcs.env)  # another config: refused
    assert rc == 2 and "holds a run of another config" in out, out[-2000:]
    cmd = [sys.executable, "launch/export.py", "--config=configs/demo.py:tiny", f"--config.run_dir={run}"]
    e = user_env(gcs.env)
    out = subprocess.run([*cmd, "--step=3"], cwd=ROOT, env=e, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0 and storage.isfile(f"{run}/export-3/model.safetensors"), out.stderr[-2000:]


@pytest.mark.slow
def test_two_processes_write_one_bucket_run(gcs, bucket, on_disk):
    """2 processes x 4 devices share one bucket run (process 0 writes the logs and exports, orbax every
    process's shards) and give the losses of the one-process run on disk."""
    run = f"{bucket}/pod"
    out = launch(2, run, f"--config.teacher.path={bucket}/models/teacher", env=gcs.env)
    assert all(rc == 0 for rc, _ in out), [text[-2000:] for _, text in out]
    _same_rows(rows(on_disk), rows(run))
    assert "final" in storage.listdir(run) and storage.listdir(f"{run}/checkpoints")
