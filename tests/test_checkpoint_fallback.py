"""A damaged checkpoint (truncated file, empty step folder) does not stop a resume: the newest one that
reads goes on, each newer one is moved aside to ``<step>.corrupt`` with one warning line; none readable
is one line; a checkpoint of another student is still the user's mistake, never moved aside."""

import os
import re
import shutil
from pathlib import Path

import jax
import pytest

from distillm_jax import config as cfglib
from distillm_jax import models, trainer
from distillm_jax.run.checkpoints import Checkpoints

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny SFT run of 4 steps with checkpoints 2 and 4, trained once for the module; the tests
    damage copies of it."""
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)  # as the quick_compiles fixture
    c = cfglib.load_file(str(ROOT / "configs" / "demo.py"), "tiny")
    run_dir = tmp_path_factory.mktemp("fallback") / "run"
    c = trainer.override(
        c,
        method="sft",
        compare=(),
        data__test_split="",
        optim__steps=4,
        eval__generate=False,
        checkpoint__interval=2,
        run_dir=str(run_dir),
        resume=False,
    )
    c.teacher.train_steps = c.student.train_steps = 0
    trainer.train(c)
    assert steps(run_dir / "checkpoints") == ["2", "4"]
    yield c, run_dir
    jax.config.update("jax_disable_most_optimizations", before)


def copy(trained, tmp_path):
    """A copy of the trained run and the config that resumes it for 2 more steps."""
    c, run_dir = trained
    shutil.copytree(run_dir, tmp_path / "run")
    return trainer.override(c, run_dir=str(tmp_path / "run"), resume=True, optim__steps=6), tmp_path / "run"


def steps(ckpts: Path) -> list[str]:
    return sorted((p.name for p in ckpts.iterdir()), key=lambda n: (len(n), n))


def largest_file(folder: Path) -> Path:
    files = [Path(root) / name for root, _, names in os.walk(folder) for name in names]
    return max(files, key=lambda p: p.stat().st_size)


def warnings(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("warning:")]


@pytest.mark.slow
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # orbax's leftovers: hushed
def test_truncated_array_file_falls_back_to_the_previous_checkpoint(trained, tmp_path, capsys):
    c, run = copy(trained, tmp_path)
    ckpts = run / "checkpoints"
    data = largest_file(ckpts / "4")  # an array data file of the OCDBT store
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 10)
    capsys.readouterr()
    summary = trainer.train(c)
    out, err = capsys.readouterr()
    (line,) = warnings(out)
    assert re.fullmatch(
        rf"warning: checkpoint {re.escape(str(ckpts / '4'))} is incomplete or corrupt \(.+\); moved to "
        rf"{re.escape(str(ckpts / '4.corrupt'))}, continuing from step 2",
        line,
    ), line
    assert f"resumed {run} at step 2 of 6" in out
    assert "Traceback" not in err and "Event loop is closed" not in err, err[-2000:]
    assert summary["steps"] == 6
    # saved at 4 and 6 as usual (4 again: the damaged one is out of orbax's way), the bad one kept aside
    assert steps(ckpts) == ["4", "6", "4.corrupt"]
    assert (ckpts / "4.corrupt" / data.relative_to(ckpts / "4")).exists()  # kept, not deleted
    manager = Checkpoints(str(ckpts))
    assert manager.latest_step() == 6
    manager.close()


@pytest.mark.slow
def test_empty_step_folder_is_moved_aside_not_another_student(trained, tmp_path, capsys):
    c, run = copy(trained, tmp_path)
    ckpts = run / "checkpoints"
    (ckpts / "999").mkdir()
    (ckpts / "999.corrupt").mkdir()  # a name taken: the next free one
    capsys.readouterr()
    summary = trainer.train(c)
    out, _ = capsys.readouterr()
    (line,) = warnings(out)
    assert line.startswith(f"warning: checkpoint {ckpts / '999'} is incomplete or corrupt (")
    assert line.endswith(f"moved to {ckpts / '999.corrupt-1'}, continuing from step 4")
    assert "does not match" not in out
    assert f"resumed {run} at step 4 of 6" in out and summary["steps"] == 6
    # the save at 6 (below 999) is the latest: the manager no longer counts the folder set aside
    assert steps(ckpts) == ["4", "6", "999.corrupt", "999.corrupt-1"]


def test_no_readable_checkpoint_is_one_line(trained, tmp_path, capsys):
    c, run = copy(trained, tmp_path)
    ckpts = run / "checkpoints"
    shutil.rmtree(ckpts / "4" / "state")  # a half-copied folder
    (ckpts / "2" / "host" / "metadata").write_text('{"step": 2, "ord')  # a truncated host state
    says = (
        rf"no checkpoint in {re.escape(str(ckpts))} can be read: steps 4, 2 incomplete or corrupt \(step 4: "
        rf".*\); nothing to continue: start again in another run_dir, or move {re.escape(str(run))} away"
    )
    with pytest.raises(models.CheckpointError, match=says) as error:
        trainer.train(c)
    assert "\n" not in str(error.value)
    assert steps(ckpts) == ["2", "4"]  # nothing moved: the user decides
    assert not warnings(capsys.readouterr().out)


def test_another_student_is_not_moved_aside(trained, tmp_path, capsys):
    c, run = copy(trained, tmp_path)
    ckpts = run / "checkpoints"
    (ckpts / "999").mkdir()  # unreadable, then a checkpoint that reads but is another model
    wider = trainer.override(c)
    wider.student.config.d_model, wider.student.config.d_ff = 24, 48
    says = rf"checkpoint {re.escape(str(ckpts / '4'))} does not match this config's student \(saved "
    with pytest.raises(models.CheckpointError, match=says):
        trainer.train(wider)
    assert steps(ckpts) == ["2", "4", "999"]  # no fall back past another student, nothing renamed
    assert not warnings(capsys.readouterr().out)
