"""The tasks of the paper as prompt/response pairs: how each dataset's rows become text (PAPER.md §4),
where they come from (a hub dataset id, or local json / jsonl / parquet files with the same columns),
and which metric judges them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence

from distillm_jax.data import demo

DOLLY_HEAD = "Below is an instruction that describes a task"
DOLLY_CONTEXT = ", paired with an input that provides further context"
DOLLY_TAIL = ". Write a response that appropriately completes the request.\n\n"


def _dolly(row: dict, encoder_decoder: bool) -> tuple[str, str]:
    context = (row.get("context") or "").strip()
    prompt = DOLLY_HEAD + (DOLLY_CONTEXT if context else "") + DOLLY_TAIL
    prompt += f"### Instruction:\n{row['instruction']}\n\n"
    if context:
        prompt += f"### Input:\n{context}\n\n"
    return prompt + "### Response:\n", row["response"]


def _summary(source: str, target: str) -> Callable[[dict, bool], tuple[str, str]]:
    def pair(row: dict, encoder_decoder: bool) -> tuple[str, str]:
        if encoder_decoder:
            return f"summarize: {row[source]}", row[target]
        return f"Summarize the dialogue:\n{row[source]}\nSummary:", row[target]

    return pair


def _iwslt(row: dict, encoder_decoder: bool) -> tuple[str, str]:
    pair = row.get("translation", row)
    if encoder_decoder:
        return f"translate English to German: {pair['en']}", pair["de"]
    return f"Translate English to German:\n{pair['en']}\nGerman:", pair["de"]


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    columns: tuple[tuple[str, ...], ...]  # each inner tuple: alternatives, one of which must be present
    metric: str  # "rougeL", "bleu", or "" for language-model data
    hub_id: str | None
    to_pair: Callable[[dict, bool], tuple[str, str]] | None


TASKS: dict[str, Task] = {
    "dolly": Task(
        "dolly", (("instruction",), ("response",)), "rougeL", "databricks/databricks-dolly-15k", _dolly
    ),
    "samsum": Task(
        "samsum", (("dialogue",), ("summary",)), "rougeL", "Samsung/samsum", _summary("dialogue", "summary")
    ),
    "iwslt2017": Task(
        "iwslt2017", (("translation", "en"),), "bleu", "IWSLT/iwslt2017:iwslt2017-en-de", _iwslt
    ),
    "openwebtext": Task("openwebtext", (("text",),), "", "Skylion007/openwebtext", None),
    "demo": Task("demo", (("dialogue",), ("summary",)), "rougeL", None, _summary("dialogue", "summary")),
}


def get(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]


def load_rows(task: Task, source: str | None, split: str, *, demo_rows: int = 2000) -> list[dict]:
    """Rows of ``split`` from local files (a .json / .jsonl / .parquet file, or a directory holding
    ``<split>.<ext>``), a hub dataset id (``org/name`` or ``org/name:config``), or — for ``demo`` —
    the shipped generator."""
    if task.name == "demo" and source is None:
        return demo.examples(split, demo_rows)
    source = source or task.hub_id
    path = _local_file(source, split)
    if path is not None:
        rows = _read_file(path)
    elif os.path.exists(source) or source.startswith((".", "/")):
        raise FileNotFoundError(
            f"no data file for split {split!r} at {source} (expected a .json, .jsonl or .parquet)"
        )
    else:
        from datasets import load_dataset  # hub ids only; not needed offline

        name, _, config = source.partition(":")  # "org/dataset:config"
        rows = list(load_dataset(name, config or None, split=split))
    check_columns(task, rows, source)
    return rows


def _local_file(source: str, split: str) -> str | None:
    if os.path.isfile(source):
        return source
    if os.path.isdir(source):
        for ext in ("jsonl", "json", "parquet"):
            path = os.path.join(source, f"{split}.{ext}")
            if os.path.isfile(path):
                return path
    return None


def _read_file(path: str) -> list[dict]:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    with open(path) as f:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        data = json.load(f)
    return data if isinstance(data, list) else data.get("data", [])


def check_columns(task: Task, rows: Sequence[dict], source: str) -> None:
    """One line naming what is missing, instead of a KeyError deep inside tokenization."""
    if not rows:
        raise ValueError(f"dataset {source} has no rows")
    have = set(rows[0])
    missing = [" or ".join(alts) for alts in task.columns if not have & set(alts)]
    if missing:
        raise ValueError(
            f"dataset {source} lacks column(s) {', '.join(missing)} needed by task {task.name!r}; "
            f"it has: {', '.join(sorted(have))}"
        )


def to_pairs(task: Task, rows: Sequence[dict], *, encoder_decoder: bool) -> list[tuple[str, str]]:
    """(prompt, response) text for every row, formatted as the task and the architecture want."""
    if task.to_pair is None:
        raise ValueError(f"task {task.name!r} is language-model text, not prompt/response pairs")
    return [task.to_pair(row, encoder_decoder) for row in rows]
