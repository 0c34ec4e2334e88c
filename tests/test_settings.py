"""Typed settings built once from a config, and the defaults chosen for speed (the loss form)."""

import sys
from pathlib import Path

import jax
import pytest

from distillm_jax import config as cfglib
from distillm_jax import losses, trainer
from distillm_jax.config import settings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def demo(**changes):
    return trainer.override(cfglib.load_file(str(ROOT / "configs" / "demo.py"), "tiny"), **changes)


@pytest.mark.parametrize(
    "vocab,dtype,backend,want",
    [
        (50257, "float32", "cpu", losses.AUTO_CHUNK),  # measured: 1.44× the train step's tokens/s
        (151936, "float32", "cpu", losses.AUTO_CHUNK),
        (32000, "bfloat16", "gpu", losses.AUTO_CHUNK),  # 0.9–1.0× the time, 1/6 of the memory
        (151936, "float32", "gpu", 0),  # chunked is 1.2–1.3× slower in float32 on an H200
        (151936, "float32", "tpu", 0),
        (1000, "float32", "cpu", 0),  # little to save below 32k
        (31999, "bfloat16", "gpu", 0),
    ],
)
def test_the_loss_form_is_chosen_by_vocabulary_backend_and_dtype(vocab, dtype, backend, want):
    assert losses.auto_chunk_size(vocab, dtype, backend) == want


def test_default_loss_form_reaches_the_train_step(monkeypatch):
    """``loss.chunk_size`` -1 (the default) resolves per run; a value set by hand is kept; a method
    without a chunked loss gets the plain form; below -1 is refused in one line."""
    c = demo(method="kd")
    assert c.loss.chunk_size == -1
    assert settings.build(c, 50257).loss.chunk_size == (
        losses.AUTO_CHUNK if jax.default_backend() == "cpu" else 0
    )
    assert settings.build(c, 500).loss.chunk_size == 0
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert settings.build(c, 50257).loss.chunk_size == 0  # float32 student
    c.student.dtype = "bfloat16"
    assert settings.build(c, 50257).loss.chunk_size == losses.AUTO_CHUNK
    assert settings.build(trainer.override(c, loss__chunk_size=0), 50257).loss.chunk_size == 0
    assert settings.build(trainer.override(c, loss__chunk_size=64), 500).loss.chunk_size == 64
    mini = trainer.override(c, method="minillm", loss__name="rkl")
    assert settings.build(mini, 50257).loss.chunk_size == 0  # MiniLLM's loss has no chunked form
    with pytest.raises(cfglib.ConfigError, match=r"loss.chunk_size must be -1 .* got -2"):
        cfglib.check(trainer.override(c, loss__chunk_size=-2))


def test_settings_are_frozen_and_typed():
    s = settings.build(demo(), 500)
    assert s.optim.micro == s.optim.batch_size // s.optim.grad_accum
    assert s.new_tokens(s.eval) == (s.eval.max_new_tokens or s.data.lengths.max_response)
    assert s.method.name == "distillm" and s.method.adaptive
    with pytest.raises(AttributeError):
        s.seed = 1
