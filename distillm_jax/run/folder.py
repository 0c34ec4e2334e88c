"""A run folder's layout, in one place: every file or folder a run writes or reads is named here, and
every module that touches a run folder is handed a ``RunDir`` instead of joining names to a path.

A training run (``trainer.train``)::

    checkpoints/<step>/    orbax checkpoints (device state + the host ``RunState``)
    metrics.jsonl          one row per log / evaluation; tensorboard/ and curves.png draw the same rows
    summary.json           written when the run ends
    best/  final/          exports (HF layout): the best evaluation's student, the last one's
    <cache>.jsonl          a method's cached responses (SeqKD, DistiLLM-2)
    .lock                  held while a process trains here (``run/lock.py``)

The folder may be local or in a bucket (``gs://…``, ``s3://…``): names join and files are read through
``storage``, which serves both.

A pipeline (``pipeline.run``) is a run folder too — its distillation run's files — plus::

    run_config.json        the config the folder was started with
    teacher/ student_sft/  the SFT stages' run folders; <method>/ each compared method's
    test.json test_<set>.json   the test stage's scores
"""

from __future__ import annotations

import dataclasses
import os

from distillm_jax import storage

STAGES = {"teacher": "teacher", "student": "student_sft"}  # a role's SFT stage folder


@dataclasses.dataclass(frozen=True)
class RunDir:
    path: str

    @classmethod
    def of(cls, folder: RunDir | str) -> RunDir:
        return folder if isinstance(folder, RunDir) else cls(os.fspath(folder))

    @property
    def remote(self) -> bool:
        """In a bucket: no appends, no renames (``storage``)."""
        return storage.is_remote(self.path)

    def __str__(self) -> str:
        return self.path

    def file(self, name: str) -> str:
        return storage.join(self.path, name)

    # --- a training run ----------------------------------------------------------------------------
    @property
    def checkpoints(self) -> str:
        return self.file("checkpoints")

    @property
    def metrics(self) -> str:
        return self.file("metrics.jsonl")

    @property
    def tensorboard(self) -> str:
        return self.file("tensorboard")

    @property
    def curves(self) -> str:
        return self.file("curves.png")

    @property
    def summary(self) -> str:
        return self.file("summary.json")

    @property
    def best(self) -> str:
        return self.file("best")

    @property
    def final(self) -> str:
        return self.file("final")

    @property
    def lock(self) -> str:
        return self.file(".lock")

    def cache(self, name: str) -> str:
        """A method's cached responses (``<name>.jsonl``)."""
        return self.file(f"{name}.jsonl")

    def export(self, step: int) -> str:
        """``launch/export.py``'s default folder for the checkpoint of ``step``."""
        return self.file(f"export-{step}")

    WRITTEN = ("checkpoints", "summary.json", "metrics.jsonl", "best", "final")  # a run's own parts

    def held(self) -> list[str]:
        """The parts of a run the folder holds (an empty ``checkpoints/`` counts: a run started here)."""
        present = set(storage.listdir(self.path))
        return [name for name in self.WRITTEN if name in present]

    def checkpoint_steps(self) -> list[int]:
        """The steps of the checkpoint folders present, ascending (complete or not: orbax decides)."""
        return sorted(int(d) for d in storage.listdir(self.checkpoints) if d.isdigit())

    # --- a pipeline ----------------------------------------------------------------------------------
    @property
    def run_config(self) -> str:
        return self.file("run_config.json")

    def stage(self, name: str) -> RunDir:
        """A stage's run folder: ``STAGES[role]`` for an SFT stage, a method's name for a compared arm."""
        return RunDir(self.file(name))

    def test(self, name: str = "") -> str:
        """The test stage's scores on the task's own set (``name`` ""), or on the set ``name``."""
        return self.file(f"test_{name}.json" if name else "test.json")
