"""The host state a checkpoint holds: a versioned dataclass that reads what earlier versions wrote and
refuses what later ones did."""

import json

import pytest

from distillm_jax.run.state import VERSION, RunState


def test_round_trip_through_json():
    s = RunState(step=7, order=[1, 3], best=21.5, best_step=5, phi_path=[[5, 0.1]], source={"a": 1})
    s.sources["sgo"] += 2
    back = RunState.from_json(json.loads(json.dumps(s.to_json())))
    assert back == s and back.version == VERSION


def test_a_checkpoint_from_before_the_version_keeps_the_defaults_it_lacks():
    old = {"step": 4, "order": [0, 2], "best": None, "sources": {"data": 4, "sgo": 0, "replay": 0}}
    s = RunState.from_json(old)  # no "version", no "rollout", no "gen_total_seconds": version 0
    assert (s.step, s.order, s.source, s.gen_total_seconds, s.version) == (4, [0, 2], None, 0.0, VERSION)


@pytest.mark.parametrize("field", ["feeder", "rollout"])
def test_a_version_1_checkpoint_gives_its_feeder_or_rollout_state_to_the_source(field):
    """Version 1 kept the SGO feeder's state as "feeder" and MiniLLM's rounds' as "rollout"; a run
    resumed from one hands it to the method's source."""
    s = RunState.from_json({"version": 1, "step": 3, "feeder": None, "rollout": None, field: {"round": 2}})
    assert s.source == {"round": 2} and s.version == VERSION


def test_a_later_version_is_refused_in_one_line():
    with pytest.raises(
        ValueError, match=f"version {VERSION + 1} and this distillm_jax reads up to {VERSION}"
    ):
        RunState.from_json({"version": VERSION + 1, "step": 3})
