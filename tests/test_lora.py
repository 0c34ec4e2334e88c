"""LoRA adapters: fresh ones change nothing, merging equals the adapted model, only adapters train,
dropout under jit, and the PEFT export agrees with the merged HF export."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from transformers import AutoConfig

from configs import tiny
from distillm_jax import lora, models, sharding, step
from distillm_jax.models import dropout, hf_io
from distillm_jax.models import layers as L

HF = {
    "llama": tiny.llama(32, 2, 4, 2),  # grouped-query attention, gated MLP, untied head
    "t5": tiny.t5(32, 2, 4),  # encoder, decoder self- and cross-attention
    "gpt2": tiny.gpt2(32, 1, 4),
}
ALL = {"llama": ("q", "k", "v", "o", "gate", "up", "down"), "t5": ("q", "k", "v", "o", "up", "down")}


@pytest.fixture(autouse=True)
def _fast(quick_compiles):
    """Tiny models, so compiling is nearly all the time; every comparison is between our own programs."""


@functools.cache
def _create(family):
    hf = dict(HF[family])
    return models.create(AutoConfig.for_model(hf.pop("model_type"), **hf), seed=0)


def build(family, mesh=None):
    """A fresh copy of the family's tiny model (each is created once), sharded as ``create`` would."""
    graph, state = nnx.split(_create(family))
    if mesh is not None:
        state = jax.device_put(state, sharding.state_shardings(state, mesh))
    return nnx.merge(graph, state, copy=True)


def inputs(model):
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, 200, (2, 6)), jnp.int32)
    mask = jnp.asarray([[1] * 6, [0, 0, 1, 1, 1, 1]], jnp.int32)
    return (ids, mask, ids[:, ::-1], jnp.ones_like(mask)) if hasattr(model, "encode") else (ids, mask)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graph, state, args):
    return nnx.merge(graph, state)(*args)


def forward(model, *args):
    """Logits, compiled once per model structure (a merged model shares its base model's program)."""
    return np.asarray(_forward(*nnx.split(model), args))


def adapters(model):
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, L.LoRA)]


def randomize_b(model):
    """Nonzero B (a fresh adapter's is zero), so that the adapters change the model."""
    for i, adapter in enumerate(adapters(model)):
        b = adapter.b.get_value()
        adapter.b.set_value(0.2 * jax.random.normal(jax.random.key(i), b.shape, b.dtype))


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_fresh_adapters_change_nothing(family):
    model = build(family)
    want = forward(model, *inputs(model))
    lora.apply(model, rank=4, alpha=8, targets=ALL[family])
    np.testing.assert_array_equal(forward(model, *inputs(model)), want)
    if family == "t5":  # every attention: encoder, decoder self and cross
        assert model.encoder.blocks[0].attn.lora_q is not None
        assert model.decoder.blocks[1].cross.lora_v is not None


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_merged_model_equals_the_adapted_one(family):
    model = lora.apply(build(family), rank=4, alpha=8, targets=ALL[family])
    randomize_b(model)
    attn = (model.layers[0] if family == "llama" else model.decoder.blocks[0]).attn
    w_before = np.asarray(attn.o.get_value())
    out = lora.merged(model)
    assert lora.has_adapters(model) and not lora.has_adapters(out)
    np.testing.assert_array_equal(np.asarray(attn.o.get_value()), w_before)  # input model untouched
    np.testing.assert_allclose(forward(out, *inputs(out)), forward(model, *inputs(model)), atol=1e-5)
    a, b = np.asarray(attn.lora_o.a.get_value()), np.asarray(attn.lora_o.b.get_value())
    merged_o = (out.layers[0] if family == "llama" else out.decoder.blocks[0]).attn.o.get_value()
    np.testing.assert_allclose(merged_o, w_before + 2.0 * (a @ b).reshape(w_before.shape), atol=1e-6)


def test_only_adapters_train():
    model = lora.apply(build("llama"), rank=4, alpha=8, targets=("q", "v", "down"))
    randomize_b(model)  # with B = 0 the first step moves B only
    graph, params, frozen = nnx.split(model, lora.TRAINABLE, ...)
    assert {p[-1] for p, _ in nnx.to_flat_state(params)} == {"a", "b"}
    tx = optax.adam(1e-2)
    ids, mask = inputs(model)

    @jax.jit
    def step(params, opt_state, frozen):
        loss = lambda p: jnp.mean(nnx.merge(graph, p, frozen)(ids, mask) ** 2)  # noqa: E731
        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), frozen

    new, new_frozen = step(params, tx.init(params), frozen)
    for (_, before), (_, after) in zip(nnx.to_flat_state(frozen), nnx.to_flat_state(new_frozen), strict=True):
        np.testing.assert_array_equal(after.get_value(), before.get_value())
    for (path, before), (_, after) in zip(nnx.to_flat_state(params), nnx.to_flat_state(new), strict=True):
        assert not np.array_equal(after.get_value(), before.get_value()), path


def test_dropout_only_with_a_key_under_jit():
    model = lora.apply(build("llama"), rank=4, alpha=8, dropout=0.5, targets=("q", "v", "up"))
    randomize_b(model)
    graph, params, frozen = nnx.split(model, lora.TRAINABLE, ...)
    ids, mask = inputs(model)

    @jax.jit
    def run(params, frozen, key):
        m = nnx.merge(graph, params, frozen)
        if key is not None:
            dropout.set_key(m, key)
        return m(ids, mask)

    plain = np.asarray(run(params, frozen, None))
    np.testing.assert_allclose(plain, forward(model, ids, mask), atol=1e-6)  # no key: no dropout
    k0, k1 = jax.random.key(0), jax.random.key(1)
    dropped = np.asarray(run(params, frozen, k0))
    assert np.abs(dropped - plain).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(run(params, frozen, k0)), dropped)
    assert np.abs(np.asarray(run(params, frozen, k1)) - dropped).max() > 1e-3
    dropout.set_key(model, k0)  # each adapter its own key, so masks differ between adapters
    keys = [jax.random.key_data(a.drop.keys.key).tobytes() for a in adapters(model)]
    assert len(set(keys)) == len(keys) == 6


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_peft_export_agrees_with_the_merged_export(family, tmp_path):
    model = lora.apply(build(family), rank=4, alpha=8, targets=("q", "v", "down"))
    randomize_b(model)
    models.save_pretrained(model, str(tmp_path / "base"))  # adapters are not part of the HF base
    models.save_pretrained(lora.merged(model), str(tmp_path / "merged"))
    lora.save_peft(model, str(tmp_path / "peft"))
    base, merged = (hf_io.open_checkpoint(str(tmp_path / d)) for d in ("base", "merged"))
    adapters = hf_io.read_safetensors(str(tmp_path / "peft" / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    if family == "llama":
        assert config["task_type"] == "CAUSAL_LM"
        assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
        assert adapters["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
        assert adapters["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape == (16, 4)
    else:
        assert config["task_type"] == "SEQ_2_SEQ_LM"
        assert config["target_modules"] == ["q", "v", "wo"]
        assert "base_model.model.decoder.block.1.layer.1.EncDecAttention.q.lora_A.weight" in adapters
    changed = {k for k in base if not np.array_equal(base[k], merged[k])}
    lora_a = {k.removeprefix("base_model.model.").replace("lora_A.", "") for k in adapters if "lora_A" in k}
    assert changed == lora_a
    for name in lora_a:
        prefix = "base_model.model." + name.removesuffix(".weight")
        b, a = adapters[prefix + ".lora_B.weight"], adapters[prefix + ".lora_A.weight"]
        np.testing.assert_allclose(base[name] + 2.0 * b @ a, merged[name], atol=1e-6)


def test_gpt2_has_no_peft_layout_and_bad_targets_are_named(tmp_path):
    for targets in (("q",), ("up",)):  # q is fused into c_attn, up is c_fc (Conv1D)
        model = lora.apply(build("gpt2"), rank=2, alpha=2, targets=targets)
        with pytest.raises(ValueError, match="use merged export"):
            lora.save_peft(model, str(tmp_path))
    with pytest.raises(ValueError, match="q, k, v, o, up, down"):
        lora.apply(build("gpt2"), rank=2, alpha=2, targets=("gate",))


def test_sharded_model_gets_replicated_adapters(mesh):
    model = lora.apply(build("llama", mesh), rank=4, alpha=8)
    kernel = model.layers[0].attn.q.get_value()
    assert isinstance(kernel.sharding, NamedSharding) and kernel.sharding.spec != PartitionSpec()
    for var in jax.tree.leaves(nnx.state(model, lora.TRAINABLE)):
        assert var.sharding == NamedSharding(mesh, PartitionSpec())
    randomize_b(model)
    assert lora.merged(model).layers[0].attn.q.get_value().sharding == kernel.sharding


def test_train_step_optimizes_adapters_only():
    model = lora.apply(build("llama"), rank=4, alpha=8, targets=("q", "v"))
    _, params, opt_state = step.make_train_step(model, None, optax.adamw(1e-3), step.LossConfig(kd_ratio=0.0))
    adapter_sizes = sorted(x.size for x in jax.tree.leaves(params))
    assert len(adapter_sizes) == 2 * 2 * model.config.layers  # A and B of q and v in every layer
    moments = sorted(x.size for x in jax.tree.leaves(opt_state) if x.size > 1)
    assert moments == sorted(adapter_sizes * 2)  # AdamW's two moments of the adapters, nothing else
