"""Every program of a stage compiled for a TPU slice from this CPU host (``config/compiled.py``,
``launch/plan.py --topology``): the compiler's argument bytes are the exact shards of the params and
optimizer state, two slices and both kinds of model compile, scan and remat cut what they should, and a
stage that cannot fit is refused in one line with the change that makes it fit."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from ml_collections import ConfigDict

from distillm_jax.config import ConfigError, compiled, planner
from distillm_jax.config.defaults import get_config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    __import__("importlib").util.find_spec("libtpu") is None,
    reason=f"TPU's compiler is not installed: {compiled.LIBTPU} (requirements-dev.txt installs it)",
)
# Dimensions in whole TPU tiles (8 x 128), so that no parameter shard is padded in HBM: the compiler's
# bytes are then the exact bytes of the shards.
ALIGNED = dict(
    model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2, head_dim=128,
    num_attention_heads=8, num_key_value_heads=8, vocab_size=512, max_position_embeddings=256,
    tie_word_embeddings=False,
)  # fmt: skip


def _config(method: str, model: dict = ALIGNED, **student) -> ConfigDict:
    c = get_config()
    c.method = method
    c.student.config = ConfigDict(model, type_safe=False)
    c.teacher.config = ConfigDict(model, type_safe=False)
    c.student.update(student)
    c.optim.batch_size = 8
    c.data.max_prompt_length, c.data.max_length = 64, 128
    c.eval.generate = False
    return c


def _exact(config: ConfigDict, topology: str) -> tuple[int, int]:
    """(compiler's resident bytes, exact bytes of the states) for the train step of ``config``."""
    seen = {}
    real = compiled._compile

    def spy(name, fn, args, states):
        if name == "train step":
            seen["exact"] = compiled._bytes([a for i, a in enumerate(args) if i in states])
            seen["scalars"] = sum(x.ndim == 0 for i in states for x in jax.tree.leaves(args[i]))
        return real(name, fn, args, states)

    compiled._compile = spy
    try:
        plan = compiled.plan_stage(config, topology)
    finally:
        compiled._compile = real
    return plan, seen


@pytest.mark.parametrize(
    ("method", "topology"), [("sft", "v5e:2x2"), pytest.param("kd", "v6e:2x2", marks=pytest.mark.slow)]
)
def test_argument_bytes_are_the_exact_parameter_and_optimizer_shards(method, topology):
    plan, seen = _exact(_config(method), topology)
    # A 0-d array (AdamW's step count) takes one 512-byte tile in HBM instead of its 4 bytes.
    assert 0 <= plan.resident - seen["exact"] <= 512 * seen["scalars"], (plan.resident, seen)
    parts = planner.plan(_config(method), 4)  # the planner's exact part: the same shards
    states = parts["student params"] + parts["AdamW state"] + parts.get("teacher params", 0)
    assert 0 <= seen["exact"] - states <= 8 * seen["scalars"]
    assert plan.devices == 4 and plan.chip.kind in ("TPU v5 lite", "TPU v6 lite")
    train = plan.programs[0]
    if method == "sft":  # params and optimizer state are donated: their outputs reuse the inputs' bytes
        assert abs(train.aliased - seen["exact"]) <= 512 * seen["scalars"]
    assert 0.8 < train.flops / plan.formula_flops < 1.5
    assert plan.fits and plan.peak < plan.chip.hbm


@pytest.mark.slow
def test_tiny_paper_configs_compile_for_two_slices():
    """Both kinds of model, every program of a distillation stage (train, eval, samplers), two slices."""
    from distillm_jax import config as cfglib
    from distillm_jax import pipeline

    for name, topology in (("t5_samsum", "v5e:2x2"), ("gpt2_dolly", "v4:2x2x1")):
        c = cfglib.load_file(str(ROOT / "configs" / f"{name}.py"), "tiny")
        distill = next(s for s in pipeline.stages(c, planning=True) if s.name == "distill")
        plan = compiled.plan_stage(distill.config, topology)
        names = [p.name for p in plan.programs]
        assert names == ["train step", "eval step", "eval sampler", "student sampler"], names
        assert all(p.arguments > 0 and p.flops > 0 and p.seconds > 0 for p in plan.programs)
        assert plan.devices == 4 and plan.fits
        assert plan.chip.kind == ("TPU v4" if name == "gpt2_dolly" else "TPU v5 lite")


@pytest.mark.slow
def test_remat_and_scan_change_the_program_not_the_parameters():
    """A scanned stack compiles one layer body (a program of a fraction of the instructions: what
    compile time grows with) and counts its FLOPs at full depth; rematerialising it keeps only each
    layer's input instead of every layer's activations; the resident state is the same bytes in all."""
    deep = dict(ALIGNED, num_hidden_layers=4, max_position_embeddings=256)
    settings = {"loop": (False, "none"), "scan": (True, "none"), "scan+remat": (True, "full")}
    plans = {}
    for how, (scan, remat) in settings.items():
        c = _config("sft", deep, scan_layers=scan, remat=remat)
        c.data.max_prompt_length, c.data.max_length = 128, 256  # long rows: activations dominate
        plans[how] = compiled.plan_stage(c, "v5e:2x2")
    train = {how: plan.programs[0] for how, plan in plans.items()}
    assert plans["loop"].resident == plans["scan"].resident == plans["scan+remat"].resident
    assert train["scan"].instructions < 0.65 * train["loop"].instructions  # 4 layer bodies -> 1
    assert train["scan"].flops == pytest.approx(train["loop"].flops, rel=0.02)
    assert train["scan+remat"].flops > train["scan"].flops  # the forward pass again, in the backward
    assert train["scan+remat"].temporaries < 0.7 * train["scan"].temporaries


@pytest.mark.slow
def test_a_stage_that_cannot_fit_is_refused_in_one_line_with_the_change_that_fits(tmp_path):
    """The plain loss's [rows, T, V] logits of a 64k vocabulary at 32 rows per chip overflow a v5e (the
    compiler refuses the step): the CLI exits 2 with one line naming the setting that fits, found by
    compiling it (rematerialisation alone does not: the logits are outside the layers)."""
    big = dict(ALIGNED, vocab_size=65536, num_hidden_layers=1, max_position_embeddings=512)
    config = tmp_path / "big.py"
    config.write_text(
        "from ml_collections import ConfigDict\n"
        "from distillm_jax.config import defaults\n\n\n"
        "def get_config():\n"
        "    c = defaults()\n"
        "    c.method = 'sft'\n"
        f"    c.student.config = ConfigDict({big!r}, type_safe=False)\n"
        "    c.optim.batch_size, c.loss.chunk_size = 128, 0\n"
        "    c.data.max_prompt_length, c.data.max_length = 256, 512\n"
        "    c.eval.generate, c.eval.batch_size = False, 8\n"
        "    return c\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "launch/plan.py", "--config", str(config), "--topology", "v5e:2x2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1, proc.stderr
    assert (
        "more than the 15.75 GiB of a TPU v5 lite: student.remat=full and optim.grad_accum=2 makes it fit"
        in error[0]
    )
    assert "refused by the compiler: HBM exhausted" in proc.stdout and "does NOT fit" in proc.stdout


def test_a_bad_slice_name_or_a_missing_compiler_is_one_line(monkeypatch):
    with pytest.raises(ConfigError, match="give a TPU slice as jax names it"):
        compiled.topology("v5litepod-4")
    with pytest.raises(ConfigError, match=r"topology v5e:3x3: "):
        compiled.topology("v5e:3x3")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "libtpu" else real(n, *a))
    with pytest.raises(ConfigError, match=r"needs TPU's compiler: pip install 'libtpu==0.0.42.\*'"):
        compiled.topology("v5e:2x2")
