"""Orbax checkpoints of a run (docs/architecture.md §8): the device state (student params, optimizer state)
and the host state (step, data position, best metric, ...) saved together under one step number.

Orbax writes each step into a temporary directory and renames it only once every file is complete, so a run
killed mid-write leaves no directory that ``latest_step`` would pick (in a GCS bucket, which cannot rename,
it writes the step in place and marks it complete with ``commit_success.txt`` last). A complete checkpoint
can still go bad afterwards: a disk or bucket that loses or truncates a file, a file system that crashes
before its data reach the disk, a user who copies half a folder (or makes an empty ``checkpoints/<step>/``).
So a resume (``restore_latest``) takes the newest checkpoint that reads, and moves each newer one that does
not aside to ``<step>.corrupt`` (a name orbax does not take for a step; nothing is deleted) with one warning
line. A checkpoint that reads but holds another model is the user's mistake, not damage: it stays where it
is, and the resume stops with one line.

Which errors mean "cannot be read" (orbax 0.12 / tensorstore, found by damaging a real checkpoint): an empty
step folder or one without ``state/`` or ``host/``: ``KeyError('Item "state" was not found in the
checkpoint ...')``; a missing host file: ``FileNotFoundError``; broken JSON in ``host/`` or
``state/_METADATA``: ``json.JSONDecodeError``; a truncated, deleted or garbled array or index file: a
tensorstore ``ValueError`` whose message starts with ``NOT_FOUND``, ``OUT_OF_RANGE``,
``FAILED_PRECONDITION`` or ``DATA_LOSS`` (for array data wrapped in orbax's bare ``Exception('Encountered
error while reading array index ...')``). Another model: a shape that differs in ``state/_METADATA``
(``_check_shapes``), or orbax's ``ValueError('User-provided restore item and on-disk value metadata tree
structures do not match ...')`` / ``('Requested shape: ... is not compatible with the stored shape ...')``.
"""

from __future__ import annotations

import json
import os
import re
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from distillm_jax import storage
from distillm_jax.models import CheckpointError

# tensorstore's status codes for files that are missing, short or garbled (not for a request that does
# not fit the files: orbax checks shapes and trees itself, before tensorstore reads)
_DAMAGE = re.compile(r"(NOT_FOUND|OUT_OF_RANGE|FAILED_PRECONDITION|DATA_LOSS): ")


class CorruptCheckpoint(CheckpointError):
    """A checkpoint whose files cannot be read (incomplete or corrupt), as opposed to one of another
    model; ``reason`` says why in a few words."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"checkpoint {path} is incomplete or corrupt ({reason})")
        self.path, self.reason = path, reason


TMP_SUFFIX = ".orbax-checkpoint-tmp"  # a step orbax has not finished writing (renamed when complete)


class Checkpoints:
    def __init__(self, directory: str, keep: int = 2):
        self.directory = storage.absolute(directory)  # a bucket's URL: orbax writes there itself
        self.keep = keep
        self.manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        # cleanup_tmp_directories: a write cut short (a full disk, a kill) leaves a *-tmp folder; the next
        # start removes it instead of leaving it to fill the disk again
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep, create=True, cleanup_tmp_directories=True
        )
        return ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, host: dict) -> None:
        """Start writing; returns once the arrays are copied off the devices (the files are written in
        the background, so the next training step may donate the buffers)."""
        state = {"params": params, "opt_state": opt_state}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(host))
        self.manager.save(step, args=args, force=True)

    def restore(self, step: int, params, opt_state) -> tuple:
        """(params, opt_state, host) of ``step``, in the shardings of the given (template) trees; raises
        ``CorruptCheckpoint`` when its files cannot be read, ``CheckpointError`` when it holds another
        model."""
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            {"params": params, "opt_state": opt_state},
        )
        self._check_shapes(step, abstract)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), host=ocp.args.JsonRestore())
        hush_abandoned_io()  # before: a failing read's leftovers may print while restore still runs
        try:
            out = self.manager.restore(step, args=args)
        except Exception as e:
            damage = _damage(e)
            if damage is not None:
                raise CorruptCheckpoint(self.path(step), damage.replace(self.path(step) + "/", "")) from None
            if not isinstance(e, (ValueError, KeyError, TypeError)):
                raise
            # orbax: another tree, shape or dtype than saved
            lines = [x.strip() for x in str(e).splitlines() if x.strip()]
            why = (lines[0] if lines else type(e).__name__)[:200]
            raise CheckpointError(
                f"checkpoint {self.path(step)} does not match this config's student ({why}); continue it "
                "with the config it was made with (run_config.json), or choose another run_dir"
            ) from None
        return out.state["params"], out.state["opt_state"], dict(out.host)

    def restore_latest(self, params, opt_state) -> tuple | None:
        """(step, params, opt_state, host) of the newest checkpoint that reads (None: there is none).
        Each newer one that cannot be read is moved aside to ``<step>.corrupt`` with a warning; one of
        another model stops the resume (``CheckpointError``), and so does finding none that reads."""
        bad = []  # (step, why), newest first
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                params_, opt_state_, host = self.restore(step, params, opt_state)
                why = None
            except CorruptCheckpoint as e:
                why = e.reason
            why = _agreed(why)
            if why is None:
                if bad:
                    self._set_aside(bad, step)
                return step, params_, opt_state_, host
            bad.append((step, why))
        if bad:
            run_dir = os.path.dirname(self.directory)
            steps = ("steps " if len(bad) > 1 else "step ") + ", ".join(str(s) for s, _ in bad)
            raise CheckpointError(
                f"no checkpoint in {self.directory} can be read: {steps} incomplete or corrupt (step "
                f"{bad[0][0]}: {bad[0][1]}); nothing to continue: start again in another run_dir, or move "
                f"{run_dir} away and run with --config.resume=False"
            )
        return None

    def _set_aside(self, bad: list[tuple[int, str]], step: int) -> None:
        """Rename the unreadable checkpoints ``bad`` to names orbax does not take for steps (process 0;
        the others wait for it), then reopen the manager so that it no longer lists them."""
        self.manager.close()
        if jax.process_index() == 0:
            for s, why in bad:
                path, n = self.path(s), 0
                dest = f"{path}.corrupt"
                while storage.exists(dest):
                    n += 1
                    dest = f"{path}.corrupt-{n}"
                storage.rename(path, dest)
                print(
                    f"warning: checkpoint {path} is incomplete or corrupt ({why}); moved to {dest}, "
                    f"continuing from step {step}",
                    flush=True,
                )
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("distillm_jax.checkpoints.set_aside")
        self.manager = self._open()

    def _check_shapes(self, step: int, abstract) -> None:
        """Refuse a checkpoint of another model in one line, before orbax reads it (its own error is
        a page of asyncio output)."""
        try:
            saved = ocp.StandardCheckpointHandler().metadata(epath.Path(self.path(step)) / "state")
        except Exception:  # no metadata to compare (damaged, another orbax layout): restore will say
            return
        shapes = lambda tree: sorted(tuple(x.shape) for x in jax.tree.leaves(tree) if hasattr(x, "shape"))  # noqa: E731
        have, want = shapes(getattr(saved, "tree", saved)), shapes(abstract)
        if have and have != want:
            diff = next(((h, w) for h, w in zip(have, want, strict=False) if h != w), (len(have), len(want)))
            raise CheckpointError(
                f"checkpoint {self.path(step)} does not match this config's student (saved {diff[0]}, here "
                f"{diff[1]}); continue it with the config it was made with (run_config.json), or choose "
                "another run_dir"
            )

    def path(self, step: int) -> str:
        return storage.join(self.directory, str(step))

    def describe_latest(self) -> str:
        """The latest checkpoint for a message: its path and step, or "none yet"."""
        last = self.latest_step()
        return f"{self.path(last)} (step {last})" if last is not None else "none yet"

    def close(self, *, failed: bool = False) -> None:
        """Wait for writes in flight, then release the manager. ``failed`` (the run stops on an error):
        a write that did not complete is removed, so a full disk gets its space back at once."""
        try:
            self.manager.wait_until_finished()
        except BaseException:
            failed = True
            raise
        finally:
            try:
                self.manager.close()  # may itself raise a write's failure (orbax finalizes on close)
            except BaseException:
                failed = True
                raise
            finally:
                if failed and jax.process_index() == 0:
                    for name in storage.listdir(self.directory):
                        if name.endswith(TMP_SUFFIX):
                            storage.rmtree(storage.join(self.directory, name))


def _damage(e: BaseException) -> str | None:
    """What in orbax's error ``e`` (or the errors it was raised from) says that files are missing, short
    or garbled, in a few words; None when it says something else (see the module's docstring)."""
    while e is not None:
        text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        text = text.split(" [tensorstore_spec")[0].splitlines()[0] if text.strip() else type(e).__name__
        if isinstance(e, json.JSONDecodeError):
            return f"broken JSON: {text}"
        missing = isinstance(e, KeyError) and "not found in the checkpoint" in text  # no state/ or host/
        if missing or isinstance(e, FileNotFoundError):
            return text[:200]
        if isinstance(e, ValueError) and (m := _DAMAGE.match(text)):
            parts = text.split(": ")  # "CODE: Error reading "<array>" in OCDBT database at ...: <cause>"
            return f"{m.group(1)}: {parts[-1]}"[:200] if len(parts) > 2 else text[:200]
        e = e.__cause__
    return None


def _agreed(why: str | None) -> str | None:
    """``why`` this process could not read a checkpoint, or why another one could not: every process
    reads its own shards, so one may meet a damaged file that the others never open."""
    if jax.process_count() == 1:
        return why
    failed = multihost_utils.process_allgather(np.array(why is not None))
    return why or ("unreadable on another process" if np.any(failed) else None)


_hushed = False


def hush_abandoned_io() -> None:
    """When one array fails to read (or write: a full disk), orbax abandons the transfers still in flight;
    as they end, in tensorstore's threads or when collected, each prints a traceback through
    ``sys.unraisablehook`` ("Event loop is closed", or the exception that orbax's read coroutine
    ignored): pages of noise around the one line that reports the failure. Drop those two, pass on any
    other (installed once, for the process)."""
    global _hushed
    if _hushed:
        return
    _hushed, previous = True, sys.unraisablehook

    def hook(u) -> None:
        closed = isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"
        if not (closed or "_read_array_index_and_device_put" in repr(u.object)):
            previous(u)

    sys.unraisablehook = hook
