"""The memory planner: exact parameter shards, and a plan that will not fit refused in one line."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from flax import nnx

from distillm_jax import config as cfglib
from distillm_jax import lora, sharding, trainer
from distillm_jax.config import planner, settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("fsdp", [1, 8])
def test_parameter_shards_are_exact(fsdp):
    """What the planner computes from shapes and axes alone is what a device holds once placed."""
    c = cfglib.load_file(str(ROOT / "configs" / "gpt2_dolly.py"), "tiny")
    c.mesh.fsdp = fsdp
    parts = planner.plan(c, fsdp)
    mesh = sharding.make_mesh(1, fsdp, 1) if fsdp > 1 else None
    for role, key in (("student", "student params"), ("teacher", "teacher params")):
        model = trainer.build_model(c[role], mesh, trainable=role == "student")
        leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
        held = sum(x.addressable_shards[0].data.nbytes for x in leaves)
        assert parts[key] == held, role
    assert parts["AdamW state"] == 2 * parts["student params"] == 2 * parts["gradients"]
    assert parts["total"] > parts["student params"] + parts["teacher params"] + parts["activations (est.)"]


@pytest.mark.slow
def test_a_plan_that_does_not_fit_is_refused_in_one_line():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "launch/plan.py", "--config", "configs/demo.py", "--devices", "1", "--memory_gib"]
    proc = subprocess.run([*cmd, "0.01"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(
        "error: stage student_sft: the run needs about"
    )
    assert "teacher params" in proc.stdout and "activations (est.)" in proc.stdout
    assert "stage student_sft (sft" in proc.stdout and "stage distill (distillm" in proc.stdout
    ok = subprocess.run([*cmd, "16"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert ok.returncode == 0 and ok.stdout.strip().endswith("every stage fits"), ok.stderr


@pytest.mark.slow
def test_activation_estimate_matches_the_compiled_step():
    """The planner's activation figure against XLA's compiled scratch memory of the real train step."""
    import jax.numpy as jnp
    from ml_collections import ConfigDict

    from distillm_jax import step
    from distillm_jax.data import batching

    def gpt2(d, heads):
        return ConfigDict(
            {"model_type": "gpt2", "n_embd": d, "n_layer": 2, "n_head": heads, "vocab_size": 4096},
            type_safe=False,
        )

    c = cfglib.load_file(str(ROOT / "configs" / "gpt2_dolly.py"), "kd,tiny")
    c.teacher.config, c.student.config = gpt2(256, 4), gpt2(128, 2)
    c.optim.batch_size, c.data.max_prompt_length, c.data.max_length = 8, 64, 128
    c.mesh.fsdp, c.eval.generate = 1, False
    estimate = planner.plan(c, 1)["activations (est.)"]
    student = trainer.build_model(c.student, None, trainable=True)
    teacher = trainer.build_model(c.teacher, None, trainable=False)
    fn, params, opt = step.make_train_step(
        student, teacher, settings.build(c, 4096).optim.adamw(10), settings.loss_config(c, 4096)
    )
    rows = [(list(range(3, 67)), [*range(5, 68), 1])] * 8
    batch = {
        k: jnp.asarray(v) for k, v in batching.decoder_only_batch(rows, batching.Lengths(64, 128), 0).items()
    }
    compiled = fn.lower(params, opt, nnx.state(teacher), batch).compile()
    measured = compiled.memory_analysis().temp_size_in_bytes
    assert 0.75 < estimate / measured < 1.3, (estimate / 2**20, measured / 2**20)


def test_lora_student_plans_adapters_only_for_gradients_and_adamw():
    c = cfglib.load_file(str(ROOT / "configs" / "openllama_dolly.py"), "tiny")  # LoRA r 16 on q, v
    parts = planner.plan(c, 8)
    student = trainer.build_model(c.student, None, trainable=True)
    adapters = sum(x.nbytes for x in jax.tree.leaves(nnx.state(student, lora.TRAINABLE)))
    assert parts["LoRA adapters"] == parts["gradients"] == adapters > 0
    assert parts["AdamW state"] == 2 * adapters
    c.student.lora.rank = 0
    assert planner.plan(c, 8)["gradients"] == parts["student params"]


@pytest.mark.parametrize("where", ["offline", "unreachable"])
def test_planning_without_the_hub(tmp_path, where):
    """The paper configs' models plan offline (their shapes ship in ``models/shapes.py``); a hub id the
    package does not know is one line naming the model, in seconds (transformers' AutoConfig retried for
    half a minute, then failed without naming it)."""
    import time

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    env.update({"HF_HUB_OFFLINE": "1"} if where == "offline" else {"HF_ENDPOINT": "http://127.0.0.1:9"})
    cmd = [sys.executable, "launch/plan.py", "--config", "configs/gpt2_dolly.py", "--devices", "16"]
    cmd += ["--memory_gib", "32"]
    known = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert known.returncode == 0 and known.stdout.strip().endswith("every stage fits"), known.stderr[-3000:]
    start = time.monotonic()
    proc = subprocess.run(
        [*cmd, "--config.student.path=someorg/unknown-model"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    took = time.monotonic() - start
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: ") and "someorg/unknown-model" in lines[0]
    assert took < 20, took  # no retries (the start-up itself takes ~5 s)
