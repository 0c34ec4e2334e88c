"""Where rows come from: local files, or a dataset on the Hugging Face hub described by one string.

A source is either local — a ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file, or a directory holding
``<split>.<ext>`` — or a hub dataset, written as what ``datasets.load_dataset`` needs::

    org/name[:config][@revision][?data_dir=DIR&data_files=PATTERN]
    knkarthick/samsum
    IWSLT/iwslt2017@refs/convert/parquet?data_dir=iwslt2017-en-de
    MiniLLM/dolly?data_files=train:raw.jsonl,test:valid.jsonl

``data_files`` is one pattern, or ``split:pattern`` pairs separated by commas. The revision may be a
branch (``refs/convert/parquet``: the parquet export the hub makes of every dataset, the way to load a
dataset that only has a loading script, which ``datasets`` >= 4 refuses), a tag or a commit.

A split may be sliced as in ``datasets``: ``train[1000:]``, ``train[:1000]``, ``validation[:10%]``. A
hub source read with ``stream=True`` fetches and holds only the first ``max_rows`` rows (OpenWebText has
8M documents).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import re
from urllib.parse import parse_qsl

from distillm_jax import storage
from distillm_jax.models import hub

LOCAL_FORMATS = ("jsonl", "json", "parquet", "csv")
# Datasets that moved or that only a loading script serves: the form that loads today.
REPLACEMENTS = {
    "Samsung/samsum": "knkarthick/samsum",
    "samsum": "knkarthick/samsum",
    "IWSLT/iwslt2017": "IWSLT/iwslt2017@refs/convert/parquet?data_dir=iwslt2017-en-de",
    "iwslt2017": "IWSLT/iwslt2017@refs/convert/parquet?data_dir=iwslt2017-en-de",
    "Skylion007/openwebtext": "Skylion007/openwebtext@refs/convert/parquet?data_dir=plain_text",
    "openwebtext": "Skylion007/openwebtext@refs/convert/parquet?data_dir=plain_text",
}
_SPLIT = re.compile(r"^([\w.-]+)(?:\[(-?\d*)(%?):(-?\d*)(%?)\])?$")


@dataclasses.dataclass(frozen=True)
class HubSource:
    """The arguments of ``datasets.load_dataset`` that a source string names."""

    path: str
    name: str | None = None
    revision: str | None = None
    data_dir: str | None = None
    data_files: str | dict[str, str] | None = None

    def kwargs(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def is_local(source: str) -> bool:
    """Files, not a hub dataset: a path on disk, or written as one (``./x``, ``/x``, ``~/x``, ``x.jsonl``),
    or a bucket's file or folder (``gs://…``)."""
    if storage.is_remote(source) or hub.is_local(source):
        return True
    return "?" not in source and source.rsplit(".", 1)[-1].lower() in LOCAL_FORMATS


def parse_hub(source: str) -> HubSource:
    """``org/name[:config][@revision][?key=value&...]`` as ``load_dataset`` arguments."""
    spec, _, query = source.partition("?")
    spec, _, revision = spec.partition("@")
    path, _, name = spec.partition(":")
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - {"data_dir", "data_files"})
    if not path or unknown:
        raise ValueError(
            f"data source {source!r}: write a hub dataset as org/name[:config][@revision]"
            f"[?data_dir=...&data_files=...]"
            + (f"; unknown option(s) {', '.join(unknown)}" if unknown else "")
        )
    files: str | dict[str, str] | None = options.get("data_files") or None
    if files and ":" in files and "://" not in files:
        files = dict(part.split(":", 1) for part in files.split(","))
    return HubSource(path, name or None, revision or None, options.get("data_dir") or None, files)


def parse_split(split: str) -> tuple[str, slice | None, bool]:
    """``name[a:b]`` as (name, the slice, whether its bounds are percentages)."""
    m = _SPLIT.match(split.strip())
    if not m:
        raise ValueError(f"split {split!r} is not a name or a slice like train[1000:] / train[:10%]")
    name, start, pct1, stop, pct2 = m.groups()
    if start is None:
        return name, None, False
    return name, slice(int(start) if start else None, int(stop) if stop else None), bool(pct1 or pct2)


def sliced(rows: list, piece: slice | None, percent: bool) -> list:
    """``rows[piece]``, the bounds as percentages of ``len(rows)`` when ``percent``."""
    if piece is None:
        return rows
    if percent:
        n = len(rows)
        scale = [None if b is None else round(b * n / 100) for b in (piece.start, piece.stop)]
        piece = slice(*scale)
    return rows[piece]


def read(source: str, split: str, *, max_rows: int = 0, stream: bool = False) -> list[dict]:
    """The rows of ``split`` (sliced as it says), at most ``max_rows`` of them (0: all); ``stream``: from
    the hub, fetch only those."""
    if is_local(source):
        rows = _read_local(source, split)
    else:
        rows = _read_hub(parse_hub(source), split, max_rows if stream else 0, source)
    return rows[:max_rows] if max_rows else rows


# ---------------------------------------------------------------------------------------------------
# local files


def _read_local(source: str, split: str) -> list[dict]:
    path = storage.absolute(source)
    name, piece, percent = parse_split(split)
    if storage.is_pattern(source):  # files that hold one split between them, read in name order
        files = storage.glob(path)
        if not files:
            raise FileNotFoundError(f"no data file matches {source}")
        return sliced([row for f in files for row in read_file(f)], piece, percent)
    if storage.isdir(path):
        found = [storage.join(path, f"{name}.{ext}") for ext in LOCAL_FORMATS]
        found = [f for f in found if storage.isfile(f)]
        if not found:
            kinds = f"{name}.jsonl, .json, .parquet or .csv"
            raise FileNotFoundError(f"no data file for split {name!r} in {source} (expected {kinds})")
        path = found[0]
    elif not storage.isfile(path):
        raise FileNotFoundError(f"data file {source} does not exist")
    return sliced(read_file(path), piece, percent)


def read_file(path: str) -> list[dict]:
    """Rows of one file (local or in a bucket); a malformed one is a one-line ValueError naming the file
    and line."""
    ext = path.rsplit(".", 1)[-1].lower()
    if ext not in LOCAL_FORMATS:
        raise ValueError(f"data file {path}: unknown format .{ext} (use .jsonl, .json, .parquet or .csv)")
    if ext == "parquet":
        import pyarrow.parquet as pq

        try:
            with storage.open(path, "rb") as f:
                return pq.read_table(f).to_pylist()
        except Exception as e:  # pyarrow raises its own error types for a corrupt file
            raise ValueError(f"data file {path} is not a readable parquet file ({e})") from None
    try:
        text = io.StringIO(storage.read_text(path), newline="" if ext == "csv" else None)
        with text as f:
            if ext == "csv":  # an empty cell is None, as the hub's CSV loader gives it
                return [{k: (v if v != "" else None) for k, v in row.items()} for row in csv.DictReader(f)]
            if ext == "jsonl":
                rows = []
                for number, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except ValueError as e:
                            raise ValueError(f"data file {path}, line {number}: not JSON ({e})") from None
                return rows
            data = json.load(f)
    except UnicodeDecodeError as e:
        raise ValueError(f"data file {path} is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"data file {path}, line {e.lineno}: not JSON ({e.msg})") from None
    return data if isinstance(data, list) else data.get("data", [])


# ---------------------------------------------------------------------------------------------------
# the hub


def _read_hub(hub: HubSource, split: str, max_rows: int, source: str) -> list[dict]:
    """Through ``datasets.load_dataset``; streamed when only ``max_rows`` rows are wanted (a slice with
    percentages or negative bounds needs the split's length: not streamed)."""
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"data source {source} is a hub dataset: install the `datasets` package (pip install datasets), "
            "or set data.source to local files"
        ) from None

    name, piece, percent = parse_split(split)
    bounds = (0, None) if piece is None else (piece.start or 0, piece.stop)
    try:
        if max_rows and not percent and bounds[0] >= 0 and (bounds[1] is None or bounds[1] >= 0):
            stream = datasets.load_dataset(**hub.kwargs(), split=name, streaming=True)
            stop = bounds[0] + max_rows if bounds[1] is None else min(bounds[1], bounds[0] + max_rows)
            return list(itertools.islice(stream, bounds[0], stop))
        return list(datasets.load_dataset(**hub.kwargs(), split=split))
    except Exception as e:  # everything datasets raises for a source it cannot serve: one line
        raise ValueError(_hub_error(hub, source, e)) from None


def _hub_error(hub: HubSource, source: str, e: Exception) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    better = REPLACEMENTS.get(hub.path)
    if "scripts are no longer supported" in str(e):
        use = better or f"{hub.path}@refs/convert/parquet?data_dir=<config>"
        return (
            f"dataset {hub.path} is a loading script, which datasets >= 4 no longer runs; load the hub's "
            f"parquet export instead: data.source='{use}'"
        )
    kind = type(e).__name__
    if kind in ("DatasetNotFoundError", "RepositoryNotFoundError", "FileNotFoundError", "EmptyDatasetError"):
        hint = f"; it moved: data.source='{better}'" if better and better != source else ""
        return f"dataset {source} not found on the hub ({first}){hint}"
    if kind in ("ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError") or "connect" in first:
        return (
            f"cannot fetch dataset {source} from the hub ({kind}: {first}); without a network, set "
            "data.source to local files (a directory with <split>.jsonl / .parquet / .csv)"
        )
    return f"cannot load dataset {source} ({kind}: {first})"
