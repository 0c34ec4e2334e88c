"""Data sources (``data/sources.py``): the hub form of ``load_dataset``'s arguments, sliced splits, local
CSV / JSONL files with one-line errors, and — through the hub stand-in, as ``datasets`` really raises
them — the errors for a script-only or vanished dataset naming the form that loads today."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import hub_assets
import pytest
from hub_stub import HubStub, hub_env

from distillm_jax.data import sources, tasks

ROOT = Path(__file__).resolve().parents[1]


def test_hub_form_is_load_dataset_arguments():
    assert sources.parse_hub("knkarthick/samsum").kwargs() == {"path": "knkarthick/samsum"}
    got = sources.parse_hub("IWSLT/iwslt2017:iwslt2017-en-de@refs/convert/parquet?data_dir=iwslt2017-en-de")
    assert got.kwargs() == {
        "path": "IWSLT/iwslt2017",
        "name": "iwslt2017-en-de",
        "revision": "refs/convert/parquet",
        "data_dir": "iwslt2017-en-de",
    }
    files = sources.parse_hub("MiniLLM/dolly?data_files=train:raw.jsonl,test:valid.jsonl").data_files
    assert files == {"train": "raw.jsonl", "test": "valid.jsonl"}
    assert sources.parse_hub("o/n?data_files=plain/*.parquet").data_files == "plain/*.parquet"
    with pytest.raises(ValueError, match=r"unknown option.*streaming"):
        sources.parse_hub("o/n?streaming=1")
    for local in ("./x", "/x", "~/x", "rows.jsonl", "data/rows.csv"):
        assert sources.is_local(local)
    assert not sources.is_local("MiniLLM/dolly?data_files=train:raw.jsonl")


def test_split_slices():
    assert sources.parse_split("train") == ("train", None, False)
    assert sources.parse_split("train[1000:]") == ("train", slice(1000, None), False)
    assert sources.parse_split("validation[:10%]") == ("validation", slice(None, 10), True)
    with pytest.raises(ValueError, match="not a name or a slice"):
        sources.parse_split("train[a:b]")


def test_local_csv_jsonl_slices_and_errors(tmp_path):
    (tmp_path / "train.csv").write_text('id,dialogue,summary\n1,"A: hi\nB: yo",greet\n2,A: bye,\n3,A: x,y\n')
    rows = sources.read(str(tmp_path), "train")
    assert [r["summary"] for r in rows] == ["greet", None, "y"]  # an empty cell is None, as on the hub
    assert sources.read(str(tmp_path), "train[1:]") == rows[1:]
    assert sources.read(str(tmp_path), "train[:34%]") == rows[:1]
    pairs = tasks.to_pairs(tasks.get("samsum"), rows, encoder_decoder=True)
    assert pairs[1] == ("summarize: A: bye", "")  # skipped (and counted) as an empty response later
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n\n{"a": 2\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 3: not JSON"):
        sources.read(str(bad), "train")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"a": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin.jsonl is not UTF-8 text"):
        sources.read(str(latin), "train")
    with pytest.raises(ValueError, match=r"unknown format .txt"):
        sources.read_file(str(tmp_path / "x.txt"))


def test_a_pattern_is_one_split_of_its_files(tmp_path):
    """``data/*.jsonl``: the files' rows in the order of their names, one split (sliced like one file),
    and a pattern that matches nothing is one line."""
    for k in (1, 0):
        (tmp_path / f"part-{k}.jsonl").write_text(
            "".join(json.dumps({"i": 2 * k + j}) + "\n" for j in (0, 1))
        )
    pattern = str(tmp_path / "part-*.jsonl")
    assert [r["i"] for r in sources.read(pattern, "train[1:]")] == [1, 2, 3]
    with pytest.raises(FileNotFoundError, match="no data file matches"):
        sources.read(str(tmp_path / "none-*.jsonl"), "train")
    from configs.demo import get_config
    from distillm_jax.config import ConfigError, checks

    c = get_config("tiny")
    c.data.source, c.data.train_split, c.data.valid_split, c.data.test_split = pattern, "train", "train", ""
    with pytest.raises(ConfigError, match="is one file"):
        checks.check(c)
    c.data.source = str(tmp_path / "none-*.jsonl")
    with pytest.raises(ConfigError, match="does not exist"):
        checks.check(c)


def test_translation_pairs_and_their_hub_configs():
    task = tasks.get("iwslt2017", "de-en")
    row = {"translation": {"en": "Hello.", "de": "Hallo."}}
    assert task.to_pair(row, True) == ("translate German to English: Hallo.", "Hello.")
    assert task.hub_id.endswith("data_dir=iwslt2017-en-de")
    assert tasks.get("iwslt2017", "en-fr").hub_id.endswith("data_dir=iwslt2017-en-fr")
    with pytest.raises(ValueError, match="IWSLT 2017 pairs English"):
        tasks.get("iwslt2017", "de-fr")


def test_hub_datasets_as_users_meet_them(tmp_path):
    """Through the hub's HTTP API (a stand-in on 127.0.0.1) and the real ``datasets``: the configs'
    default sources load, a script-only dataset and a deleted one are one line that names the form that
    loads today, and OpenWebText is streamed (only the rows asked for)."""
    root = tmp_path / "hub"
    hub_assets.build_datasets(root)
    script = textwrap.dedent(
        """
        import json
        from distillm_jax.data import sources, tasks
        out = {}
        def attempt(name, fn):
            try:
                out[name] = fn()
            except ValueError as e:
                out[name] = "error: " + str(e)
        # first: once the parquet export is cached, datasets answers the script form from that cache
        attempt("script", lambda: sources.read("IWSLT/iwslt2017:iwslt2017-en-de", "train"))
        attempt("samsum", lambda: tasks.load_rows(tasks.get("samsum"), "", "train[:3]"))
        attempt("iwslt", lambda: len(tasks.load_rows(tasks.get("iwslt2017"), "", "validation")))
        attempt("dolly_test", lambda: len(tasks.load_rows(tasks.get("dolly"), "", "test")))
        attempt("dolly_dev", lambda: len(tasks.load_rows(tasks.get("dolly"), "", "train[:8]")))
        attempt("owt", lambda: len(tasks.load_rows(tasks.get("openwebtext"), "", "train", max_rows=5)))
        attempt("gone", lambda: sources.read("Samsung/samsum", "train"))
        attempt("split", lambda: sources.read("knkarthick/samsum", "dev"))
        print(json.dumps(out, default=str))
        """
    )
    with HubStub(root) as stub:
        env = {**os.environ, **hub_env(stub, tmp_path / "hf")}
        proc = subprocess.run(
            [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert not stub.errors
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["summary"] for r in out["samsum"]][:1] and len(out["samsum"]) == 3
    assert out["iwslt"] == 8 and out["dolly_test"] == 4 and out["dolly_dev"] == 8 and out["owt"] == 5
    assert out["script"].startswith("error: dataset IWSLT/iwslt2017 is a loading script")
    assert "data.source='IWSLT/iwslt2017@refs/convert/parquet?data_dir=iwslt2017-en-de'" in out["script"]
    assert out["gone"].startswith("error: dataset Samsung/samsum not found on the hub")
    assert out["gone"].endswith("it moved: data.source='knkarthick/samsum'")
    assert out["split"].startswith("error: cannot load dataset knkarthick/samsum") and "dev" in out["split"]
    assert all("\n" not in v for v in out.values() if isinstance(v, str))
