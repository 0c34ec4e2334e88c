"""The distillation train step: it learns, SFT skips the teacher, and sharded equals unsharded."""

from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from distillm_jax import models, sharding
from distillm_jax.data import batching
from distillm_jax.step import LossConfig, make_optimizer, make_train_step

FIXTURES = Path(__file__).parent / "fixtures"
LENGTHS = batching.Lengths(max_prompt_length=6, max_length=16)


def pair(mesh=None):
    teacher = models.from_pretrained(str(FIXTURES / "llama"), mesh=mesh)
    student = models.create(models.load_hf_config(str(FIXTURES / "llama")), seed=1, mesh=mesh)
    return student, teacher


def batch(mesh=None):
    rng = np.random.default_rng(0)
    rows = [
        (list(rng.integers(3, 96, rng.integers(2, 6))), [*rng.integers(3, 96, rng.integers(3, 9)), 2])
        for _ in range(8)
    ]
    b = batching.decoder_only_batch(rows, LENGTHS, pad=0)
    if mesh is not None:
        b = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in b.items()}
    return b


def run(steps, cfg, mesh=None):
    student, teacher = pair(mesh)
    step, params, opt_state = make_train_step(student, teacher, optax.adamw(1e-2), cfg)
    teacher_state = nnx.state(teacher)
    data, out = batch(mesh), []
    for _ in range(steps):
        params, opt_state, metrics = step(params, opt_state, teacher_state, data)
        out.append({k: float(v) for k, v in metrics.items()})
    return out, params


def test_distillation_step_lowers_the_divergence():
    metrics, _ = run(12, LossConfig("srkl", 1.0, (("alpha", 0.1),)))
    assert metrics[-1]["srkl"] < 0.5 * metrics[0]["srkl"]
    assert all(np.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in metrics)


def test_sft_is_cross_entropy_only():
    metrics, _ = run(3, LossConfig("fkl", 0.0))
    assert set(metrics[0]) == {"ce", "loss", "grad_norm"} and metrics[0]["loss"] == metrics[0]["ce"]
    assert metrics[-1]["ce"] < metrics[0]["ce"]


def test_lm_term_mixes_cross_entropy_and_the_teachers_fkl():
    """MiniLLM's LM term on pre-training text: (1 − r)·CE + r·FKL(teacher ‖ student), weighted by
    lm_coef, beside the distillation loss."""
    from distillm_jax import losses
    from distillm_jax.step import distill_loss

    student, teacher = pair()
    data = {k: np.asarray(v) for k, v in batch().items()}
    lm = batching.text_batch([list(range(3, 3 + n)) for n in (5, 9, 12, 7, 4, 16, 10, 8)], 16, 0)
    cfg = LossConfig("srkl", 1.0, (("alpha", 0.1),), lm_coef=0.7, lm_kd_ratio=0.5)
    total, metrics = distill_loss(student, teacher, {**data, "lm": lm}, cfg)
    s_logits = student(lm["input_ids"], lm["attention_mask"])
    t_logits = teacher(lm["input_ids"], lm["attention_mask"])
    ce = losses.cross_entropy(s_logits, lm["labels"], lm["loss_mask"])
    fkl = losses.divergence("fkl", s_logits, t_logits, lm["loss_mask"])
    np.testing.assert_allclose(float(metrics["lm"]), 0.5 * float(ce) + 0.5 * float(fkl), rtol=1e-5)
    np.testing.assert_allclose(float(total), float(metrics["srkl"]) + 0.7 * float(metrics["lm"]), rtol=1e-5)


@pytest.mark.slow
def test_sharded_step_equals_unsharded():
    cfg = LossConfig("jsd", 0.5, (("beta", 0.1),))
    plain, p0 = run(2, cfg)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharded, p1 = run(2, cfg, mesh)
    for a, b in zip(plain, sharded, strict=True):
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=2e-5, atol=1e-6)
    for x, y in zip(jax.tree.leaves(p0), jax.tree.leaves(p1), strict=True):
        # Adam divides by sqrt(v): a near-zero gradient's reduction-order rounding moves its update by
        # up to ~lr * 1e-2 after two steps, so compare at 1e-4 (lr = 1e-2).
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-4)


def test_bad_loss_config():
    with pytest.raises(ValueError, match=r"unknown divergence 'skl'"):
        LossConfig("skl")
    with pytest.raises(ValueError, match=r"kd_ratio must be in \[0, 1\], got 1.5"):
        LossConfig("srkl", 1.5)
    with pytest.raises(ValueError, match=r"'srkl' takes alpha; got unexpected beta"):
        LossConfig("srkl", 1.0, (("beta", 0.1),))


@pytest.mark.slow
@pytest.mark.parametrize("kd_ratio", [0.5, 1.0])  # 1.0: the reported CE comes out of the divergence loop
def test_chunked_step_equals_plain(kd_ratio):
    plain, p0 = run(2, LossConfig("srkl", kd_ratio, (("alpha", 0.1),)))
    chunked, p1 = run(2, LossConfig("srkl", kd_ratio, (("alpha", 0.1),), chunk_size=4))  # 16 = 4 chunks
    for a, b in zip(plain, chunked, strict=True):
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6)
    for x, y in zip(jax.tree.leaves(p0), jax.tree.leaves(p1), strict=True):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-4)


def test_optimizer_follows_the_cosine_schedule_with_weight_decay():
    tx = make_optimizer(1e-2, 10, end_lr=1e-7, weight_decay=0.01)
    params = {"w": np.ones(3, np.float32)}
    state = tx.init(params)
    sizes = []
    for _ in range(10):  # a constant gradient: Adam's step is lr * (1 + wd * w) per element
        updates, state = tx.update({"w": np.full(3, 100.0, np.float32)}, state, params)
        sizes.append(-float(updates["w"][0]))
    sched = optax.cosine_decay_schedule(1e-2, 10, alpha=1e-5)
    np.testing.assert_allclose(sizes, [float(sched(k)) * 1.01 for k in range(10)], rtol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_weight_decay_leaves_biases_and_norm_scales_alone(family):
    """Decay alone (a zero gradient): kernels and embeddings shrink by lr·wd, every bias, norm scale
    (GPT-2's ``ln_f`` too) and T5's relative position bias stays as it was."""
    model = models.create(models.load_hf_config(str(FIXTURES / family)), seed=0)
    params = nnx.state(model, nnx.Param)
    tx = make_optimizer(0.1, 10, end_lr=0.1, weight_decay=0.5, clip=0.0)
    zeros = jax.tree.map(np.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    after = optax.apply_updates(params, updates)
    kept, shrunk = set(), set()
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(after), strict=True):
        name = "/".join(str(getattr(k, "key", "")) for k in path)
        if np.allclose(np.asarray(y), np.asarray(x)):
            kept.add(name)
        else:
            np.testing.assert_allclose(np.asarray(y), np.asarray(x) * (1 - 0.1 * 0.5), rtol=1e-6)
            shrunk.add(name)
    assert kept and shrunk
    assert all(("bias" in n or "norm" in n or "ln_" in n) for n in kept), kept
    assert not any(("bias" in n or "norm" in n or "ln_" in n) for n in shrunk), shrunk
    expected = {
        "gpt2": ("ln_f/scale", "ln_f/bias", "wte/table"),
        "t5": ("rel_bias", "norm/scale", "shared/table"),
    }
    assert any(expected[family][0] in n for n in kept) and any(expected[family][1] in n for n in kept)
    assert any(expected[family][2] in n for n in shrunk)
