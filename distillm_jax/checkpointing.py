"""Orbax checkpoints of a run (docs/architecture.md §8): the device state (student params, optimizer state)
and the host state (step, data position, best metric, ...) saved together under one step number.

Orbax writes each step into a temporary directory and renames it only once every file is complete, so a
run killed mid-write leaves no directory that ``latest_step`` would pick: resuming always starts from the
last complete checkpoint.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from etils import epath

from distillm_jax.models import CheckpointError


class Checkpoints:
    def __init__(self, directory: str, keep: int = 2):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, host: dict) -> None:
        """Start writing; returns once the arrays are copied off the devices (the files are written in
        the background, so the next training step may donate the buffers)."""
        state = {"params": params, "opt_state": opt_state}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(host))
        self.manager.save(step, args=args, force=True)

    def restore(self, step: int, params, opt_state) -> tuple:
        """(params, opt_state, host) of ``step``, in the shardings of the given (template) trees."""
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            {"params": params, "opt_state": opt_state},
        )
        self._check_shapes(step, abstract)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), host=ocp.args.JsonRestore())
        try:
            out = self.manager.restore(step, args=args)
        except (ValueError, KeyError, TypeError) as e:  # orbax: another tree, shape or dtype than saved
            lines = [x.strip() for x in str(e).splitlines() if x.strip()]
            why = (lines[0] if lines else type(e).__name__)[:200]
            raise CheckpointError(
                f"checkpoint {self.path(step)} does not match this config's student ({why}); continue it "
                "with the config it was made with (run_config.json), or choose another run_dir"
            ) from None
        return out.state["params"], out.state["opt_state"], dict(out.host)

    def _check_shapes(self, step: int, abstract) -> None:
        """Refuse a checkpoint of another model in one line, before orbax reads it (its own error is
        a page of asyncio output)."""
        try:
            saved = ocp.StandardCheckpointHandler().metadata(epath.Path(self.path(step)) / "state")
        except Exception:  # no metadata to compare (another orbax layout): restore will say
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
        return os.path.join(self.directory, str(step))

    def describe_latest(self) -> str:
        """The latest checkpoint for a message: its path and step, or "none yet"."""
        last = self.latest_step()
        return f"{self.path(last)} (step {last})" if last is not None else "none yet"

    def close(self) -> None:
        """Wait for writes in flight, then release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
