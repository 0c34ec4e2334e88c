"""A stand-in for the Hugging Face hub's HTTP API, served over a local folder.

Code that takes hub ids (``snapshot_download``, ``hf_hub_download``, ``HfFileSystem``, transformers'
``from_pretrained``, ``datasets.load_dataset``) can then be tested unmodified and without a network: the
test points ``HF_ENDPOINT`` at the stub (see ``hub_env``) and the clients' real code paths run, their error
handling included. The folder holds one directory per (repo, revision)::

    <root>/models/<org>/<name>/<revision>/<files...>     revision: main, refs/pr/1, refs/convert/parquet...
    <root>/datasets/<org>/<name>/<revision>/<files...>

Only what the clients read is imitated: repo info, tree listings, paths-info and ``/resolve`` (HEAD, GET,
Range), with the hub's status codes, ``X-Error-Code`` headers, commit shas and ETags. Files are served in
place (no CDN redirect, no Xet headers), so downloads are plain HTTP.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

# What the hub's default .gitattributes stores in LFS: ETag is the sha256 and the tree has an `lfs` entry.
# Other files are plain git blobs, whose ETag is the git blob sha1.
_LFS_SUFFIXES = {".bin", ".safetensors", ".parquet", ".arrow", ".pt", ".pth", ".ckpt", ".h5", ".msgpack",
                 ".npy", ".npz", ".onnx", ".pkl", ".gz", ".zip", ".zst", ".tar", ".model"}  # fmt: skip
_DATE = "2024-01-01T00:00:00.000Z"
_ROUTES = {("GET", "revision"), ("GET", "tree"), ("POST", "paths-info"), ("GET", "resolve"),
           ("HEAD", "resolve")}  # fmt: skip
_Reply = tuple[int, dict, bytes]


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _true(values: list[str] | None) -> bool:
    return bool(values) and values[0].lower() in ("1", "true")


def _file_meta(path: Path) -> dict:
    """What the hub knows of a file: git blob id, size and, for LFS files, sha256 and pointer size."""
    data = path.read_bytes()
    meta = {"data": data, "size": len(data), "oid": _sha1(b"blob %d\0" % len(data) + data), "lfs": None}
    if path.suffix in _LFS_SUFFIXES or len(data) > 10 * 2**20:
        sha256 = hashlib.sha256(data).hexdigest()
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n"
        meta["oid"] = _sha1(b"blob %d\0%s" % (len(pointer), pointer.encode()))
        meta["lfs"] = {"oid": sha256, "size": len(data), "pointerSize": len(pointer)}
    return meta


def _take_revision(segments: list[str]) -> tuple[str, list[str]]:
    """Split the revision off a path: one encoded segment (``refs%2Fpr%2F1``) or an unencoded
    ``refs/<kind>/<name>`` (huggingface_hub leaves special refs unencoded in some URLs; the hub takes both).
    """
    if not segments:
        return "main", []
    if unquote(segments[0]) == "refs" and len(segments) >= 3:
        return "/".join(unquote(s) for s in segments[:3]), segments[3:]
    return unquote(segments[0]), segments[1:]


def _reply(status: int, data, headers: dict | None = None) -> _Reply:
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(data).encode()


def _error(status: int, code: str | None, message: str, headers: dict | None = None) -> _Reply:
    """The hub's error shape: X-Error-Code (huggingface_hub maps it to its exceptions), the message in
    X-Error-Message and in a JSON body."""
    headers = {"X-Error-Message": message, **(headers or {})}
    if code:
        headers["X-Error-Code"] = code
    return _reply(status, {"error": message}, headers)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the hub; every reply carries a Content-Length
    stub: HubStub

    def log_message(self, *args) -> None:  # the tests' stderr stays clean
        pass

    def do_GET(self) -> None:
        method, url = self.command, urlsplit(self.path)
        self.stub.requests.append(f"{method} {unquote(url.path)}")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            status, headers, payload = self.stub._route(
                method, url.path, parse_qs(url.query), body, self.headers
            )
        except Exception:  # a stub bug: kept for the test to assert on, and named in the client's error
            self.stub.errors.append(traceback.format_exc())
            status, headers, payload = 500, {"X-Error-Message": "hub stub error, see HubStub.errors"}, b""
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(payload))}.items():
            self.send_header(key, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(payload)

    do_HEAD = do_POST = do_GET


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # a client hanging up: not the stub's business
        pass


class HubStub:
    """The hub API over ``root``, on a thread at ``url`` (127.0.0.1, a free port); a context manager.

    ``requests`` lists every request served as ``"METHOD /decoded/path"`` (no query string); ``errors`` the
    tracebacks of requests the stub itself failed on (answered 500): tests should assert it stays empty."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.url = ""
        self.requests: list[str] = []
        self.errors: list[str] = []

    def __enter__(self) -> HubStub:
        self._server = _Server(("127.0.0.1", 0), type("Handler", (_Handler,), {"stub": self}))
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def commit_sha(self, kind: str, repo_id: str, revision: str) -> str:
        """The stable fake commit sha of a revision (``kind``: "models" or "datasets")."""
        return _sha1(f"{kind}/{repo_id}@{revision}".encode())

    def _route(self, method: str, path: str, query: dict, body: bytes, req_headers) -> _Reply:
        parts = path.strip("/").split("/")
        if parts[0] == "api" and len(parts) >= 4 and parts[1] in ("models", "datasets"):
            kind, repo_id, action, rest = parts[1], parts[2:4], (parts[4:5] or ["revision"])[0], parts[5:]
        elif len(parts) >= 5 and parts[0] == "datasets" and parts[3] == "resolve":
            kind, repo_id, action, rest = "datasets", parts[1:3], "resolve", parts[4:]
        elif len(parts) >= 4 and parts[2] == "resolve":
            kind, repo_id, action, rest = "models", parts[0:2], "resolve", parts[3:]
        else:
            kind, repo_id, action, rest = "", [], "", []
        if (method, action) not in _ROUTES or ".." in unquote(path).split("/"):  # serve nothing outside root
            return _error(404, None, "Sorry, we can't find the page you are looking for.")
        repo_id = unquote("/".join(repo_id))
        repo_dir = self.root / kind / repo_id
        if not repo_dir.is_dir():  # anonymous requests for missing (or private) repos get 401, others 404
            if req_headers.get("Authorization"):
                return _error(404, "RepoNotFound", "Repository not found")
            return _error(401, "RepoNotFound", "Invalid username or password.")
        revs = {p.name: p for p in repo_dir.iterdir() if p.is_dir() and p.name != "refs"}
        revs |= {p.relative_to(repo_dir).as_posix(): p for p in repo_dir.glob("refs/*/*") if p.is_dir()}
        revision, rest = _take_revision(rest)
        revision = {self.commit_sha(kind, repo_id, r): r for r in revs}.get(revision, revision)
        if revision not in revs:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        rev_dir, sha = revs[revision], self.commit_sha(kind, repo_id, revision)
        in_repo = unquote("/".join(rest)).strip("/")

        if action == "revision":
            return _reply(200, self._info(kind, repo_id, rev_dir, sha, query))
        if action == "paths-info":  # a form, paths=a&paths=b&expand=false; missing paths are left out
            form = parse_qs(body.decode())
            paths = [p.strip("/") for p in form.get("paths", []) if ".." not in p.split("/")]
            paths = [p for p in paths if (rev_dir / p).exists()]
            return _reply(200, [self._entry(rev_dir, p, sha, _true(form.get("expand"))) for p in paths])
        if action == "tree":
            base, expand = rev_dir / in_repo, _true(query.get("expand"))
            if not base.is_dir():
                return _error(404, "EntryNotFound", f"{in_repo} does not exist on '{revision}'")
            items = sorted(base.rglob("*") if _true(query.get("recursive")) else base.iterdir())
            entries = [self._entry(rev_dir, p.relative_to(rev_dir).as_posix(), sha, expand) for p in items]
            # Pages as the hub's (1000 entries, 50 with expand); the next one's URL in a Link header.
            size, start = (50 if expand else 1000), int(query.get("cursor", ["0"])[0])
            headers = {}
            if start + size < len(entries):
                next_query = urlencode({**{k: v[0] for k, v in query.items()}, "cursor": start + size})
                headers["Link"] = f'<{self.url}{path}?{next_query}>; rel="next"'
            return _reply(200, entries[start : start + size], headers)
        return self._resolve(rev_dir / in_repo, sha, req_headers.get("Range"))

    def _entry(self, rev_dir: Path, rel: str, sha: str, expand: bool) -> dict:
        """One /tree or /paths-info entry, as the hub lists it."""
        if (rev_dir / rel).is_dir():
            entry = {"type": "directory", "oid": _sha1(f"tree {rel}".encode()), "size": 0, "path": rel}
        else:
            meta = _file_meta(rev_dir / rel)
            entry = {"type": "file", "oid": meta["oid"], "size": meta["size"], "path": rel}
            entry |= {"lfs": meta["lfs"]} if meta["lfs"] else {}
        if expand:
            entry["lastCommit"] = {"id": sha, "title": "Upload folder", "date": _DATE}
        return entry

    def _info(self, kind: str, repo_id: str, rev_dir: Path, sha: str, query: dict) -> dict:
        """model_info / dataset_info. ``blobs`` adds sizes and LFS info to the siblings; ``expand`` keeps
        only the requested properties, as on the hub."""
        files = [p.relative_to(rev_dir).as_posix() for p in sorted(rev_dir.rglob("*")) if p.is_file()]
        siblings = [{"rfilename": f} for f in files]
        for sibling in siblings if _true(query.get("blobs")) else []:
            meta = _file_meta(rev_dir / sibling["rfilename"])
            sibling.update(size=meta["size"], blobId=meta["oid"])
            if lfs := meta["lfs"]:
                sibling["lfs"] = {"sha256": lfs["oid"], **{k: lfs[k] for k in ("size", "pointerSize")}}
        info = {"_id": sha[:24], "id": repo_id, "author": repo_id.split("/")[0], "sha": sha, "private": False,
                "disabled": False, "gated": False, "lastModified": _DATE, "createdAt": _DATE, "downloads": 0,
                "likes": 0, "tags": [], "siblings": siblings, "usedStorage": 0}  # fmt: skip
        if kind == "models":
            info["modelId"] = repo_id
        readme = rev_dir / "README.md"
        if readme.is_file() and (card := re.match(r"---\n(.*?)\n---", readme.read_text(), re.S)):
            import yaml  # the hub serves the README's YAML header as cardData

            info["cardData"] = yaml.safe_load(card.group(1)) or {}
        if expand := query.get("expand"):
            info = {k: v for k, v in info.items() if k in ("_id", "id", *expand)}
        return info

    def _resolve(self, path: Path, sha: str, range_header: str | None) -> _Reply:
        """A file download. ETag is the git blob sha1, or for LFS files the sha256 (with X-Linked-Etag and
        X-Linked-Size, which the hub puts on its redirect to the CDN); ranges as in RFC 9110."""
        if not path.is_file():
            return _error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": sha})
        meta = _file_meta(path)
        data, size, etag = meta["data"], meta["size"], f'"{(meta["lfs"] or meta)["oid"]}"'
        headers = {"X-Repo-Commit": sha, "ETag": etag, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}  # fmt: skip
        if meta["lfs"]:
            headers |= {"X-Linked-Etag": etag, "X-Linked-Size": str(size)}
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", (range_header or "").strip())
        if not match or match.groups() == ("", ""):
            return 200, headers, data
        first, last = match.groups()
        start = int(first) if first else max(size - int(last), 0)
        end = min(int(last), size - 1) if first and last else size - 1
        if start >= size:
            return 416, {**headers, "Content-Range": f"bytes */{size}"}, b""
        return 206, {**headers, "Content-Range": f"bytes {start}-{end}/{size}"}, data[start : end + 1]


def hub_env(stub: HubStub, home: str | Path) -> dict[str, str]:
    """Environment for a subprocess that talks to ``stub`` as to the hub, with a fresh cache in ``home``.

    huggingface_hub and datasets read it at import time, hence a subprocess. The caller merges it into
    ``os.environ``, which may hold cache paths or offline switches: those are overridden here ("0" reads as
    false). Xet is off, and the stub's address bypasses any proxy."""
    home = Path(home)
    return {
        "HF_ENDPOINT": stub.url,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_DATASETS_CACHE": str(home / "datasets"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_OFFLINE": "0",
        "HF_DATASETS_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
