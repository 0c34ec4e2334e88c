"""The paper configs (configs/*.py): every full config passes the start-up checks, the ``:tiny`` variants
use the same method, loss, task and model family as their full config, and each ``:tiny`` variant trains
end to end (random tiny models of the family, the shipped data sample, 3 steps on the 8 CPU devices);
the OpenLLaMA one as the paper's LoRA student."""

import ast
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import hub_assets
import numpy as np
import pytest
from hub_stub import HubStub, hub_env

from configs import paper
from distillm_jax import config as cfglib
from distillm_jax import pipeline, reporting, trainer
from distillm_jax.models import hf_io

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # config files import configs.base

PAPER = ["gpt2_dolly", "opt_dolly", "openllama_dolly", "qwen_dolly", "t5_samsum", "mt5_iwslt"]
FAMILY = {
    "gpt2_dolly": "gpt2",
    "opt_dolly": "opt",
    "openllama_dolly": "llama",
    "qwen_dolly": "qwen2",
    "t5_samsum": "t5",
    "mt5_iwslt": "mt5",
}


def load(name: str, arg: str = ""):
    return cfglib.load_file(str(ROOT / "configs" / f"{name}.py"), arg)


def test_every_config_file_is_covered():
    files = {p.stem for p in (ROOT / "configs").glob("*.py")} - {"__init__", "base", "demo", "tiny", "paper"}
    assert files == set(PAPER)


@pytest.mark.parametrize("name", PAPER)
def test_full_config_passes_the_checks(name):
    c = load(name)
    cfglib.check(c)
    assert c.teacher.path and c.student.path and c.teacher.path != c.student.path
    assert not c.teacher.config and not c.student.config
    # The skew divergence and φ's settings of the official script for the pair (docs/method.md).
    loss, eps, phi = {"gpt2_dolly": ("sfkl", 0.1, 0.0), "openllama_dolly": ("srkl", 0.2, 0.2)}.get(
        name, ("srkl", 0.1, 0.0)
    )
    assert (c.method, c.loss.name, c.loss.alpha) == ("distillm", loss, 0.1)
    assert (c.offpolicy.loss_eps, c.offpolicy.init_phi) == (eps, phi)
    assert (c.offpolicy.capacity, c.offpolicy.replay_ratio) == (4000, "decreasing")
    assert c.optim.epochs > 0 and c.eval.temperature == 1.0 and c.eval.no_repeat_ngram_size == 6
    assert c.loss.lm_coef == 0.0 and c.mesh.fsdp == -1


@pytest.mark.parametrize("name", PAPER)
def test_tiny_variant_keeps_the_setup(name):
    full, small = load(name), load(name, "tiny")
    cfglib.check(small)
    assert (small.method, small.loss.name, small.data.task) == (full.method, full.loss.name, full.data.task)
    assert small.teacher.path == small.student.path == ""
    assert small.teacher.config.model_type == small.student.config.model_type == FAMILY[name]
    assert Path(small.data.source).is_absolute()
    assert (Path(small.data.source) / "train.jsonl").exists()
    assert (Path(small.data.source) / "validation.jsonl").exists()
    assert bool(small.loss.chunk_size) == bool(full.loss.chunk_size)
    with pytest.raises(ValueError, match="tiny"):
        load(name, "huge")
    with pytest.raises(ValueError, match="one method"):
        load(name, "gkd,imitkd")


@pytest.mark.parametrize(
    "arg, method, loss, params",  # docs/method.md
    [
        ("gkd", "gkd", "jsd", {"beta": 0.1}),
        ("gkd_onpolicy", "gkd_onpolicy", "jsd", {"beta": 0.1}),
        ("tiny,imitkd", "imitkd", "fkl", {}),
        ("kd,tiny", "kd", "fkl", {}),
        ("onpolicy", "onpolicy", "sfkl", {"alpha": 0.1}),  # DistiLLM's loss of the pair (SKL for GPT-2 base)
        ("sft", "sft", "fkl", {}),
        ("tiny,minillm", "minillm", "rkl", {}),
        ("distillm2", "distillm2", "sfkl", {"alpha": 0.1}),
    ],
)
def test_paper_methods_as_config_arguments(arg, method, loss, params):
    c = load("gpt2_dolly", arg)
    cfglib.check(c)
    assert (c.method, c.loss.name) == (method, loss)
    assert cfglib.loss_params(c) == params
    assert c.run_dir.endswith("_" + method)  # never the DistiLLM run's folder
    assert ("tiny" in arg) == (c.tokenizer == "bytes")


@pytest.mark.parametrize(
    "name, arg, start, batch, stages",  # the authors' scripts for each pair (docs/method.md)
    [
        ("gpt2_dolly", "kd,scripts", "pretrained", 8, ["distill"]),  # kd_base.sh: pretrained, 2 a GPU
        ("gpt2_dolly", "seqkd,scripts", "pretrained", 8, ["distill"]),
        ("gpt2_dolly", "sft,scripts", "pretrained", 32, ["distill"]),
        ("gpt2_dolly", "gkd,scripts", "init", 8, ["student_sft", "distill"]),  # gkd_base.sh: the init
        ("gpt2_dolly", "scripts", "init", 32, ["student_sft", "distill"]),
        ("gpt2_dolly", "kd", "init", 32, ["student_sft", "distill"]),  # the paper's text: every one
        ("opt_dolly", "kd,scripts", "pretrained", 32, ["teacher", "distill"]),
        ("openllama_dolly", "kd,scripts", "pretrained", 16, ["teacher", "distill"]),
        ("gpt2_dolly", "onpolicy,scripts", "init", 32, ["student_sft", "distill"]),  # no script: paper's
    ],
)
def test_baselines_start_and_batch_as_the_paper_or_the_scripts(name, arg, start, batch, stages):
    """The paper's text starts every student from the SFT'd init at the pair's batch; ``:scripts`` as
    the authors' script for that method and pair: from the pretrained model (no init stage) or the
    init, at its rows per GPU times 4 GPUs."""
    c = load(name, arg)
    cfglib.check(c)
    assert (c.student.start, c.optim.batch_size) == (start, batch)
    assert [s.name for s in pipeline.stages(c)] == stages
    distill = pipeline.stages(c)[-1].config
    assert (distill.student.path == c.student.path) == (start == "pretrained")


def test_scripts_setting_only_where_the_authors_released_scripts():
    for name in ("t5_samsum", "mt5_iwslt", "qwen_dolly"):
        with pytest.raises(ValueError, match="no 'scripts' setting"):
            load(name, "scripts")


def test_openllama_runs_its_scripts_rates():
    """The teacher's LoRA SFT as sft_7B_lora.sh, KD and SeqKD with their scripts' loss mix and rate;
    DistiLLM with the script's φ settings."""
    c = load("openllama_dolly")
    assert (c.teacher.train_lr, c.teacher.train_epochs, c.teacher.lora.rank) == (5e-4, 20, 16)
    assert (c.offpolicy.init_phi, c.offpolicy.loss_eps, c.optim.lr, c.loss.kd_ratio) == (0.2, 0.2, 5e-4, 1.0)
    kd, seqkd = load("openllama_dolly", "kd"), load("openllama_dolly", "seqkd")
    assert (kd.loss.kd_ratio, kd.optim.lr, seqkd.loss.kd_ratio, seqkd.optim.lr) == (0.5, 1e-5, 0.5, 5e-4)


def test_dolly_configs_test_the_papers_five_sets():
    c = load("gpt2_dolly")
    names = [n for n, _, _ in cfglib.test_sets(c)]
    assert names == ["dolly", "self-inst", "vicuna", "sinst", "uinst"]
    assert cfglib.test_sets(c)[-1][2] == "test[:10000]" and cfglib.test_sets(c)[1][2] == "test"
    assert [n for n, _, _ in cfglib.test_sets(load("t5_samsum"))] == ["samsum"]
    small = load("gpt2_dolly", "tiny")
    cfglib.check(small)
    assert all(Path(src).is_dir() for _, src, _ in cfglib.test_sets(small)[1:])


def test_minillm_runs_at_its_authors_settings():
    """MiniLLM's own recipe, not DistiLLM's rate and length (docs/method.md)."""
    c = load("gpt2_dolly", "minillm")
    cfglib.check(c)
    o = c.optim
    assert (o.lr, o.end_lr, o.warmup_steps, o.b2, o.weight_decay) == (5e-6, 5e-6, 100, 0.95, 1e-6)
    assert (o.batch_size, o.grad_accum, o.epochs, c.minillm.rollouts) == (256, 8, 10, 256)
    assert (c.minillm.ppo_epochs, c.minillm.gamma, c.minillm.reward_scale, c.loss.lm_kd_ratio) == (
        4,
        0.95,
        0.5,
        0.5,
    )
    assert load("gpt2_dolly", "").optim.lr == 5e-4  # DistiLLM's own run keeps the pair's


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A stand-in of the hub (127.0.0.1) holding every tiny config's pair as .bin-only checkpoints (the
    teacher's on refs/pr/1, sharded) with trained-on-the-spot tokenizers, and the tasks' datasets in the
    forms that load today."""
    root = tmp_path_factory.mktemp("hub")
    overrides = {}
    for name in PAPER:
        c = load(name, "tiny")
        overrides[name] = hub_assets.build(root, c.teacher.config.to_dict(), c.student.config.to_dict(), name)
    hub_assets.build_datasets(root)
    with HubStub(root) as stub:
        yield stub, overrides


@pytest.mark.slow
@pytest.mark.parametrize("name", PAPER)
def test_tiny_variant_runs_the_pipeline_from_the_hub(name, hub, tmp_path):
    """The user's command on each config's tiny variant, with the models and data named by hub ids as
    the full config does, through the hub's HTTP API: teacher SFT, student init, distillation and the
    test split over the seeds, in one command; run again, every stage is skipped."""
    stub, overrides = hub
    c = load(name, "tiny")
    run = tmp_path / name
    args = {**overrides[name], "run_dir": str(run), "data.source": hub_assets.SOURCES[c.data.task]}
    if c.data.task == "dolly":  # MiniLLM's raw.jsonl: the dev rows first; its other test sets' repos
        args |= {"data.train_split": "train[8:]", "data.valid_split": "train[:8]"}
        args["data.test_sets"] = repr(paper.TEST_SETS)  # the full config's hub ids
    if name == "gpt2_dolly":  # the paper's LM term on OpenWebText, streamed from its parquet export
        args |= {"loss.lm_coef": "1.0", "data.lm_source": hub_assets.OPENWEBTEXT, "data.lm_max_rows": "8"}
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", f"configs/{name}.py:tiny"]
    cmd += [f"--config.{k}={v}" for k, v in args.items()]
    env = {**os.environ, **hub_env(stub, tmp_path / "hf"), "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
    if name == "t5_samsum":  # killed inside the distillation (step 3 of 3, after the step-2 checkpoint)
        killed = {**env, "DISTILLM_KILL_AT_STEP": "3"}  # the SFT stages have 2 steps: never reached
        proc = subprocess.run(cmd, cwd=ROOT, env=killed, capture_output=True, text=True, timeout=600)
        assert proc.returncode == -9 and "stage 3/4 distill" in proc.stdout, proc.stderr[-3000:]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    if name == "t5_samsum":  # the same command continued where it stopped
        assert out.count("done before") == 2 and "resumed" in out and "at step 2 of 3" in out
    for i, stage in enumerate(("teacher", "student_sft", "distill", "test"), 1):
        assert f"stage {i}/4 {stage}" in out
    assert "warning: the teacher" not in out  # it was fine-tuned in stage 1
    for stage in ("teacher", "student_sft", ""):
        assert (run / stage / "best" / "config.json").exists(), stage
    rows = reporting.read_rows(str(run / "metrics.jsonl"))
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 2, 3]
    final = json.loads((run / "summary.json").read_text())["final"]
    assert all(math.isfinite(v) for v in final.values()), final
    if name == "gpt2_dolly":
        assert all(r["lm"] > 0 for r in rows if r["kind"] == "train")
    test = json.loads((run / "test.json").read_text())
    assert set(test) == {"teacher", "student init", "student distillm"}
    for scores in test.values():
        assert len(scores["scores"]) == 2 and math.isfinite(scores["val_ce"])
    assert f"test ({c.data.task}: test):" in out and "± " in out
    for test_set in hub_assets.TEST_SETS if c.data.task == "dolly" else ():  # a table per test set
        other = json.loads((run / f"test_{test_set}.json").read_text())
        assert set(other) == set(test) and all(len(s["scores"]) == 2 for s in other.values())
        assert f"test ({test_set}: test" in out
    exported = json.loads((run / "best" / "config.json").read_text())
    assert exported["model_type"] == FAMILY[name] and exported["vocab_size"] == hub_assets.VOCAB
    downloads = [r for r in stub.requests if "/resolve/" in r]
    assert any(".bin" in r for r in downloads) and not any(".safetensors" in r for r in downloads)
    assert not stub.errors
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    sets = 1 + (len(hub_assets.TEST_SETS) if c.data.task == "dolly" else 0)  # each test set's table cached
    assert again.returncode == 0 and again.stdout.count("done before") == 3 + sets, again.stderr[-2000:]
    if name == "openllama_dolly":
        distill = next(s.config for s in pipeline.stages(trainer_override(c, args)) if s.name == "distill")
        check_lora_export(distill, tmp_path)


def trainer_override(c, args: dict):
    """``c`` with ``--config.a.b=v`` style overrides (values as strings, typed like the defaults)."""
    for key, value in args.items():
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        if isinstance(node[leaf], tuple):
            node[leaf] = ast.literal_eval(value)
        else:
            node[leaf] = type(node[leaf])(value) if node[leaf] is not None else value
    return c


def check_lora_export(c, tmp_path):
    """The LoRA student (the paper's r 16, α 64, dropout 0.1 on q and v) trained only its adapters: its
    merged export is the frozen base plus (α/r)·B·A of the PEFT-layout adapters, every other weight the
    base's exactly; exporting its last checkpoint gives the same weights."""
    assert (c.student.lora.rank, c.student.lora.alpha, c.student.lora.dropout) == (16, 64.0, 0.1)
    base_t = hf_io.open_checkpoint(c.student.path)  # the student's init: the frozen weights
    final = Path(c.run_dir) / "final"
    merged_t = hf_io.open_checkpoint(str(final))
    adapter = hf_io.read_safetensors(str(final / "adapter" / "adapter_model.safetensors"))
    config = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (16, 64)
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    prefix, suffix = "base_model.model.", ".lora_A.weight"
    adapted = {k.removeprefix(prefix).removesuffix(suffix) for k in adapter if k.endswith(suffix)}
    assert len(adapted) == 2  # one layer, q and v
    for name, w in base_t.items():
        module = name.removesuffix(".weight")
        if module not in adapted:
            np.testing.assert_array_equal(merged_t[name], w)  # every frozen weight exactly as it was
            continue
        a, b = adapter[f"{prefix}{module}.lora_A.weight"], adapter[f"{prefix}{module}.lora_B.weight"]
        assert np.abs(b).max() > 0  # the adapters trained
        np.testing.assert_allclose(merged_t[name], w + (64 / 16) * b @ a, atol=1e-6)
    # launch/export.py's path: the last checkpoint (adapters only) over the base, merged
    exported = hf_io.open_checkpoint(trainer.export_checkpoint(c, out_dir=str(tmp_path / "export")))
    for name, w in merged_t.items():
        np.testing.assert_array_equal(exported[name], w)


def test_minillm_and_distillm2_switch_off_the_chunked_loss():
    for method in ("minillm", "distillm2"):
        c = load("qwen_dolly", method)  # the Qwen pair chunks its loss by default
        cfglib.check(c)
        assert c.loss.chunk_size == 0
    c = load("qwen_dolly")
    c.method = "minillm"
    with pytest.raises(cfglib.ConfigError, match="no chunked loss"):
        cfglib.check(c)
