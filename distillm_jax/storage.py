"""Where a run's files live: a local folder or a bucket (``gs://``, ``s3://``), behind one set of functions.

Pod hosts share no disk, so their users keep a run in a bucket. Every file a run writes or reads (the run
folder's files, cached responses, exports, model checkpoints and data files) goes through this module,
which hands local paths to the operating system exactly as before and bucket URLs to ``fsspec`` (gcsfs,
s3fs). Orbax writes its checkpoints to the same URLs itself, through tensorstore's GCS driver: orbax 0.12
checkpoints to local paths and ``gs://`` only, so a run folder may be in ``gs://`` (``RUNS``) while models
and data may be in either.

What a bucket does not have, and what this module does instead:

- no append: ``write`` replaces a whole object (one PUT: a reader sees the old object or the new one);
  ``reporting.Reporter`` keeps ``metrics.jsonl`` in memory and writes it whole at intervals;
- no exclusive open, only preconditions: ``create`` is a create-if-absent PUT, the run lock's primitive;
- no rename: ``rename`` copies then deletes (not atomic; exports are written first under another name);
- no mtime to set: ``touch`` rewrites the object, whose ``updated`` time is the bucket's clock;
- listings are cached by fsspec: this module's filesystems cache none, so another host's new file is seen.

Emulators: ``STORAGE_EMULATOR_HOST`` (the variable Google's client libraries read) points gcsfs at a GCS
emulator; ``configure_emulator`` points tensorstore (orbax) at the same one, with a test token.
S3-compatible stores are named by ``AWS_ENDPOINT_URL`` (read by botocore, under s3fs).
"""

from __future__ import annotations

import builtins
import contextlib
import glob as globlib
import logging
import os
import posixpath
import shutil
import socket
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import IO, Any

from distillm_jax.errors import ConfigError

REMOTE = ("gs://", "s3://")  # the schemes served (fsspec packages: gcsfs, s3fs)
PACKAGES = {"gs": "gcsfs", "s3": "s3fs"}
RUNS = ("gs://",)  # where a run folder may be: orbax 0.12 checkpoints to local paths and gs:// only


def scheme_problem(path: str, *, run: bool = False) -> str | None:
    """Why ``path`` cannot be used (a URL scheme not served; for a run folder, one orbax cannot write
    checkpoints to), or None."""
    text = str(path)
    if "://" not in text or text.startswith("file://"):
        return None
    if not text.startswith(REMOTE):
        return f"{text.split('://')[0]}:// is not served here; use gs://, s3:// or a local path"
    if run and not text.startswith(RUNS):
        return (
            "orbax writes checkpoints to local paths and gs:// only; keep the run in gs:// or on a mount of "
            "the bucket (models and data may stay in s3://)"
        )
    return None


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an object in a bucket rather than a local file."""
    return str(path).startswith(REMOTE)


def join(base: str, *names: str) -> str:
    """``base/name/...``; URLs join with ``/`` whatever the OS."""
    return posixpath.join(base, *names) if is_remote(base) else os.path.join(base, *names)


def absolute(path: str) -> str:
    """An absolute local path (``~`` expanded), or the URL as given (without a trailing ``/``)."""
    if is_remote(path):
        return path.rstrip("/")
    return os.path.abspath(os.path.expanduser(path))


EMULATED = ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")


def configure_emulator() -> None:
    """Point tensorstore (orbax's checkpoints) at the GCS emulator that ``STORAGE_EMULATOR_HOST`` names,
    as gcsfs already is; idempotent, a no-op without the variable. gcsfs's zonal-bucket probe speaks gRPC,
    which emulators do not: it is turned off under an emulator (it would wait a minute per bucket)."""
    host = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if not host:
        return
    url = host if "://" in host else f"http://{host}"
    for name, value in zip(EMULATED, (url.rstrip("/"), "emulator", "false"), strict=True):
        os.environ.setdefault(name, value)


def filesystem(path: str) -> tuple[Any, str]:
    """The fsspec filesystem of a bucket URL and the path within it; one line if its package is missing."""
    import fsspec

    configure_emulator()
    for name in ("gcsfs", "s3fs"):  # they log each failed request as a traceback, then raise it to us:
        if logging.getLogger(name).level == logging.NOTSET:  # the error is reported once, by its caller
            logging.getLogger(name).setLevel(logging.CRITICAL)
    scheme = str(path).split("://", 1)[0]
    _reachable(path)
    try:
        return fsspec.core.url_to_fs(str(path), use_listings_cache=False)
    except ImportError:
        package = PACKAGES.get(scheme, scheme)
        raise ConfigError(f"{path}: {scheme}:// paths need {package}; pip install {package}") from None


def open(path: str, mode: str = "r", **kwargs) -> IO:
    """``builtins.open`` for a local path; a bucket object opened with ranged reads or one upload on close
    (modes r, rb, w, wb)."""
    if not is_remote(path):
        return builtins.open(path, mode, **kwargs)
    fs, p = filesystem(path)
    return fs.open(p, mode, **kwargs)


def exists(path: str) -> bool:
    if not is_remote(path):
        return os.path.exists(path)
    fs, p = filesystem(path)
    return fs.exists(p)


def isdir(path: str) -> bool:
    """A local folder, or a prefix in a bucket that holds at least one object."""
    if not is_remote(path):
        return os.path.isdir(path)
    fs, p = filesystem(path)
    return fs.isdir(p)


def isfile(path: str) -> bool:
    if not is_remote(path):
        return os.path.isfile(path)
    fs, p = filesystem(path)
    return fs.isfile(p)


def listdir(path: str) -> list[str]:
    """The names in a folder (a bucket prefix's next level); empty if there is none."""
    if not is_remote(path):
        return os.listdir(path) if os.path.isdir(path) else []
    fs, p = filesystem(path)
    try:
        return sorted({posixpath.basename(e.rstrip("/")) for e in fs.ls(p, detail=False)} - {""})
    except FileNotFoundError:
        return []


def is_pattern(path: str) -> bool:
    """A ``*`` pattern of files (``data/*.jsonl``), not one path."""
    return "*" in str(path)


def glob(pattern: str) -> list[str]:
    """The files a ``*`` pattern matches (``gs://b/data/*.jsonl``), sorted; URLs stay URLs."""
    if not is_remote(pattern):
        return sorted(f for f in globlib.glob(os.path.expanduser(pattern)) if os.path.isfile(f))
    fs, p = filesystem(pattern)
    scheme = pattern.split("://", 1)[0]
    return sorted(f"{scheme}://{f}" for f in fs.glob(p) if fs.isfile(f))


def makedirs(path: str) -> None:
    """A local folder and its parents; nothing for a bucket (a prefix exists once an object is under it)."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
    """Delete one file; FileNotFoundError if there is none."""
    if not is_remote(path):
        os.remove(path)
        return
    fs, p = filesystem(path)
    if not fs.exists(p):
        raise FileNotFoundError(path)
    fs.rm_file(p)


def rmtree(path: str) -> None:
    """Delete a folder and everything in it; nothing if there is none."""
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    fs, p = filesystem(path)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(p, recursive=True)


def size(path: str) -> int:
    if not is_remote(path):
        return os.path.getsize(path)
    fs, p = filesystem(path)
    return int(fs.size(p))


def read_bytes(path: str, start: int | None = None, end: int | None = None) -> bytes:
    """A file's bytes, or those from ``start`` to ``end`` (in a bucket one ranged request)."""
    if is_remote(path):
        fs, p = filesystem(path)
        return fs.cat_file(p, start=start, end=end)
    with open(path, "rb") as f:
        f.seek(start or 0)
        return f.read() if end is None else f.read(end - (start or 0))


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write(path: str, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` whole: a reader (or a crash) sees the old file or the new one, never
    half. Locally a temporary file renamed into place; in a bucket one upload, which is atomic."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if is_remote(path):
        fs, p = filesystem(path)
        fs.pipe_file(p, raw)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with builtins.open(tmp, "wb") as f:
        f.write(raw)
    os.replace(tmp, path)


def create(path: str, data: bytes) -> bool:
    """Create ``path`` holding ``data`` if no file is there (atomic: of two processes, one wins); False if
    one is. Locally ``O_CREAT | O_EXCL`` (NFS and gcsfuse honour it too), in GCS a create-if-absent
    precondition. An OSError (a folder that cannot be written) is raised."""
    if is_remote(path):
        fs, p = filesystem(path)
        try:
            fs.pipe_file(p, data, mode="create")
        except FileExistsError:
            return False
        except OSError:
            raise
        except Exception as e:  # a bucket's refusal (no bucket, no permission) in the OSError callers catch
            raise OSError(reason(e)) from None
        return True
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return True


def read_stamped(path: str) -> tuple[bytes, float]:
    """A file's content and modification time (FileNotFoundError if there is none). Locally ``fstat`` of
    the open file, not ``stat`` of the path: opening revalidates NFS's attribute cache (close-to-open), so
    another host's fresh write is seen."""
    if not is_remote(path):
        with builtins.open(path, "rb") as f:
            return f.read(), os.fstat(f.fileno()).st_mtime
    fs, p = filesystem(path)
    return fs.cat_file(p), modified(path)


def modified(path: str) -> float:
    """A file's modification time in seconds since the epoch, on its file system's clock."""
    if not is_remote(path):
        return os.stat(path).st_mtime
    fs, p = filesystem(path)
    return fs.modified(p).timestamp()


def touch(path: str) -> None:
    """Set a file's modification time to now (FileNotFoundError if it is gone). A bucket object's time is
    set only by writing it: its content is written back (a small file: the run lock)."""
    if not is_remote(path):
        os.utime(path)
        return
    fs, p = filesystem(path)
    fs.pipe_file(p, fs.cat_file(p))


def rename(src: str, dst: str) -> None:
    """Move a file or folder. Locally atomic (``os.replace``); in a bucket a copy then a delete."""
    if not is_remote(src):
        os.replace(src, dst)
        return
    fs, p = filesystem(src)
    fs.copy(p, filesystem(dst)[1], recursive=True)  # server-side copies (gcsfs's mv tries an API
    fs.rm(p, recursive=True)  # that emulators lack, logging a traceback before it falls back to this)


def upload(local: str, path: str) -> None:
    """Copy a local folder's files (recursively) or a file to ``path`` (local or in a bucket)."""
    if not is_remote(path):
        if os.path.isdir(local):
            shutil.copytree(local, path, dirs_exist_ok=True)
        else:
            shutil.copyfile(local, path)
        return
    fs, p = filesystem(path)
    if os.path.isdir(local):
        fs.put(local.rstrip("/") + "/", p, recursive=True)
    else:
        fs.put_file(local, p)


def download(path: str, local: str) -> None:
    """Copy one file to the local path ``local``, streamed (a bucket's object is not held in memory)."""
    if not is_remote(path):
        shutil.copyfile(path, local)
        return
    fs, p = filesystem(path)
    fs.get_file(p, local)


@contextlib.contextmanager
def staged(path: str) -> Iterator[str]:
    """A local folder to write into that ends up at ``path``: ``path`` itself when it is local, else a
    temporary folder uploaded on success (for writers that only speak local files: tokenizers, HF
    checkpoints)."""
    if not is_remote(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="distillm_stage_") as tmp:
        yield tmp
        upload(tmp, path)


def fs_now(folder: str) -> float:
    """The file system's "now", as a write there would stamp it: the modification time of a probe file
    created in ``folder`` (the server's clock on NFS and in a bucket, so hosts whose clocks are off agree);
    ``time.time()`` if the probe cannot be written."""
    probe = join(folder, f".now.{uuid.uuid4().hex}")
    try:
        if not create(probe, b""):
            return time.time()
        try:
            if not is_remote(probe):
                os.utime(probe)
            return modified(probe)
        finally:
            remove(probe)
    except OSError:
        return time.time()


def check_writable(path: str, what: str) -> None:
    """Write and delete a probe file in ``path`` (created if local), or say in one line why not: a bucket
    that does not exist, no permission, no credentials, an unreachable endpoint."""
    probe = join(path, f".write_test.{uuid.uuid4().hex}")  # unique: every host probes
    try:
        makedirs(path)
        write(probe, b"ok")
        remove(probe)
    except ConfigError:
        raise
    except Exception as e:  # fsspec backends raise their own types for a refused request
        why = reason(e)
        if is_remote(path) and why != "permission denied" and not _bucket_exists(path):
            why = "no such bucket, or no access to it"
        raise ConfigError(f"cannot write {what} {path} ({why}); choose another {what}") from None


@contextlib.contextmanager
def refused(what: str, error: type[Exception] = ConfigError) -> Iterator[None]:
    """A bucket's refusal inside (no bucket, no permission, no credentials: each client raises its own
    type) as one ``error`` line, ``what (why)``; a ConfigError (an unreachable endpoint) passes as it is."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as e:
        raise error(f"{what} ({reason(e)})") from None


def endpoint(path: str) -> str:
    """The URL that requests for a bucket URL go to: an emulator's or a compatible store's when the
    environment names one, else the cloud's."""
    if str(path).startswith("gs://"):
        return os.environ.get("STORAGE_EMULATOR_HOST") or "https://storage.googleapis.com"
    return (
        os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or "https://s3.amazonaws.com"
    )


_REACHED: set[str] = set()  # the endpoints this process has connected to once


def _reachable(path: str) -> None:
    """One connection to the storage endpoint, 10 s at most, the first time this process uses it: an
    unreachable one is one line at once, not the client's minutes of retries (which a run keeps later, for
    a network that blinks mid-run)."""
    url = endpoint(path)
    proxied = any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"))
    if url in _REACHED or proxied:  # behind a proxy a direct connection proves nothing: the client decides
        return
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=10).close()
    except OSError as e:
        raise ConfigError(
            f"{path}: the storage endpoint {url} cannot be reached ({e.strerror or type(e).__name__}); "
            "check the network (or STORAGE_EMULATOR_HOST / AWS_ENDPOINT_URL)"
        ) from None
    _REACHED.add(url)


def _bucket_exists(path: str) -> bool:
    """Whether the bucket of ``path`` answers (False also when the request itself fails)."""
    try:
        fs, p = filesystem(path)
        return bool(fs.exists(p.split("/", 1)[0]))
    except Exception:
        return False


def reason(e: BaseException) -> str:
    """A storage error in a few words: an OSError's strerror, a bucket's refusal, or the error's type."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    low = text.lower()
    if "bucket" in low and ("not found" in low or "does not exist" in low or "404" in low):
        return "no such bucket"
    if isinstance(e, PermissionError) or "403" in low or "forbidden" in low or "permission" in low:
        return "permission denied"
    if isinstance(e, FileNotFoundError):
        return "no such bucket or folder"
    return text[:160]


configure_emulator()  # at import, before orbax or gcsfs first reach a bucket (they read the environment)
