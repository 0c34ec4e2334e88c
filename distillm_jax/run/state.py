"""What a checkpoint holds beside the device arrays (docs/architecture.md §8): the step, the data order,
the evaluations so far, the clocks, the batch sources' counts, and the method's batch source's own state. A
versioned dataclass saved as JSON, so a reader sees every field in one place and a checkpoint written
by a later, incompatible version is refused in one line instead of misread."""

from __future__ import annotations

import dataclasses

VERSION = 2  # 0: the dicts written before this class; 1: the source's state as "feeder" or "rollout"


@dataclasses.dataclass
class RunState:
    version: int = VERSION
    step: int = 0  # optimizer updates done
    order: list = dataclasses.field(default_factory=lambda: [0, 0])  # BatchOrder.position (epoch, batch)
    lm_order: list = dataclasses.field(default_factory=lambda: [0, 0])  # the LM text's
    best: float | None = None  # the best evaluation's key metric, and its step (best/ holds that model)
    best_step: int | None = None
    initial: dict | None = None  # the evaluation at step 0
    last_eval: dict | None = None
    train_seconds: float = 0.0  # training wall-clock (evaluation and checkpoints left out)
    gen_seconds: float = 0.0  # the loop blocked on generation
    gen_total_seconds: float = 0.0  # the sampler's own time (overlap mode: the rest ran behind training)
    phi_path: list = dataclasses.field(default_factory=list)  # [step, φ] at each evaluation that changed φ
    sources: dict = dataclasses.field(default_factory=lambda: {"data": 0, "sgo": 0, "replay": 0})
    source: dict | None = None  # the method's batch source's state (``sources.Source``), every host's merged

    def count(self, info: dict) -> None:
        """Count a trained step by its batch source and its generation seconds (a source's ``info``)."""
        self.sources[info["source"]] += 1
        self.gen_seconds += info["gen_s"]
        self.gen_total_seconds += info.get("gen_total_s", info["gen_s"])

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, saved: dict) -> RunState:
        """The state a checkpoint saved; a field it lacks keeps its default (checkpoints of version 0
        included). Raises ``ValueError`` for a version this code cannot read."""
        version = int(saved.get("version", 0))
        if version > VERSION:
            raise ValueError(
                f"its run state is version {version} and this distillm_jax reads up to {VERSION}; "
                "continue it with the version that wrote it"
            )
        saved = dict(saved)
        for old in ("feeder", "rollout"):  # before version 2: the feeder's or MiniLLM's rounds' state
            if saved.get(old) is not None:
                saved["source"] = saved[old]
        known = {f.name for f in dataclasses.fields(cls)} - {"version"}
        return cls(**{k: v for k, v in saved.items() if k in known})
