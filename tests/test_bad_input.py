"""Each user mistake is one clear line before any compute (or a counted, reported skip for bad rows)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ml_collections import ConfigDict

from distillm_jax import config as cfglib
from distillm_jax import models, trainer
from distillm_jax.data import tokenizers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tiny(tmp_path):
    c = cfglib.load_file(str(ROOT / "configs" / "demo.py"), "tiny")
    c.run_dir = str(tmp_path / "run")
    c.resume = False
    return c


def cli(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", "configs/demo.py:tiny", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def one_line_error(proc, pattern):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert pytest.importorskip("re").search(pattern, lines[0]), lines[0]


def test_cli_unknown_key_and_wrong_type_are_one_line():
    one_line_error(cli("--config.optim.lrr=1e-4"), r"lrr")
    one_line_error(cli("--config.optim.lr=fast"), r"lr")


def test_cli_config_errors_are_one_line(tmp_path):
    one_line_error(
        cli(f"--config.data.source={tmp_path}/nothing.jsonl"), r"data.source .*nothing.jsonl does not exist"
    )
    one_line_error(
        cli("--config.student.path=./no/such/dir"), r"student.path ./no/such/dir is not a checkpoint"
    )


def test_unknown_key_or_type_in_a_config_file(tmp_path):
    c = tiny(tmp_path)
    c.optim.learning_rate = 1e-3
    with pytest.raises(
        cfglib.ConfigError, match=r"unknown config key 'optim.learning_rate'; valid keys here: "
    ):
        cfglib.check(c)
    c = tiny(tmp_path)
    c.optim = ConfigDict({**c.optim.to_dict(), "steps": "ten"})  # a config file that builds its own group
    with pytest.raises(cfglib.ConfigError, match=r"'optim.steps' must be int"):
        cfglib.check(c)
    c = tiny(tmp_path)
    c.method = "distil"
    with pytest.raises(
        cfglib.ConfigError,
        match=r"method 'distil' is not one of sft, kd, seqkd, distillm, imitkd, gkd, onpolicy",
    ):
        cfglib.check(c)
    c = tiny(tmp_path)
    c.loss.name = "skl"
    with pytest.raises(cfglib.ConfigError, match=r"unknown divergence 'skl'"):
        cfglib.check(c)


@pytest.mark.parametrize(
    "key, value, message",
    [
        (
            "replay_ratio",
            "sometimes",
            r"offpolicy.replay_ratio must be one of decreasing, constant, increasing",
        ),
        ("loss_eps", -0.1, r"offpolicy.loss_eps must be >= 0"),
        ("gkd_lambda", 1.5, r"offpolicy.gkd_lambda must be in \[0, 1\]"),
        ("top_p", 0.0, r"offpolicy.top_p in \(0, 1\]"),
        ("max_new_tokens", 40, r"offpolicy.max_new_tokens must be in \[0, 32\]"),
        ("capacity", 4, r"offpolicy.capacity \(4\) must hold at least one micro-batch \(8 rows\)"),
        ("max_staleness", 0, r"offpolicy.overlap needs offpolicy.max_staleness >= 1"),
    ],
)
def test_bad_offpolicy_settings_are_one_line(tmp_path, key, value, message):
    c = tiny(tmp_path)
    c.method, c.offpolicy.overlap = "distillm", True
    c.offpolicy[key] = value
    with pytest.raises(cfglib.ConfigError, match=message):
        cfglib.check(c)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"minillm__clip": 1.5}, r"minillm: need .* ppo_epochs >= 1 and clip in \(0, 1\)"),
        ({"method": "minillm", "optim__grad_accum": 2}, r"method minillm trains whole rollout batches"),
        ({"method": "distillm2", "loss__chunk_size": 16}, r"method distillm2 has no chunked loss"),
        ({"distillm2__beta": 3.0}, r"distillm2.beta must be in \[0, 2\]"),
        ({"student__lora__targets": ("q", "wq")}, r"student.lora: need .* targets among q, k, v, o"),
        ({"teacher__lora__dropout": 1.0}, r"teacher.lora: need .* dropout in \[0, 1\)"),
        ({"eval__draws": 0}, r"eval.draws must be >= 1"),
        ({"compare": ("kd", "sfft")}, r"method 'sfft' is not one of"),
    ],
)
def test_bad_method_settings_are_one_line(tmp_path, changes, message):
    c = trainer.override(tiny(tmp_path), **changes)
    with pytest.raises(cfglib.ConfigError, match=message):
        cfglib.check(c)


def test_dataset_without_the_task_columns(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(json.dumps({"dialog": "a", "summary": "b"}) + "\n")
    c = tiny(tmp_path)
    c.data.source = str(data)
    with pytest.raises(
        cfglib.ConfigError, match=r"lacks column\(s\) dialogue needed by task 'demo'; it has: dialog"
    ):
        trainer.Run(c)


def test_missing_split_file(tmp_path):
    c = tiny(tmp_path)
    c.data.source = str(tmp_path)
    with pytest.raises(cfglib.ConfigError, match=r"no data file for split 'train'"):
        trainer.Run(c)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    c = tiny(tmp_path)
    c.student.path, c.tokenizer = str(tmp_path / "empty"), "demo"
    with pytest.raises(models.CheckpointError, match=r"no config.json in .*empty"):
        trainer.Run(c)


def test_teacher_and_student_tokenizers_differ(tmp_path):
    c = tiny(tmp_path)
    teacher = trainer.build_model(c.teacher, None, trainable=False)
    models.save_pretrained(teacher, str(tmp_path / "teacher"), tokenizer=tokenizers.byte_level())
    c.teacher.path = str(tmp_path / "teacher")  # the student uses the demo tokenizer
    with pytest.raises(cfglib.ConfigError, match=r"teacher tokenizer .* differs from the student's"):
        trainer.Run(c)


def test_empty_responses_and_long_prompts_are_counted(tmp_path, capsys):
    from distillm_jax.data import demo

    rows = demo.examples("train", 12)
    rows[0]["summary"] = "  "
    rows[1]["dialogue"] = " ".join(["Anna: hi."] * 40)
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "validation"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = tiny(tmp_path)
    c.data.source = str(data)
    run = trainer.Run(c)
    assert len(run.train_rows) == 11 and len(run.valid_refs) == 11
    out = capsys.readouterr().out
    assert "train: 11 rows; skipped 1 with an empty response; cut 1 prompts longer than 80 tokens" in out


def test_bad_distributed_settings_are_one_line(tmp_path):
    c = tiny(tmp_path)
    c.distributed.coordinator, c.distributed.num_processes, c.distributed.process_id = "127.0.0.1:9", 2, 2
    with pytest.raises(
        cfglib.ConfigError, match=r"0 <= process_id < num_processes, got '127.0.0.1:9', process 2 of 2"
    ):
        cfglib.check(c)
