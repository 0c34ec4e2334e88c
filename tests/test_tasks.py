"""Task formatting (docs/method.md, T5 prefixes) and loading from local files, with clear errors."""

import json

import pytest

from distillm_jax.data import tasks


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_dolly_template_with_and_without_context(tmp_path):
    rows = [
        {"instruction": "Name a color.", "context": "", "response": "Blue."},
        {"instruction": "Summarize.", "context": "Cats sleep a lot.", "response": "Cats nap."},
    ]
    task = tasks.get("dolly")
    got = tasks.to_pairs(
        task, tasks.load_rows(task, write_jsonl(tmp_path / "d.jsonl", rows), "train"), encoder_decoder=False
    )
    assert got[0] == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a color.\n\n### Response:\n",
        "Blue.",
    )
    assert got[1][0] == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nSummarize.\n\n"
        "### Input:\nCats sleep a lot.\n\n### Response:\n"
    )


def test_the_papers_other_test_sets_read_as_dolly(tmp_path):
    """MiniLLM's files of the paper's other test sets (configs/samples/<set>: their columns): each row's
    own ``prompt`` is the template we build; S-NI lists several references, which the metric takes
    all of (its best) while a model would train on the first."""
    from pathlib import Path

    from distillm_jax.data import batching, demo
    from distillm_jax.run import data as rundata

    task = tasks.get("dolly")
    samples = Path(__file__).resolve().parents[1] / "configs" / "samples"
    for name in ("self-inst", "vicuna", "sinst", "uinst"):
        rows = tasks.load_rows(task, str(samples / name), "test")
        for row, (prompt, response) in zip(
            rows, tasks.to_pairs(task, rows, encoder_decoder=False), strict=True
        ):
            assert prompt == row["prompt"]
            assert response == (row["output"][0] if isinstance(row["output"], list) else row["output"])
    rows = tasks.load_rows(task, str(samples / "sinst"), "test")
    tok, lengths = demo.tokenizer(), batching.Lengths(48, 64)
    _, refs = rundata.tokenize(task, "test", rows, tok, lengths, encoder_decoder=False)
    assert refs == [r["output"] if len(r["output"]) > 1 else r["output"][0] for r in rows]
    assert isinstance(refs[1], list) and len(refs[1]) == 3


def test_summaries_translation_and_t5_prefixes(tmp_path):
    (tmp_path / "validation.json").write_text(
        json.dumps([{"dialogue": "A: hi\nB: hey", "summary": "They greet."}])
    )
    samsum = tasks.get("samsum")
    rows = tasks.load_rows(samsum, str(tmp_path), "validation")
    assert tasks.to_pairs(samsum, rows, encoder_decoder=True) == [("summarize: A: hi\nB: hey", "They greet.")]
    iwslt = tasks.get("iwslt2017")
    nested = [{"translation": {"en": "Hello.", "de": "Hallo."}}]
    flat = [{"en": "Hello.", "de": "Hallo."}]
    for rows in (nested, flat):
        assert tasks.to_pairs(iwslt, rows, encoder_decoder=True) == [
            ("translate English to German: Hello.", "Hallo.")
        ]
    assert iwslt.metric == "bleu" and samsum.metric == "rougeL"


def test_parquet_and_demo_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"dialogue": "A: x", "summary": "y"}]), tmp_path / "train.parquet")
    assert tasks.load_rows(tasks.get("samsum"), str(tmp_path), "train") == [
        {"dialogue": "A: x", "summary": "y"}
    ]
    rows = tasks.load_rows(tasks.get("demo"), None, "test", demo_rows=5)
    assert len(rows) == 5 and tasks.to_pairs(tasks.get("demo"), rows, encoder_decoder=True)[0][0].startswith(
        "summarize: "
    )


def test_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown task 'dolly15k'; valid tasks: dolly, samsum"):
        tasks.get("dolly15k")
    with pytest.raises(FileNotFoundError, match=r"data file .*nowhere does not exist"):
        tasks.load_rows(tasks.get("samsum"), str(tmp_path / "nowhere"), "train")
    with pytest.raises(FileNotFoundError, match=r"no data file for split 'test' in .*expected test.jsonl"):
        tasks.load_rows(tasks.get("samsum"), str(tmp_path), "test")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"dialog": "x", "summary": "y"}])
    with pytest.raises(
        ValueError, match=r"lacks column\(s\) dialogue needed by task 'samsum'; it has: dialog, summary"
    ):
        tasks.load_rows(tasks.get("samsum"), bad, "train")
    with pytest.raises(ValueError, match="language-model text, not prompt/response pairs"):
        tasks.to_pairs(tasks.get("openwebtext"), [{"text": "x"}], encoder_decoder=False)
