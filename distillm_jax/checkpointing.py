"""Orbax checkpoints of a run (DESIGN.md decision 8): the device state (student params, optimizer state)
and the host state (step, data position, best metric, ...) saved together under one step number.

Orbax writes each step into a temporary directory and renames it only once every file is complete, so a
run killed mid-write leaves no directory that ``latest_step`` would pick: resuming always starts from the
last complete checkpoint.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


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
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), host=ocp.args.JsonRestore())
        out = self.manager.restore(step, args=args)
        return out.state["params"], out.state["opt_state"], dict(out.host)

    def path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def close(self) -> None:
        """Wait for writes in flight, then release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
