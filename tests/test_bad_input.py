"""Each user mistake is one clear line before any compute (or a counted, reported skip for bad rows)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ml_collections import ConfigDict

from distillm_jax import config as cfglib
from distillm_jax import models, trainer
from distillm_jax.data import tokenizers
from distillm_jax.run import build as run_module

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tiny(tmp_path):
    c = cfglib.load_file(str(ROOT / "configs" / "demo.py"), "tiny")
    c.run_dir = str(tmp_path / "run")
    c.resume = False
    return c


def cli(*args, env: dict | None = None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1", **(env or {})}
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
        match=r"method 'distil' is not one of sft, kd, seqkd, distillm, imitkd, gkd, gkd_onpolicy, onpolicy",
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
        ("init_phi", 1.5, r"offpolicy.init_phi must be in \[0, 1\]"),
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
        (
            {"method": "minillm", "minillm__rollouts": 12},
            r"minillm.rollouts \(12\) must be a positive multiple of optim",
        ),
        ({"minillm__gamma": 0.0}, r"minillm: need gamma in \(0, 1\], reward_scale > 0 and reward_clip > 0"),
        ({"loss__lm_kd_ratio": 1.5}, r"loss.lm_kd_ratio must be in \[0, 1\]"),
        ({"method": "distillm2", "loss__chunk_size": 16}, r"method distillm2 has no chunked loss"),
        ({"distillm2__beta": 3.0}, r"distillm2.beta must be in \[0, 2\]"),
        ({"student__lora__targets": ("q", "wq")}, r"student.lora: need .* targets among q, k, v, o"),
        ({"teacher__lora__dropout": 1.0}, r"teacher.lora: need .* dropout in \[0, 1\)"),
        ({"eval__draws": 0}, r"eval.draws must be >= 1"),
        ({"seqkd__top_p": 0.0}, r"seqkd: need temperature >= 0, top_p in \(0, 1\]"),
        ({"distillm2__temperature": -1.0}, r"distillm2: need temperature >= 0"),
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


def test_empty_missing_or_null_responses_and_long_prompts_are_counted(tmp_path, capsys):
    from distillm_jax.data import demo

    rows = demo.examples("train", 12)
    rows[0]["summary"] = "  "
    rows[1]["dialogue"] = " ".join(["Anna: hi."] * 40)
    rows[10] = {"dialogue": rows[10]["dialogue"]}  # the column stops
    rows[11]["summary"] = None
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "validation"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = tiny(tmp_path)
    c.data.source = str(data)
    run = trainer.Run(c)
    assert len(run.train_rows) == 9 and len(run.valid_refs) == 9
    out = capsys.readouterr().out
    said = "train: 9 rows; skipped 3 with an empty or missing response; cut 1 prompts longer than 80 tokens"
    assert said in out


def test_bad_distributed_settings_are_one_line(tmp_path):
    c = tiny(tmp_path)
    c.distributed.coordinator, c.distributed.num_processes, c.distributed.process_id = "127.0.0.1:9", 2, 2
    with pytest.raises(
        cfglib.ConfigError, match=r"0 <= process_id < num_processes, got '127.0.0.1:9', process 2 of 2"
    ):
        cfglib.check(c)


def _leftover(path: Path, name: str) -> dict:
    """A part of an earlier run left in ``path`` (its checkpoints deleted, say)."""
    target = path / name
    if name.endswith(".json") or name.endswith(".jsonl"):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text('{"step": 1}\n')
    else:
        (target / "config.json").parent.mkdir(parents=True)
        (target / "config.json").write_text("{}")
    return {}


def _one_file(path: Path) -> dict:
    path.write_text(json.dumps({"dialogue": "a", "summary": "b"}) + "\n")
    return {"data__source": str(path)}


def _broken_teacher(path: Path) -> dict:
    c = cfglib.load_file(str(ROOT / "configs" / "demo.py"), "tiny")
    teacher = trainer.build_model(c.teacher, None, trainable=False)
    models.save_pretrained(teacher, str(path), tokenizer=tokenizers.byte_level())
    (path / "config.json").write_text('{"model_type": "t5", ')
    return {"teacher__path": str(path), "teacher__train_steps": 0}


def _file_in_the_way(path: Path) -> dict:
    (path / "a_file").write_text("not a folder")
    return {"run_dir": str(path / "a_file" / "run")}


def _gpt2(width: int, positions: int = 128) -> ConfigDict:
    from configs.demo import gpt2

    spec = gpt2(width, 1, 2)
    spec.n_positions = positions
    return spec


# case: (what is set up in the tmp folder -> config changes, the line the pipeline / the trainer says)
BEFORE_LOADING = {
    "teacher and student of different kinds": (
        lambda t: {"teacher__config": _gpt2(32)},
        r"the teacher \(a new gpt2\) is decoder-only and the student \(a new t5\) is encoder-decoder",
        r"the teacher \(a new gpt2\) is decoder-only and the student \(a new t5\) is encoder-decoder",
    ),
    "an unreachable student hub id": (  # the pipeline would SFT the teacher first, the student next
        lambda t: {"student__path": "nobody-here/no-such-model@v1"},
        r"student: nobody-here/no-such-model@v1 is neither a local checkpoint directory nor a downloadable "
        r"hub id at revision v1",
        r"student: nobody-here/no-such-model@v1 is neither",
    ),
    "data.max_length beyond the student's learned positions": (
        lambda t: {"teacher__config": _gpt2(32), "student__config": _gpt2(16, positions=64)},
        r"data.max_length \(112\) is beyond the student \(a new gpt2\)'s 64 learned positions; set "
        r"data.max_length <= 64",
        r"data.max_length \(112\) is beyond the student",
    ),
    "a NaN learning rate": (
        lambda t: {"optim__lr": float("nan")},
        r"optim.lr must be a finite number, got nan",
        r"optim.lr must be a finite number, got nan",
    ),
    "an infinite threshold of the scheduler": (
        lambda t: {"offpolicy__loss_eps": float("inf")},
        r"offpolicy.loss_eps must be a finite number, got inf",
        r"offpolicy.loss_eps must be a finite number, got inf",
    ),
    "no sampling seeds": (
        lambda t: {"eval__seeds": ()},
        r"eval.seeds is empty",
        r"eval.seeds is empty",
    ),
    "checkpoints deleted, metrics left": (
        lambda t: _leftover(t / "run", "metrics.jsonl"),
        r"run already holds a run \(metrics.jsonl\); pass --config.resume=True",
        r"run already holds a run \(metrics.jsonl\); pass --config.resume=True",
    ),
    "a compared student's export left": (
        lambda t: _leftover(t / "run" / "sft", "best"),
        r"run already holds a run \(sft/best\)",
        None,  # the trainer alone writes only its own run_dir
    ),
    "resume with nothing to resume": (
        lambda t: {"resume": True},
        r"--config.resume=True but .*run holds no run to continue; .*--config.start_if_empty=True",
        r"--config.resume=True but .*run has no checkpoint to continue; .*--config.start_if_empty=True",
    ),
    "a finished run's checkpoints deleted, start_if_empty": (
        lambda t: _leftover(t / "run", "final") or {"resume": True, "start_if_empty": True},
        None,  # the pipeline skips a finished stage (its summary.json) instead
        r"run holds a finished run \(final\) whose checkpoints are gone: nothing to continue",
    ),
    "run_dir under a regular file": (
        _file_in_the_way,
        r"cannot write run_dir .*a_file/run \(.*\); choose another run_dir",
        r"cannot write run_dir .*a_file/run \(.*\); choose another run_dir",
    ),
    "a relative data path without ./ that does not exist": (
        lambda t: {"data__source": "no_such_folder/train.jsonl"},  # a path, not a hub id: no network
        r"data.source no_such_folder/train.jsonl does not exist",
        r"data.source no_such_folder/train.jsonl does not exist",
    ),
    "one data file for every split": (
        lambda t: _one_file(t / "rows.jsonl"),
        r"data.source .*rows.jsonl is one file, so data.train_split \('train'\) would be all of its rows",
        r"data.source .*rows.jsonl is one file",
    ),
    "a teacher whose config.json is broken": (
        lambda t: _broken_teacher(t / "teacher"),
        r"corrupt .*teacher/config.json",
        r"corrupt .*teacher/config.json",
    ),
    "a test set written without its name": (
        lambda t: {"data__test_split": "test", "data__test_sets": ("MiniLLM/Vicuna",)},
        r"data.test_sets entry 'MiniLLM/Vicuna': write name=source or name=source#split",
        r"data.test_sets entry 'MiniLLM/Vicuna': write name=source",
    ),
    "a test set whose folder does not exist": (
        lambda t: {"data__test_split": "test", "data__test_sets": (f"vicuna={t}/nowhere",)},
        r"data.test_sets: vicuna's source .*nowhere does not exist",
        r"data.test_sets: vicuna's source .*nowhere does not exist",
    ),
    "a dropout rate of 1": (
        lambda t: {"student__dropout": 1.0},
        r"student.dropout must be in \[0, 1\)",
        r"student.dropout must be in \[0, 1\)",
    ),
    "an unknown student start": (
        lambda t: {"student__start": "scratch"},
        r"student.start must be one of init, pretrained, got 'scratch'",
        r"student.start must be one of init, pretrained",
    ),
    "mesh that does not multiply": (
        lambda t: {"mesh__data": 3},
        r"mesh: data×fsdp×tensor = 3×2×1 does not multiply to the 8 devices present",
        r"does not multiply to the 8 devices present",
    ),
    "a 0 in the mesh": (
        lambda t: {"mesh__fsdp": 0},
        r"mesh: each of data, fsdp, tensor must be >= 1",
        r"mesh: each of data, fsdp, tensor must be >= 1",
    ),
    "a batch the data shards do not divide": (
        lambda t: {"optim__batch_size": 12},
        r"the micro-batch \(optim.batch_size / grad_accum\) \(12\) must split over the mesh's 8 data shards",
        r"must split over the mesh's 8 data shards",
    ),
    "an eval batch the data shards do not divide": (
        lambda t: {"eval__batch_size": 6},
        r"eval.batch_size \(6\) must split over the mesh's 8 data shards",
        r"eval.batch_size \(6\) must split",
    ),
}


ENTRIES = [
    (case, entry)
    for case, (_, *says) in BEFORE_LOADING.items()
    for entry, said in zip(("pipeline", "trainer"), says, strict=True)
    if said is not None
]


@pytest.mark.parametrize("case, entry", ENTRIES)
def test_mistakes_found_before_any_model_loads(tmp_path, monkeypatch, case, entry):
    """Each case is one line, raised before a model is built, and nothing already there is changed."""
    from distillm_jax import pipeline

    prepare, pipeline_says, trainer_says = BEFORE_LOADING[case]
    says = pipeline_says if entry == "pipeline" else trainer_says
    changes = prepare(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the mistake was found")

    monkeypatch.setattr(trainer, "build_model", no_loading)
    monkeypatch.setattr(run_module, "build_model", no_loading)  # what Run calls
    c = trainer.override(tiny(tmp_path), **changes)
    with pytest.raises(cfglib.ConfigError, match=says):
        pipeline.run(c) if entry == "pipeline" else trainer.train(c)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["INT", "TERM"])
def test_ctrl_c_and_sigterm_save_stop_with_their_own_code_and_the_command_continues(tmp_path, sig):
    args = [
        f"--config.run_dir={tmp_path / 'run'}",
        "--config.compare=()",
        "--config.data.test_split=",
        "--config.teacher.train_steps=0",
        "--config.student.train_steps=0",
        "--config.eval.generate=False",
        "--config.checkpoint.interval=100",  # only the stop saves step 2
    ]
    stopped = cli(*args, env={"DISTILLM_KILL_AT_STEP": "2", "DISTILLM_KILL_SIGNAL": sig})
    assert stopped.returncode == 75, stopped.stderr[-2000:]
    assert f"stopped by SIG{sig} at step 2; saved; the same command continues it" in stopped.stdout
    assert "Traceback" not in stopped.stderr and (tmp_path / "run" / "checkpoints" / "2").is_dir()
    if sig == "INT":
        again = cli(*args)
        assert again.returncode == 0, again.stderr[-2000:]
        assert "resumed" in again.stdout and "at step 2 of 4" in again.stdout


@pytest.mark.slow
def test_resuming_with_another_student_shape_and_exporting_over_best_are_one_line(tmp_path):
    c = trainer.override(
        tiny(tmp_path), method="sft", compare=(), data__test_split="", optim__steps=2, eval__generate=False
    )
    c.teacher.train_steps = c.student.train_steps = 0
    trainer.train(c)
    best = Path(c.run_dir) / "best"
    before = {p: p.read_bytes() for p in best.rglob("*") if p.is_file()}
    with pytest.raises(cfglib.ConfigError, match=r"best already exists; an export never writes over"):
        trainer.export_checkpoint(c, None, str(best))  # launch/export.py --out runs/x/best
    assert {p: p.read_bytes() for p in best.rglob("*") if p.is_file()} == before
    wider = trainer.override(c, resume=True, optim__steps=3)
    wider.student.config.d_model, wider.student.config.d_ff = 24, 48
    says = r"checkpoint .*/2 does not match this config's student \("
    with pytest.raises(models.CheckpointError, match=says):
        trainer.train(wider)


@pytest.mark.parametrize(
    "script", ["train.py", "evaluate.py", "export.py", "plan.py", "tpu_pod.sh", "slurm.sh"]
)
def test_help_on_every_launch_script(script):
    """-h / --help shows the script's use, its flags and where the config keys are documented."""
    path = str(ROOT / "launch" / script)
    cmd = ["bash", path] if script.endswith(".sh") else [sys.executable, path]
    for flag in ("--help", "-h"):
        proc = subprocess.run([*cmd, flag], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr[-2000:]
        assert len(proc.stdout.splitlines()) > 3
        if not script.endswith(".sh"):
            assert "--config FILE" in proc.stdout and "distillm_jax/config/defaults.py" in proc.stdout


def test_tpu_pod_needs_a_run_dir_every_worker_sees():
    """The hosts of a slice share no disk: ``tpu_pod.sh train`` without a run_dir, or with one in s3://
    (orbax checkpoints to gs:// only), stops in one line before it reaches any worker."""
    path = str(ROOT / "launch" / "tpu_pod.sh")
    for flags in ((), ("--config.run_dir", "s3://b/run")):
        proc = subprocess.run(["bash", path, "train", "n", "z", *flags], capture_output=True, text=True)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "gs://" in proc.stderr


def test_a_hyphenated_key_is_one_line():
    one_line_error(
        cli("--config.optim.batch-size=8"),
        r"config key optim.batch-size: keys are spelled with underscores "
        r"\(--config.optim.batch_size\)",
    )


def test_ctrl_c_and_sigterm_before_the_first_step_stop_at_once_with_one_line(tmp_path):
    """While jax starts, the config loads or the first programs compile, a signal stops at once: its own
    exit code and one line (a KeyboardInterrupt raised into that start-up used to end in a segmentation
    fault, exit 139, in 3 of 5 tries)."""
    import signal
    import time

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", "configs/demo.py:tiny"]
    for k, (sig, after, code) in enumerate(
        [
            (signal.SIGINT, 0.3, 130),
            (signal.SIGINT, 1.0, 130),
            (signal.SIGINT, 2.5, 130),
            (signal.SIGTERM, 2.0, 75),
        ]
    ):
        run = [*cmd, f"--config.run_dir={tmp_path / f'run{k}'}"]
        proc = subprocess.Popen(
            run, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        time.sleep(after)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
        if "stopped by SIG" in out and " at step " in out:  # a fast machine reached training: saved, 75
            assert proc.returncode == 75, err[-2000:]
            continue
        lines = [x for x in err.splitlines() if x.strip()]
        assert proc.returncode == code, (after, proc.returncode, err[-2000:])
        assert lines == [
            f"error: stopped by {sig.name} at once (no training step was running); what was saved is kept; "
            "the same command continues"
        ], err[-2000:]


def _mountable() -> bool:
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m none /mnt"], capture_output=True
    )
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(
    not shutil.which("unshare") or not _mountable(), reason="needs a private tmpfs mount (unshare)"
)
def test_a_full_disk_is_one_line_leaves_no_half_written_files_and_the_command_continues(tmp_path):
    """The run folder on a 3 MiB tmpfs of its own: the tiny pipeline fills it (an orbax checkpoint write
    fails in a writer thread), exits 74 with one line and no traceback, leaves no ``*.tmp`` export or
    half-written checkpoint; with room made, the same command continues and finishes."""
    disk, logs = tmp_path / "disk", tmp_path / "logs"
    disk.mkdir()
    logs.mkdir()
    train = ROOT / "launch" / "train.py"
    run = f"{sys.executable} {train} --config configs/demo.py:tiny --config.run_dir={disk}/run"
    script = (
        f"mount -t tmpfs -o size=3m none {disk} && cd {ROOT} && "
        f"{{ {run} > {logs}/1.out 2> {logs}/1.err; echo $? > {logs}/1.rc; }} && "
        f"find {disk} -name '*tmp*' > {logs}/left && "
        f"mount -o remount,size=64m {disk} && "
        f"{{ {run} > {logs}/2.out 2> {logs}/2.err; echo $? > {logs}/2.rc; }}"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
    subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env, timeout=900, check=True)
    err = (logs / "1.err").read_text()
    said = [x for x in err.splitlines() if "error" in x.lower() or "Traceback" in x or "Error" in x]
    rc = (logs / "1.rc").read_text().strip()
    assert rc == "74" and len(said) == 1, (rc, said[:5], (logs / "1.out").read_text()[-1500:])
    assert said[0].startswith("error: no space left on the device"), said
    assert "free space or choose a run_dir elsewhere, then run the same command" in said[0]
    assert (logs / "left").read_text().strip() == ""  # no final.tmp, no *.orbax-checkpoint-tmp
    assert (logs / "2.rc").read_text().strip() == "0", (logs / "2.err").read_text()[-3000:]
    out = (logs / "2.out").read_text()
    # what was complete is kept (a stage "done before", or one "resumed" from its checkpoint); it ends
    assert ("done before" in out or "resumed" in out) and "note: one training run per method" in out
