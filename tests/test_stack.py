"""Scanning the layers and rematerialising them change the program, not the numbers: the same losses
and gradients as the per-layer loop, for every family, with dropout on (the same masks)."""

from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from distillm_jax import models
from distillm_jax.data import batching
from distillm_jax.models import dropout, stack
from distillm_jax.step import LossConfig, distill_loss, make_train_step

FIXTURES = Path(__file__).parent / "fixtures"
LENGTHS = batching.Lengths(max_prompt_length=6, max_length=16)
SETTINGS = {  # the loop rematerialised, and the scanned stack (rematerialised for two families)
    "gpt2": [stack.Layers(remat="full"), stack.Layers(scan=True, remat="dots")],
    "llama": [stack.Layers(scan=True)],
    "opt": [stack.Layers(scan=True)],
    "t5": [stack.Layers(scan=True, remat="dots_no_batch")],
}


def _batch(encoder_decoder: bool) -> dict:
    rng = np.random.default_rng(0)
    rows = [
        (list(rng.integers(3, 90, rng.integers(2, 6))), [*rng.integers(3, 90, rng.integers(3, 9)), 2])
        for _ in range(4)
    ]
    if encoder_decoder:
        return batching.encoder_decoder_batch(rows, LENGTHS, pad=0, start=0)
    return batching.decoder_only_batch(rows, LENGTHS, pad=0)


def _loss_and_grads(name: str, how: stack.Layers, rate: float) -> tuple:
    """SRKL (half CE) of a student under ``how`` against the fixture as teacher, dropout at ``rate``."""
    path = str(FIXTURES / name)
    student = stack.configure(models.from_pretrained(path, dropout=rate), how)
    teacher = stack.configure(models.from_pretrained(path), how)
    graph, params = nnx.split(student)
    batch = _batch(hasattr(student, "encode"))
    cfg = LossConfig("srkl", 0.5, (("alpha", 0.1),))

    @jax.jit
    def f(params):
        model = nnx.merge(graph, params)
        dropout.set_key(model, jax.random.key(3) if rate else None)
        return distill_loss(model, teacher, batch, cfg)[0]

    scans = str(jax.make_jaxpr(f)(params)).count(" scan[")
    assert scans >= (2 if how.scan else 0) * (1 + (name == "t5")), (how, scans)  # a scan per stack and model
    assert how.scan or not scans
    loss, grads = jax.value_and_grad(f)(params)
    return float(loss), jax.tree.leaves(grads)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("gpt2", marks=pytest.mark.slow),
        "llama",
        "opt",
        pytest.param("t5", marks=pytest.mark.slow),
    ],
)
def test_scan_and_remat_give_the_loops_loss_and_gradients(name):
    rate = 0.0 if name == "llama" else 0.2  # llama's only site (attention) is off in its config
    ref_loss, ref_grads = _loss_and_grads(name, stack.Layers(), rate)
    for how in SETTINGS[name]:
        loss, grads = _loss_and_grads(name, how, rate)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=str(how))
        for g, r in zip(grads, ref_grads, strict=True):
            np.testing.assert_allclose(g, r, rtol=2e-4, atol=1e-6, err_msg=str(how))


@pytest.mark.slow
def test_a_scanned_rematerialised_train_step_learns_as_the_loop_does():
    def losses(how):
        student = stack.configure(models.from_pretrained(str(FIXTURES / "gpt2"), dropout=0.1), how)
        step, params, opt = make_train_step(student, None, optax.adamw(1e-2), LossConfig("fkl", 0.0))
        batch, out = _batch(False), []
        for i in range(3):
            params, opt, metrics = step(params, opt, None, batch, jax.random.key(i))
            out.append(float(metrics["loss"]))
        return out

    scanned = losses(stack.Layers(scan=True, remat="full"))
    np.testing.assert_allclose(scanned, losses(stack.Layers()), rtol=1e-5)


def test_an_unknown_remat_policy_is_refused():
    with pytest.raises(ValueError, match="remat must be one of none, full, dots"):
        stack.Layers(remat="everything")
