"""The tasks of the paper as prompt/response pairs: how each dataset's rows become text (its templates),
where they come from by default (a hub dataset in the form of ``sources.py``; any source with the same
columns works), and which metric judges them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from distillm_jax.data import demo, sources

DOLLY_HEAD = "Below is an instruction that describes a task"
DOLLY_CONTEXT = ", paired with an input that provides further context"
DOLLY_TAIL = ". Write a response that appropriately completes the request.\n\n"


def _text(row: dict, *names: str) -> str:
    """The first of ``names`` the row has; a missing or empty cell (None in CSV files) is ""; a cell
    holding several references (a list: S-NI's outputs) gives its first, the one a model trains on."""
    for name in names:
        value = row.get(name)
        if isinstance(value, list):
            return str(value[0]) if value else ""
        if value is not None:
            return str(value)
    return ""


def _dolly(row: dict, encoder_decoder: bool) -> tuple[str, str]:
    # databricks-dolly-15k columns (instruction, context, response) or MiniLLM's (instruction, input, output)
    context = _text(row, "context", "input").strip()
    prompt = DOLLY_HEAD + (DOLLY_CONTEXT if context else "") + DOLLY_TAIL
    prompt += f"### Instruction:\n{_text(row, 'instruction')}\n\n"
    if context:
        prompt += f"### Input:\n{context}\n\n"
    return prompt + "### Response:\n", _text(row, "response", "output")


def _summary(source: str, target: str) -> Callable[[dict, bool], tuple[str, str]]:
    def pair(row: dict, encoder_decoder: bool) -> tuple[str, str]:
        text = _text(row, source)
        if encoder_decoder:
            return f"summarize: {text}", _text(row, target)
        return f"Summarize the dialogue:\n{text}\nSummary:", _text(row, target)

    return pair


def _dialogues(row: dict, encoder_decoder: bool) -> tuple[str, str]:
    records = _text(row, "records")
    if encoder_decoder:
        return f"dialogues: {records}", _text(row, "dialogues")
    return f"Write the dialogues:\n{records}\nDialogues:", _text(row, "dialogues")


LANGUAGES = {
    "en": "English",
    "de": "German",
    "fr": "French",
    "it": "Italian",
    "nl": "Dutch",
    "ro": "Romanian",
    "ar": "Arabic",
    "ja": "Japanese",
    "ko": "Korean",
    "zh": "Chinese",
}


def _translation(src: str, tgt: str) -> Callable[[dict, bool], tuple[str, str]]:
    a, b = LANGUAGES[src], LANGUAGES[tgt]

    def pair(row: dict, encoder_decoder: bool) -> tuple[str, str]:
        texts = row.get("translation") or row
        source, target = _text(texts, src), _text(texts, tgt)
        if encoder_decoder:
            return f"translate {a} to {b}: {source}", target
        return f"Translate {a} to {b}:\n{source}\n{b}:", target

    return pair


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    columns: tuple[tuple[str, ...], ...]  # each inner tuple: alternatives, one of which must be present
    metric: str  # "rougeL", "bleu", or "" for language-model data
    hub_id: str | None  # the default source: a hub dataset in sources.py's form (None: built in)
    to_pair: Callable[[dict, bool], tuple[str, str]] | None
    references_in: tuple[str, ...] = ()  # columns that may list several references for the metric
    generator: Callable[[str, int], list[dict]] | None = None  # built-in rows: (split, n) -> rows


# The hub forms that load with datasets >= 4 today (sources.py): Samsung/samsum was deleted (a copy in the
# same columns: knkarthick/samsum); IWSLT 2017 and OpenWebText are loading scripts (their parquet exports).
# Dolly: MiniLLM's processed copy, the split DistiLLM reports on (raw.jsonl = 1000 dev rows, then train;
# valid.jsonl = the 500 test rows); configs/paper.py sets the splits.
TASKS: dict[str, Task] = {
    "dolly": Task(
        "dolly",
        (("instruction",), ("response", "output")),
        "rougeL",
        "MiniLLM/dolly?data_files=train:raw.jsonl,test:valid.jsonl",
        _dolly,
        ("response", "output"),
    ),
    "samsum": Task(
        "samsum",
        (("dialogue",), ("summary",)),
        "rougeL",
        "knkarthick/samsum",
        _summary("dialogue", "summary"),
    ),
    "iwslt2017": Task(
        "iwslt2017",
        (("translation", "en"),),
        "bleu",
        "IWSLT/iwslt2017@refs/convert/parquet?data_dir=iwslt2017-en-de",
        _translation("en", "de"),
    ),
    "openwebtext": Task(
        "openwebtext",
        (("text",),),
        "",
        "Skylion007/openwebtext@refs/convert/parquet?data_dir=plain_text",
        None,
    ),
    "demo": Task(
        "demo",
        (("dialogue",), ("summary",)),
        "rougeL",
        None,
        _summary("dialogue", "summary"),
        generator=demo.examples,
    ),
    # the demo's long-response form: fact records -> a dialogue for each (~180 tokens)
    "demo_long": Task(
        "demo_long",
        (("records",), ("dialogues",)),
        "rougeL",
        None,
        _dialogues,
        generator=demo.long_examples,
    ),
}


def get(name: str, languages: str = "en-de") -> Task:
    """The task ``name``; for ``iwslt2017``, translating ``languages`` (``src-tgt``, IWSLT 2017's pairs:
    en with de, fr, it, nl, ro, ar, ja, ko, zh, either way)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    task = TASKS[name]
    if name != "iwslt2017" or languages == "en-de":
        return task
    src, _, tgt = languages.partition("-")
    if src not in LANGUAGES or tgt not in LANGUAGES or "en" not in (src, tgt) or src == tgt:
        raise ValueError(
            f"data.languages {languages!r}: IWSLT 2017 pairs English with one of "
            f"{', '.join(k for k in LANGUAGES if k != 'en')}, written src-tgt (e.g. en-fr, de-en)"
        )
    pair = "-".join(sorted((src, tgt), key=lambda x: x != "en"))  # the hub's config is en-xx
    return dataclasses.replace(
        task,
        columns=(("translation", src),),
        hub_id=f"IWSLT/iwslt2017@refs/convert/parquet?data_dir=iwslt2017-{pair}",
        to_pair=_translation(src, tgt),
    )


def load_rows(
    task: Task, source: str | None, split: str, *, demo_rows: int = 2000, max_rows: int = 0
) -> list[dict]:
    """Rows of ``split`` from ``source`` (``sources.py``: local files or a hub dataset; "" / None: the
    task's default), at most ``max_rows`` (0: all; language-model text is then streamed from the hub),
    or — for the built-in tasks (``demo``, ``demo_long``) — ``demo_rows`` from their generator."""
    if task.generator and not source:  # sliced as a hub split is: test[:100]
        name, piece, percent = sources.parse_split(split)
        rows = sources.sliced(task.generator(name, demo_rows), piece, percent)
        return rows[:max_rows] if max_rows else rows
    source = source or task.hub_id
    rows = sources.read(source, split, max_rows=max_rows, stream=task.to_pair is None)
    check_columns(task, rows, source)
    return rows


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


def references(task: Task, row: dict, response: str) -> str | list[str]:
    """What the metric compares a generation with: every reference the row lists (the metric takes the
    best, as the paper's evaluation does), else its ``response``."""
    for name in task.references_in:
        value = row.get(name)
        if isinstance(value, list) and len(value) > 1:
            return [str(v) for v in value]
    return response


def to_pairs(task: Task, rows: Sequence[dict], *, encoder_decoder: bool) -> list[tuple[str, str]]:
    """(prompt, response) text for every row, formatted as the task and the architecture want."""
    if task.to_pair is None:
        raise ValueError(f"task {task.name!r} is language-model text, not prompt/response pairs")
    return [task.to_pair(row, encoder_decoder) for row in rows]
