"""The trainer end to end on the tiny demo config: it runs, exports a checkpoint transformers loads,
never resumes from a half-written checkpoint, and stops on a NaN loss naming the step and the last good
checkpoint. A run killed and resumed (with SGOs in flight, across process counts): test_pods.py."""

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distillm_jax import config as cfglib
from distillm_jax import methods, models, pipeline, reporting, trainer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
pytestmark = pytest.mark.usefixtures("quick_compiles")


def tiny(tmp_path, **changes):
    c = cfglib.load_file(str(ROOT / "configs" / "demo.py"), "tiny")
    c.run_dir = str(tmp_path / "run")
    c.resume = False
    return trainer.override(c, **changes)


def alone(tmp_path, **changes):
    """The tiny demo's configured method only: no compared students, no test stage."""
    return tiny(tmp_path, compare=(), compare_sft=False, data__test_split="", **changes)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The tiny demo's main job, run once: (config, results, what it printed)."""
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)  # as quick_compiles, for the module
    c, out = tiny(tmp_path_factory.mktemp("demo")), io.StringIO()
    with contextlib.redirect_stdout(out):
        results = pipeline.run(c)
    jax.config.update("jax_disable_most_optimizations", before)
    return c, results, out.getvalue()


@pytest.mark.slow
def test_demo_tiny_runs_end_to_end_and_compares(demo):
    c, results, out = demo
    assert set(results) == {"teacher_sft", "student_sft", "student", "kd", "sft", "teacher", "test"}
    run = Path(c.run_dir)
    for sub in ("teacher/final", "student_sft/final", "final", "best", "kd/final", "sft/final"):
        assert (run / sub / "config.json").exists(), sub
    rows = reporting.read_rows(str(run / "metrics.jsonl"))
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and r["srkl"] >= 0 and r["tokens_per_s"] > 0 for r in train)
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4] and all("rougeL" in r for r in evals)
    assert (run / "curves.png").stat().st_size > 1000
    assert list((run / "tensorboard").iterdir())
    assert "student distillm (srkl)" in out and "student sft (ce)" in out and "teacher" in out
    assert "student kd (srkl)" in out and "steps data / SGO / replay" in out  # the ablation, how each was fed
    assert out.rstrip().endswith(pipeline.ONE_RUN)  # one run per arm ranks nothing: said last
    assert results["kd"]["sources"] == {"data": 4, "sgo": 0, "replay": 0}  # φ held at 0
    assert "phi" in evals[0] and "phi" not in reporting.read_rows(str(run / "kd" / "metrics.jsonl"))[0]
    test = results["test"]  # every model on the test split, over both seeds
    assert set(test) == {"teacher", "student init", "student distillm", "student kd", "student sft"}
    assert all(len(s["scores"]) == 2 for s in test.values())
    assert json.loads((run / "test.json").read_text()) == test


@pytest.mark.slow
def test_export_loads_in_transformers(demo):
    torch = pytest.importorskip("torch")
    from transformers import T5ForConditionalGeneration

    c, _, _ = demo
    sft = trainer.override(
        c,
        run_dir=os.path.join(c.run_dir, "sft"),
        method="sft",
        compare=(),
        compare_sft=False,
        data__test_split="",
    )
    sft = trainer.override(sft, teacher__train_steps=0, student__train_steps=0)
    export = os.path.join(sft.run_dir, "final")  # the comparison's SFT student
    ours = models.from_pretrained(export)
    theirs = T5ForConditionalGeneration.from_pretrained(export).eval()
    ids = np.array([[5, 6, 7, 8, 1]])
    dec = np.array([[0, 9, 10]])
    ones, dones = np.ones_like(ids), np.ones_like(dec)
    with torch.no_grad():
        ref = theirs(input_ids=torch.tensor(ids), decoder_input_ids=torch.tensor(dec)).logits.numpy()
    got = np.asarray(ours(jnp.asarray(ids), jnp.asarray(ones), jnp.asarray(dec), jnp.asarray(dones)))
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=2e-4)
    scores = trainer.evaluate_model(trainer.override(sft, student__path=export), (1, 2))
    assert len(scores["scores"]) == 2 and scores["val_ce"] == pytest.approx(
        reporting.read_rows(os.path.join(sft.run_dir, "metrics.jsonl"))[-1]["val_ce"], rel=1e-5
    )


@pytest.mark.slow
def test_half_written_checkpoint_is_never_picked(tmp_path):
    c = alone(
        tmp_path,
        method="sft",
        optim__steps=2,
        eval__generate=False,
    )
    c.checkpoint.interval = 1
    trainer.train(c)
    with pytest.raises(cfglib.ConfigError, match=r"already holds a run .* --config.resume=True"):
        trainer.train(c)  # a finished run is not overwritten by accident
    ckpts = Path(c.run_dir) / "checkpoints"
    # A write interrupted at step 3: orbax's temporary directory, partly filled.
    (ckpts / "3.orbax-checkpoint-tmp" / "state").mkdir(parents=True)
    (ckpts / "3.orbax-checkpoint-tmp" / "state" / "partial").write_bytes(b"\0" * 10)
    from distillm_jax.run.checkpoints import Checkpoints

    manager = Checkpoints(str(ckpts))
    assert manager.latest_step() == 2
    manager.close()
    c.resume, c.optim.steps = True, 3
    summary = trainer.train(c)
    assert summary["steps"] == 3
    steps = [
        r["step"]
        for r in reporting.read_rows(os.path.join(c.run_dir, "metrics.jsonl"))
        if r["kind"] == "train"
    ]
    assert steps == [1, 2, 3]


@pytest.mark.slow
def test_nan_loss_stops_with_step_and_checkpoint(tmp_path):
    c = alone(
        tmp_path,
        method="sft",
        optim__steps=6,
        eval__generate=False,
    )
    c.optim.lr, c.optim.clip, c.checkpoint.interval = 1e30, 0.0, 1
    says = r"non-finite training metrics at step (\d+) \(([a-z_]+ (nan|-?inf)(, )?)+\): lower optim.lr"
    with pytest.raises(trainer.TrainingError, match=says + r".*last good checkpoint: .*step"):
        trainer.train(c)


@pytest.mark.slow
def test_grad_accumulation_averages_micro_batches(tmp_path):
    def run(name, **kw):
        c = alone(
            tmp_path / name,
            method="sft",
            optim__steps=3,
            eval__generate=False,
            mesh__fsdp=4,  # 4 data shards: a micro-batch of 4 splits over them
            mesh__tensor=2,
            **kw,
        )
        c.optim.lr = 3e-2  # large enough that a different batch shows in the validation loss
        return trainer.train(c)

    whole, accumulated = run("whole"), run("accum", optim__grad_accum=2)
    start, whole, accumulated = (
        whole["initial"]["val_ce"],
        whole["final"]["val_ce"],
        accumulated["final"]["val_ce"],
    )
    # The same rows per update (batch 8 = 2 micro-batches of 4, same order); the mean of the two
    # micro-batch means differs from the token mean over 8 rows only by their token-count weights.
    assert abs(accumulated - whole) < 0.02 * abs(start - whole)


@pytest.mark.slow
def test_seqkd_trains_on_the_teachers_cached_responses(tmp_path):
    c = alone(
        tmp_path,
        method="seqkd",
        optim__steps=2,
        eval__generate=False,
    )
    c.teacher.train_steps, c.student.train_steps = 0, 0  # a random teacher: its outputs are what is checked
    pipeline.run(c)
    path = Path(c.run_dir) / "seqkd_train.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 64 and all(0 < len(r) <= 8 for _, r in rows)  # eval.max_new_tokens = 8
    run = trainer.Run(c)
    assert [p for p, _ in rows] == [list(p) for p, _ in run.train_rows]  # the same prompts, in order
    assert methods.get("seqkd").training_rows(run) == [
        tuple(r) for r in rows
    ]  # read back from the cache, not regenerated


@pytest.mark.slow
def test_lm_loss_on_plain_text(tmp_path):
    text = tmp_path / "owt.jsonl"
    text.write_text(
        "".join(json.dumps({"text": f"Some plain web text number {i}."}) + "\n" for i in range(16))
    )
    c = cfglib.load_file(str(ROOT / "configs" / "gpt2_dolly.py"), "tiny")
    c = trainer.override(c, run_dir=str(tmp_path / "run"), optim__steps=2, eval__generate=False)
    c.loss.lm_coef, c.data.lm_source = 0.5, str(text)
    c.teacher.train_steps = c.student.train_steps = 0  # the distillation stage alone (the pipeline's
    c.data.test_split = ""  # stages with an LM term: tests/test_configs.py, gpt2_dolly from the hub)
    summary = pipeline.run(c)["student"]
    rows = [r for r in reporting.read_rows(os.path.join(c.run_dir, "metrics.jsonl")) if r["kind"] == "train"]
    assert all(r["lm"] > 0 and r["loss"] == pytest.approx(r["sfkl"] + 0.5 * r["lm"], rel=1e-5) for r in rows)
    assert summary["steps"] == 2


@pytest.mark.slow
def test_overlap_mode_trains_like_paper_mode(tmp_path):
    """On-policy SGOs every step, sampled on the current params (paper mode) or up to two updates
    stale while training goes on (overlap mode): both finish and land on a comparable loss."""

    def run(name, **kw):
        c = alone(
            tmp_path / name,
            method="onpolicy",
            optim__steps=5,
            eval__generate=False,
        )
        c.teacher.train_steps, c.student.train_steps = 0, 0
        c.optim.lr, c.eval.interval = 3e-2, 5
        c.student.dropout = 0.0  # the two differ by the SGOs' staleness alone, not by dropout's noise
        return pipeline.run(trainer.override(c, **kw))["student"]

    paper = run("paper")
    overlap = run("overlap", offpolicy__overlap=True, offpolicy__max_staleness=2)
    assert paper["sources"] == overlap["sources"] == {"data": 0, "sgo": 5, "replay": 0}
    start, a, b = paper["initial"]["val_ce"], paper["final"]["val_ce"], overlap["final"]["val_ce"]
    assert a < start - 0.05 and b < start - 0.05  # both learn
    assert abs(a - b) < 0.25 * (start - a)
