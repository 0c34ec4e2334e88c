"""The pipeline's bookkeeping (``pipeline.py``), without training: which stages a config has and what each
runs with, a finished stage skipped, a stopped one continued, another config refused in the same folder,
and the warning for a teacher never fine-tuned on the task. The stages themselves run end to end in
test_configs.py (every paper config's tiny variant, from a hub stand-in) and test_trainer.py (the demo)."""

import json
import sys
from pathlib import Path

import pytest

from distillm_jax import config as cfglib
from distillm_jax import pipeline, trainer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load(name: str, arg: str = ""):
    return cfglib.load_file(str(ROOT / "configs" / f"{name}.py"), arg)


def test_stages_of_the_paper_configs():
    c = load("t5_samsum")
    todo = pipeline.stages(c)
    assert [s.name for s in todo] == ["teacher", "student_sft", "distill"]
    teacher, init, distill = (s.config for s in todo)
    assert (teacher.method, teacher.student.path, teacher.optim.epochs, teacher.optim.lr) == (
        "sft",
        "google-t5/t5-3b",
        10,
        5e-5,
    )
    assert not teacher.eval.generate and teacher.run_dir == "runs/t5_samsum/teacher"
    assert (init.student.path, init.optim.epochs, init.optim.lr) == ("google-t5/t5-base", 3, 1e-4)
    assert distill.teacher.path == "runs/t5_samsum/teacher/best"
    assert distill.student.path == "runs/t5_samsum/student_sft/best"
    assert distill.method == "distillm" and distill.teacher.tuned
    planned = pipeline.stages(c, planning=True)[-1].config  # the planner reads the models they start from
    assert planned.teacher.path == "google-t5/t5-3b" and planned.teacher.train_epochs == 0
    gpt2 = pipeline.stages(load("gpt2_dolly"))  # MiniLLM's teacher is already fine-tuned on Dolly
    assert [s.name for s in gpt2] == ["student_sft", "distill"]
    assert gpt2[-1].config.teacher.path == "MiniLLM/teacher-gpt2-1.5B"
    lora = pipeline.stages(load("openllama_dolly"))[0].config  # the 7B teacher's SFT as adapters
    assert lora.student.lora.rank == 16 and lora.student.path == "openlm-research/open_llama_7b_v2"


def test_untuned_teacher_warns(capsys):
    c = load("t5_samsum")
    c.teacher.train_epochs = 0
    pipeline._warn_untuned_teacher(c)
    assert capsys.readouterr().out.startswith("warning: the teacher (google-t5/t5-3b) was not fine-tuned")
    c.teacher.tuned = True
    pipeline._warn_untuned_teacher(c)
    assert capsys.readouterr().out == ""


def test_done_stage_is_skipped_and_stopped_stage_continues(tmp_path, monkeypatch):
    """A stage continues what its folder holds, or starts (the run folder's config was checked first:
    ``resume`` and ``start_if_empty``), and is skipped once its summary is as late as its checkpoints."""
    calls = []
    monkeypatch.setattr(
        trainer, "train_checked", lambda c, stage: calls.append((c.resume, c.start_if_empty)) or {"steps": 1}
    )
    c = load("demo", "tiny")
    c.run_dir, c.resume = str(tmp_path / "run"), False
    stage = pipeline.Stage("distill", c)
    assert pipeline._run_stage(stage, 1, 1) == {"steps": 1} and calls == [(True, True)]  # fresh
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    pipeline._run_stage(stage, 1, 1)
    assert len(calls) == 2  # stopped before its end: continued from its checkpoint
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"steps": 4}))
    (tmp_path / "run" / "checkpoints" / "4").mkdir()
    assert pipeline._run_stage(stage, 1, 1) == {"steps": 4} and len(calls) == 2  # done: skipped
    (tmp_path / "run" / "checkpoints" / "4").rmdir()  # gone back to an earlier checkpoint: continued
    (tmp_path / "run" / "checkpoints" / "2").mkdir()
    assert pipeline._run_stage(stage, 1, 1) == {"steps": 1} and len(calls) == 3


def test_another_config_in_the_same_run_folder_is_refused(tmp_path):
    c = load("demo", "tiny")
    c.run_dir, c.resume = str(tmp_path / "run"), False
    pipeline._check_same_run(c)
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")  # it has begun
    pipeline._check_same_run(c)  # the same command again: continues
    pipeline._check_same_run(trainer.override(c, distributed__process_id=1))  # another host of the run
    other = trainer.override(c, optim__lr=0.5)
    with pytest.raises(cfglib.ConfigError, match=r"holds a run of another config \(optim.lr: 0.005 -> 0.5\)"):
        pipeline._check_same_run(other)
    pipeline._check_same_run(trainer.override(other, resume=True))  # said on purpose


def test_compared_methods_are_stages_of_their_own():
    c = load("t5_samsum")
    c.compare, c.compare_sft = ("kd", "distillm"), True  # the run's own method is not trained twice
    assert cfglib.compared(c) == ["distillm", "kd", "sft"]
    todo = pipeline.stages(c)
    assert [s.name for s in todo] == ["teacher", "student_sft", "distill", "kd", "sft"]
    distill, kd, sft = (s.config for s in todo[2:])
    assert (kd.method, kd.run_dir, kd.loss.name, kd.compare) == ("kd", "runs/t5_samsum/kd", "srkl", ())
    assert (sft.method, sft.run_dir) == ("sft", "runs/t5_samsum/sft")
    assert kd.student.path == sft.student.path == distill.student.path  # the same init
    assert [name for name, _, _ in pipeline._test_models(c, distill)] == [
        "teacher",
        "student init",
        "student distillm",
        "student kd",
        "student sft",
    ]
    with pytest.raises(cfglib.ConfigError, match="method 'kdd' is not one of"):
        cfglib.check(trainer.override(c, compare=("kdd",)))


def test_tables_say_how_each_student_was_fed():
    def summary(method, sources, phi=None):
        s = {"method": method, "loss": "srkl", "metric": "rougeL", "sources": sources}
        s.update(initial={"rougeL": 10.0, "val_ce": 3.0}, final={"rougeL": 20.0, "val_ce": 2.5})
        return s if phi is None else {**s, "phi": phi}

    results = {
        "student": summary("distillm", {"data": 70, "sgo": 10, "replay": 20}, 0.3),
        "kd": summary("kd", {"data": 100, "sgo": 0, "replay": 0}),
    }
    lines = pipeline.comparison(results, ["kd"]).splitlines()
    assert "steps data / SGO / replay" in lines[1] and "final φ" in lines[1]
    assert lines[4].split() == [
        "student",
        "distillm",
        "(srkl)",
        "20.00",
        "2.5000",
        "70",
        "/",
        "10",
        "/",
        "20",
        "0.3",
    ]
    assert lines[5].split() == ["student", "kd", "(srkl)", "20.00", "2.5000", "100", "/", "0", "/", "0"]
    c = load("demo", "tiny")
    c.compare = ("kd",)
    scores = {
        n: {"rougeL": 20.0, "rougeL_std": 1.0, "val_ce": 2.0} for n in ("student distillm", "student kd")
    }
    table = pipeline.test_table(scores, c, results).splitlines()
    assert table[3].split()[-4:] == ["10", "/", "20", "0.3"] and table[4].split()[-5:] == [
        "100",
        "/",
        "0",
        "/",
        "0",
    ]


def _finish(folder: Path, steps: int = 4) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps({"steps": steps}))


def test_resume_with_another_config_never_redoes_a_finished_stage(tmp_path):
    """Another method with resume=True on a finished run would skip every stage as "done before", print
    the old table and record the new config; it is refused, and the record stays the original's."""
    c = load("demo", "tiny")
    c.run_dir, c.resume = str(tmp_path / "run"), False
    pipeline._check_same_run(c)
    record = (tmp_path / "run" / "run_config.json").read_text()
    for stage in ("teacher", "student_sft", "."):
        _finish(tmp_path / "run" / stage)
    other = trainer.override(c, method="kd", resume=True)
    with pytest.raises(
        cfglib.ConfigError,
        match=r"holds a run of another config \(method: 'distillm' -> 'kd'\) "
        r"whose stage distill has finished; a finished stage is not redone",
    ):
        pipeline._check_same_run(other)
    assert (tmp_path / "run" / "run_config.json").read_text() == record
    pipeline._check_same_run(c)  # the original command still continues
    # a stopped distillation: resume=True continues it with a new loss weight; the finished SFT stages
    # read no loss settings, so they stand
    (tmp_path / "run" / "summary.json").unlink()
    pipeline._check_same_run(trainer.override(c, resume=True, loss__alpha=0.2))
    # but a new rate would change the SFT'd init, which has finished
    with pytest.raises(cfglib.ConfigError, match=r"whose stage teacher has finished"):
        pipeline._check_same_run(trainer.override(c, resume=True, optim__lr=0.5, loss__alpha=0.2))


def test_a_tested_run_is_not_tested_again_under_other_arms(tmp_path):
    c = load("demo", "tiny")
    c.run_dir, c.resume, c.compare = str(tmp_path / "run"), False, ()
    pipeline._check_same_run(c)
    for stage in ("teacher", "student_sft", "."):
        _finish(tmp_path / "run" / stage)
    (tmp_path / "run" / "test.json").write_text("{}")
    with pytest.raises(cfglib.ConfigError, match=r"whose stage (sft|test) has finished"):
        pipeline._check_same_run(trainer.override(c, resume=True, compare=("sft",), eval__seeds=(1, 2)))
    with pytest.raises(cfglib.ConfigError, match=r"whose stage test has finished"):
        pipeline._check_same_run(trainer.override(c, resume=True, eval__seeds=(1, 2)))


def test_a_first_start_that_fails_leaves_nothing_and_the_fixed_command_runs(tmp_path):
    """A broken data line found while the first stage reads its rows: one line; no run_config.json, no
    stage folder; the corrected command is not refused as another config."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [json.dumps({"dialogue": f"a {i}", "summary": f"b {i}"}) for i in range(16)]
    (data / "train.jsonl").write_text("\n".join([*rows[:8], '{"dialogue": "broken', *rows[8:]]) + "\n")
    (data / "validation.jsonl").write_text("\n".join(rows) + "\n")
    c = load("demo", "tiny")
    c.run_dir, c.resume = str(tmp_path / "run"), False
    c.data.task, c.data.source, c.tokenizer = "samsum", str(data), "bytes"
    c.data.test_split = ""
    c.teacher.config.vocab_size = c.student.config.vocab_size = 259
    with pytest.raises(cfglib.ConfigError, match=r"train.jsonl"):
        pipeline.run(c)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*"))
    # a stage folder left by a start killed before any stage wrote is no run either
    (tmp_path / "run" / "teacher").mkdir(parents=True, exist_ok=True)
    (tmp_path / "run" / "run_config.json").write_text(json.dumps({"method": "sft"}))
    pipeline._check_same_run(c)


def test_a_tuned_teacher_and_a_run_without_teacher_have_no_teacher_stage(capsys):
    """``teacher.tuned=True`` alone says the checkpoint is fine-tuned: no SFT of it, even where the
    paper config asks for one; an ``sft`` run reads no teacher, so none is trained for it."""
    c = load("t5_samsum")
    assert next(s.name for s in pipeline.stages(c)) == "teacher"
    tuned = trainer.override(c, teacher__tuned=True)
    assert [s.name for s in pipeline.stages(tuned)] == ["student_sft", "distill"]
    assert pipeline.stages(tuned)[-1].config.teacher.path == c.teacher.path  # used as it is
    pipeline._note_skipped(tuned)
    assert (
        "teacher.tuned=True: google-t5/t5-3b is used as it is; its SFT stage (teacher.train_epochs=10)"
        in (capsys.readouterr().out)
    )
    alone = trainer.override(c, method="sft")
    assert [s.name for s in pipeline.stages(alone)] == ["student_sft", "distill"]
    pipeline._note_skipped(alone)
    assert "no method of this run reads the teacher: its SFT stage" in capsys.readouterr().out
    with_kd = trainer.override(alone, compare=("kd",))  # a compared method that reads it: trained
    assert next(s.name for s in pipeline.stages(with_kd)) == "teacher"


def test_the_export_examples_name_a_checkpoint_the_demo_keeps():
    """The README's and export.py's example step is one the demo keeps (``checkpoint.keep`` of its saves)."""
    import re

    c = load("demo")
    every = c.checkpoint.interval or c.eval.interval
    saves = sorted({*range(every, c.optim.steps + 1, every), c.optim.steps})
    kept = saves[-c.checkpoint.keep :]
    for doc in (ROOT / "README.md", ROOT / "launch" / "export.py"):
        steps = re.findall(r"launch/export.py --config configs/demo.py --step (\d+)", doc.read_text())
        assert steps and all(int(s) in kept for s in steps), (doc, steps, kept)
