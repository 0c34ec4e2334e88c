"""What a user sees of a run: a progress bar (step, loss, tokens/s, ETA), ``metrics.jsonl`` and
TensorBoard rows in the run folder, a summary table at the end and ``curves.png`` of the training
curves. Only the lead process (process 0) writes.

A bucket has no append: there the rows are kept in memory and ``metrics.jsonl`` is written whole, at an
evaluation, before each checkpoint (``flush``: a resumed run finds every row up to its checkpoint) and at
most every ``FLUSH_SECONDS`` between them; TensorBoard's event files go through ``storage`` too."""

from __future__ import annotations

import io
import json
import math
import time

import jax

from distillm_jax import storage
from distillm_jax.run.folder import RunDir

FLUSH_SECONDS = 30.0  # a bucket's metrics.jsonl is rewritten at most this often between evaluations


class Reporter:
    def __init__(self, run_dir: RunDir, total_steps: int, start_step: int, *, desc: str = "train"):
        self.lead = jax.process_index() == 0
        self.path = run_dir.metrics
        self.bar = self.tb = None
        self.buffered: list[str] | None = [] if run_dir.remote else None  # a bucket's rows, all of them
        self.flushed = time.monotonic()
        if not self.lead:
            return
        storage.makedirs(run_dir.path)
        self._truncate_after(start_step)
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step", dynamic_ncols=True)
        try:
            from tensorboardX import SummaryWriter

            if run_dir.remote:
                _register_bucket_events()
            self.tb = SummaryWriter(run_dir.tensorboard)
        except ImportError:  # optional: JSONL and the PNG still hold everything
            self.tb = None

    def _truncate_after(self, step: int) -> None:
        """A resumed run rewrites the rows after its checkpoint, so the file reads like one run."""
        if not storage.exists(self.path):
            return
        keep = [json.dumps(r) + "\n" for r in read_rows(self.path) if r["step"] <= step]
        if self.buffered is not None:
            self.buffered = keep
        storage.write(self.path, "".join(keep))

    def log(self, step: int, kind: str, values: dict) -> None:
        """One row: kind "train" (per log interval) or "eval"."""
        if not self.lead:
            return
        row = {"step": step, "kind": kind, **{k: float(v) for k, v in values.items()}}
        line = json.dumps(row) + "\n"
        if self.buffered is None:
            with open(self.path, "a") as f:
                f.write(line)
        else:
            self.buffered.append(line)
            if kind == "eval" or time.monotonic() - self.flushed > FLUSH_SECONDS:
                self.flush()
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{kind}/{k}", float(v), step)
        if kind == "train":
            shown = {k: f"{values[k]:.4g}" for k in ("loss", "tokens_per_s", "phi") if k in values}
            self.bar.set_postfix(shown, refresh=False)
        else:
            self.bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))

    def flush(self) -> None:
        """Write the rows kept in memory (a bucket's) and TensorBoard's events out now."""
        if not self.lead:
            return
        if self.buffered is not None:
            storage.write(self.path, "".join(self.buffered))
            self.flushed = time.monotonic()
        if self.tb is not None:
            self.tb.flush()

    def write(self, text: str) -> None:
        """A line above the progress bar (the lead process only)."""
        if self.bar is not None:
            self.bar.write(text)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def close(self) -> None:
        if self.buffered is not None:
            self.flush()
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def read_rows(path: str) -> list[dict]:
    """The rows of a ``metrics.jsonl``; a last line cut short (a kill or a full disk mid-write) is left
    out, any other bad line is an error."""
    lines = [line for line in storage.read_text(path).splitlines() if line.strip()]
    rows = []
    for k, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if k < len(lines) - 1:
                raise
    return rows


def plot_curves(run_dir: RunDir) -> str | None:
    """``curves.png``: training loss and every evaluation metric against the step."""
    path = run_dir.metrics
    if jax.process_index() != 0 or not storage.exists(path):
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # optional (pip install matplotlib): metrics.jsonl holds the same numbers
        return None

    rows = read_rows(path)
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    eval_keys = sorted({k for r in evals for k in r if not k.endswith("_std")} - {"step", "kind", "train_s"})
    fig, axes = plt.subplots(1, 1 + len(eval_keys), figsize=(4.5 * (1 + len(eval_keys)), 3.5), squeeze=False)
    for key in ("loss", "ce"):
        if train and key in train[0]:
            axes[0, 0].plot([r["step"] for r in train], [r[key] for r in train], label=f"train {key}")
    axes[0, 0].set_xlabel("step")
    axes[0, 0].legend()
    for ax, key in zip(axes[0, 1:], eval_keys, strict=True):
        pts = [
            (r["step"], r[key], r.get(key + "_std", 0.0)) for r in evals if key in r and math.isfinite(r[key])
        ]
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", label=key)
        ax.set_title(f"validation {key}")
        if key == "phi":  # the scheduler's probability beside what the steps actually trained on
            _plot_sources(ax, train)
        ax.set_xlabel("step")
    fig.tight_layout()
    out = run_dir.curves
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    storage.write(out, png.getvalue())
    return out


def _plot_sources(ax, train: list[dict]) -> None:
    """φ's panel: the share of steps on fresh and on replayed SGOs in each logging interval (stepped, as
    φ is; an interval's share is a count of its steps)."""
    ax.set_title("φ and the steps' batch sources")
    steps = [r["step"] for r in train if "src_sgo" in r]
    if steps:
        fresh = [r["src_sgo"] for r in train if "src_sgo" in r]
        replay = [r["src_replay"] for r in train if "src_sgo" in r]
        ax.stackplot(
            steps, fresh, replay, labels=["fresh SGO share", "replayed SGO share"], alpha=0.4, step="pre"
        )
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize="small")


def table(rows: list[tuple[str, ...]]) -> str:
    """A plain-text table; the first row is the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
    return "\n".join([line(rows[0]), "  ".join("-" * w for w in widths), *map(line, rows[1:])])


def summary_table(s: dict) -> str:
    """A run's summary (``trainer.train``'s) as a head line and a before / after table."""
    keys = sorted(set(s["initial"]) | set(s["final"]))
    rows = [("", "before", "after")] + [
        (k, f"{s['initial'].get(k, float('nan')):.4f}", f"{s['final'].get(k, float('nan')):.4f}")
        for k in keys
    ]
    head = f"{s['run_dir']}: {s['method']} ({s['loss']}), {s['steps']} steps in {s['seconds']:.0f} s; "
    head += f"best {s['metric']} {s['best']:.4f} at step {s['best_step']} (exported to best/)"
    return head + "\n" + table(rows)


class _BucketEvents:
    """A TensorBoard event file in a bucket for ``tensorboardX``: the events are kept and the object is
    written whole at each flush (tensorboardX's own GCS writer needs google-cloud-storage's client)."""

    def __init__(self, path: str):
        self.path, self.buffer = path, io.BytesIO()

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        storage.write(self.path, self.buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _BucketEventFiles:
    def open(self, path: str) -> _BucketEvents:
        return _BucketEvents(path)

    def directory_check(self, path: str) -> None:  # a bucket needs no folders
        pass


def _register_bucket_events() -> None:
    """Route tensorboardX's event files under ``gs://`` and ``s3://`` through ``storage``."""
    from tensorboardX import record_writer

    for scheme in ("gs", "s3"):
        record_writer.register_writer_factory(scheme, _BucketEventFiles())
