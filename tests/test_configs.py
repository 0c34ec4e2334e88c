"""The paper configs (configs/*.py): every full config passes the start-up checks, the ``:tiny`` variants
use the same method, loss, task and model family as their full config, and each ``:tiny`` variant trains
end to end (random tiny models of the family, the shipped data sample, 3 steps on the 8 CPU devices);
the OpenLLaMA one as the paper's LoRA student."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from distillm_jax import config as cfglib
from distillm_jax import lora, models, pipeline, reporting, trainer
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
    assert (c.method, c.loss.name, c.loss.alpha) == ("distillm", "srkl", 0.1)
    assert (c.offpolicy.loss_eps, c.offpolicy.capacity, c.offpolicy.replay_ratio) == (0.1, 4000, "decreasing")
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
    "arg, method, loss, params",  # PAPER.md §3
    [
        ("gkd", "gkd", "jsd", {"beta": 0.1}),
        ("tiny,imitkd", "imitkd", "fkl", {}),
        ("kd,tiny", "kd", "fkl", {}),
        ("onpolicy", "onpolicy", "srkl", {"alpha": 0.1}),
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


@pytest.mark.parametrize("name", PAPER)
def test_tiny_variant_trains_end_to_end(name, tmp_path, quick_compiles):
    c = load(name, "tiny")
    c.run_dir = str(tmp_path / name)
    results = pipeline.run(c)
    s = results["student"]
    assert s["steps"] == c.optim.steps == 3
    run = Path(c.run_dir)
    assert (run / "final" / "config.json").exists()
    assert json.loads((run / "final" / "config.json").read_text())["model_type"] == FAMILY[name]
    rows = reporting.read_rows(str(run / "metrics.jsonl"))
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 2, 3]
    final = s["final"]
    assert s["metric"] in final and "val_ce" in final and "val_srkl" in final
    assert all(math.isfinite(v) for v in final.values()), final
    if name == "openllama_dolly":
        check_lora_export(c, tmp_path)


def check_lora_export(c, tmp_path):
    """The LoRA student (the paper's r 16, α 64, dropout 0.1 on q and v) trained only its adapters: its
    merged export is the frozen base plus (α/r)·B·A of the PEFT-layout adapters, every other weight the
    base's exactly; exporting its last checkpoint gives the same weights."""
    assert (c.student.lora.rank, c.student.lora.alpha, c.student.lora.dropout) == (16, 64.0, 0.1)
    base = trainer.build_model(c.student, None, trainable=True)  # the same seed: the frozen weights
    models.save_pretrained(lora.merged(base), str(tmp_path / "base"))  # fresh adapters: B = 0
    base_t = hf_io.open_checkpoint(str(tmp_path / "base"))
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
