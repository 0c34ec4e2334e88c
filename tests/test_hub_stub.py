"""The hub stub stands in for the Hugging Face hub well enough that the unmodified clients work against it.

Tests of code that takes hub ids rely on that, so each client path they use is exercised here, in a
subprocess as a user would run it (huggingface_hub and datasets read ``HF_ENDPOINT`` at import time):
snapshots of a branch and of a PR ref, transformers' config loading, the hub's "not found" errors, and
``load_dataset`` on CSV repos, on parquet-export branches (streamed or not) and on script-only repos.
"""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from hub_stub import HubStub, hub_env

_GPT2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 64, "n_positions": 32,
         "n_embd": 16, "n_layer": 2, "n_head": 2, "bos_token_id": 0, "eos_token_id": 0}  # fmt: skip
_CSV = 'id,dialogue,summary\n{s}1,"A: hi\nB: hello",greeting\n{s}2,A: bye,\n{s}3,A: ok,agreement\n'


def _build(root: Path) -> None:
    """The hub's layout for the repos the tests use, shaped like the real ones."""

    def put(rel: str, data: bytes | str) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)

    def parquet(rel: str, columns: dict) -> None:
        try:  # comes with datasets, an optional extra; without it only the model tests run
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            return
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(columns), root / rel)

    model = "models/org/tiny-model"
    put(f"{model}/main/config.json", json.dumps(_GPT2))
    put(f"{model}/main/pytorch_model.bin", b"\x80\x02fake torch pickle")
    put(f"{model}/refs/pr/1/config.json", json.dumps({**_GPT2, "n_layer": 1}))
    put(f"{model}/refs/pr/1/model.safetensors", b"fake safetensors" * 64)
    put(f"{model}/refs/pr/1/README.md", "# Converted to safetensors\n")  # left out by allow_patterns
    for split in ("train", "validation", "test"):
        put(f"datasets/knkarthick/samsum/main/{split}.csv", _CSV.format(s=split))
        parquet(
            f"datasets/IWSLT/iwslt2017/refs/convert/parquet/iwslt2017-en-de/{split}/0000.parquet",
            {"translation": [{"en": f"{split} hello", "de": f"{split} hallo"}, {"en": "cat", "de": "Katze"}]},
        )
    put("datasets/IWSLT/iwslt2017/main/iwslt2017.py", "import datasets\n")
    put("datasets/IWSLT/iwslt2017/main/README.md", "---\npretty_name: IWSLT 2017\nlanguage: [en, de]\n---\n")
    put("datasets/Skylion007/openwebtext/main/openwebtext.py", "import datasets\n")
    for shard in range(2):
        parquet(
            f"datasets/Skylion007/openwebtext/refs/convert/parquet/plain_text/train/{shard:04d}.parquet",
            {"text": [f"document {shard}-{i}" for i in range(3)]},
        )


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    _build(root)
    with HubStub(root) as stub:
        yield stub


def _run(stub: HubStub, home: Path, script: str) -> dict:
    """Run ``script`` against the stub in a fresh process and cache; it prints a JSON dict last."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env={**os.environ, **hub_env(stub, home)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert not stub.errors, stub.errors
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


def test_models(hub, tmp_path):
    out = _run(
        hub,
        tmp_path,
        """
        import hashlib, json, os
        import huggingface_hub as hh
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
        from transformers import AutoConfig

        def digests(folder):
            return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest()
                    for f in sorted(os.listdir(folder))}

        def error(call):
            try:
                call()
            except Exception as e:
                kinds = (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError)
                return [k.__name__ for k in kinds if isinstance(e, k)]

        pr = hh.snapshot_download(
            "org/tiny-model", revision="refs/pr/1", allow_patterns=["*.json", "*.safetensors"]
        )
        info = hh.model_info("org/tiny-model", revision="refs/pr/1", files_metadata=True)
        with hh.HfFileSystem().open("org/tiny-model@refs/pr/1/model.safetensors", "rb") as f:
            f.seek(1000)
            ranged = f.read(24).decode()
        print(json.dumps({
            "pr": digests(pr),
            "main": digests(hh.snapshot_download("org/tiny-model", revision="main")),
            "n_layer": AutoConfig.from_pretrained("org/tiny-model", revision="refs/pr/1").n_layer,
            "sha": info.sha,
            "siblings": {s.rfilename: [s.size, s.lfs is not None] for s in info.siblings},
            "ranged": ranged,
            "no_repo": error(lambda: hh.snapshot_download("org/missing")),
            "no_revision": error(lambda: hh.snapshot_download("org/tiny-model", revision="refs/pr/2")),
            "no_file": error(lambda: hh.hf_hub_download("org/tiny-model", "tokenizer.json")),
        }))
        """,
    )
    files = hub.root / "models/org/tiny-model"
    assert out["pr"] == {k: v for k, v in _digests(files / "refs/pr/1").items() if k != "README.md"}
    assert set(out["pr"]) == {"config.json", "model.safetensors"}
    assert out["main"] == _digests(files / "main")
    assert set(out["main"]) == {"config.json", "pytorch_model.bin"}
    assert out["n_layer"] == 1
    assert out["sha"] == hub.commit_sha("models", "org/tiny-model", "refs/pr/1")
    assert out["siblings"] == {  # sizes, and LFS info for the weights only
        "README.md": [27, False],
        "config.json": [len(json.dumps({**_GPT2, "n_layer": 1})), False],
        "model.safetensors": [16 * 64, True],
    }
    assert out["ranged"] == (b"fake safetensors" * 64)[1000:1024].decode()
    assert out["no_repo"] == ["RepositoryNotFoundError"]
    assert out["no_revision"] == ["RevisionNotFoundError"]
    assert out["no_file"] == ["EntryNotFoundError"]
    # The snapshot went through the hub's API (info, tree, then files pinned to the commit), without Xet.
    sha = out["sha"]
    assert "GET /api/models/org/tiny-model/revision/refs/pr/1" in hub.requests
    assert f"GET /org/tiny-model/resolve/{sha}/model.safetensors" in hub.requests
    assert f"HEAD /org/tiny-model/resolve/{sha}/README.md" not in hub.requests
    assert not any("xet" in r.lower() for r in hub.requests)


def test_datasets(hub, tmp_path):
    pytest.importorskip("datasets")
    out = _run(
        hub,
        tmp_path,
        """
        import json
        from datasets import load_dataset
        from datasets.exceptions import DatasetNotFoundError

        out = {}
        try:  # first: a later parquet load of the same repo would be picked from the cache instead
            load_dataset("IWSLT/iwslt2017", "iwslt2017-en-de", split="train")
        except RuntimeError as e:
            out["script"] = str(e)
        out["samsum"] = load_dataset("knkarthick/samsum", split="train").to_list()
        out["samsum_head"] = load_dataset("knkarthick/samsum", split="train[:2]").to_list()
        out["iwslt"] = load_dataset(
            "IWSLT/iwslt2017", revision="refs/convert/parquet", data_dir="iwslt2017-en-de", split="validation"
        ).to_list()
        owt = dict(path="Skylion007/openwebtext", revision="refs/convert/parquet",
                   data_files="plain_text/train/*.parquet", split="train")
        out["owt_stream"] = [row["text"] for row in load_dataset(**owt, streaming=True)]
        out["owt"] = [row["text"] for row in load_dataset(**owt).to_list()]
        try:
            load_dataset("org/no-such-dataset")
        except DatasetNotFoundError as e:
            out["missing"] = str(e)
        print(json.dumps(out))
        """,
    )
    assert out["script"].startswith("Dataset scripts are no longer supported, but found iwslt2017.py")
    assert out["samsum"] == [
        {"id": "train1", "dialogue": "A: hi\nB: hello", "summary": "greeting"},
        {"id": "train2", "dialogue": "A: bye", "summary": None},
        {"id": "train3", "dialogue": "A: ok", "summary": "agreement"},
    ]
    assert out["samsum_head"] == out["samsum"][:2]
    assert out["iwslt"] == [
        {"translation": {"en": "validation hello", "de": "validation hallo"}},
        {"translation": {"en": "cat", "de": "Katze"}},
    ]
    texts = [f"document {shard}-{i}" for shard in range(2) for i in range(3)]
    assert out["owt_stream"] == texts
    assert out["owt"] == texts
    assert "org/no-such-dataset" in out["missing"]


def test_http_details(hub):
    """What the clients above only touch on some paths: both revision spellings, ranges, the error headers."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def fetch(path: str, method: str = "GET", **headers) -> tuple[int, dict, bytes]:
        request = urllib.request.Request(hub.url + path, method=method, headers=headers)
        try:
            with opener.open(request, timeout=10) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    sha = hub.commit_sha("models", "org/tiny-model", "refs/pr/1")
    data = (hub.root / "models/org/tiny-model/refs/pr/1/model.safetensors").read_bytes()
    for rev in ("refs%2Fpr%2F1", "refs/pr/1", sha):
        status, headers, body = fetch(f"/org/tiny-model/resolve/{rev}/model.safetensors", "HEAD")
        assert (status, headers["X-Repo-Commit"], body) == (200, sha, b"")
        assert headers["ETag"] == headers["X-Linked-Etag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    status, headers, body = fetch("/org/tiny-model/resolve/refs%2Fpr%2F1/model.safetensors", Range="bytes=-5")
    n = len(data)
    assert (status, headers["Content-Range"], body) == (206, f"bytes {n - 5}-{n - 1}/{n}", data[-5:])
    assert fetch("/org/tiny-model/resolve/refs%2Fpr%2F1/model.safetensors", Range=f"bytes={n}-")[0] == 416
    assert fetch("/api/models/org/missing/revision/main")[1]["X-Error-Code"] == "RepoNotFound"
    assert fetch("/api/models/org/tiny-model/revision/v9")[1]["X-Error-Code"] == "RevisionNotFound"
    status, headers, _ = fetch("/org/tiny-model/resolve/main/missing.txt", "HEAD")
    assert (status, headers["X-Error-Code"], headers["X-Repo-Commit"]) == (
        404, "EntryNotFound", hub.commit_sha("models", "org/tiny-model", "main")
    )  # fmt: skip
    assert not hub.errors
