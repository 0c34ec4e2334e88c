"""LoRA: train a low-rank update of chosen projection kernels instead of the whole student.

    model = lora.apply(model, rank=8, alpha=16, dropout=0.05, targets=("q", "v"))
    graph, trainable, frozen = nnx.split(model, lora.TRAINABLE, ...)    # optimise `trainable` only
    dropout.set_key(model, key)                  # inside the jitted step, after nnx.merge: dropout on
    models.save_pretrained(lora.merged(model), out_dir)      # a plain HF checkpoint, adapters folded in
    lora.save_peft(model, out_dir)                           # or the adapters alone, in PEFT's layout

Every family multiplies by its projection kernels only in ``layers.Attention`` (q, k, v [D, H, K], o
[H, K, D]) and ``layers.MLP`` (gate, up [D, M], down [M, D]), so adapters are added there, as
``lora_<name>`` blocks (see ``layers.LoRA``), and one implementation serves every family.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from distillm_jax.models import FAMILIES, hf_io
from distillm_jax.models import layers as L

TRAINABLE = L.LoRAParam
"""The nnx filter for what a LoRA run trains: ``nnx.split(model, TRAINABLE, ...)``."""

KERNELS = {L.Attention: ("q", "k", "v", "o"), L.MLP: ("gate", "up", "down")}
NAMES = tuple(n for names in KERNELS.values() for n in names)
N_IN = {"o": 2}  # o [H, K, D] takes [H, K]; every other kernel takes its first dimension


def _kernels(model: nnx.Module) -> Iterator[tuple[str, nnx.Module, str]]:
    """(dotted path of the kernel, its block, its name) for every projection kernel of the model."""
    for path, block in list(nnx.iter_modules(model)):
        for kind, names in KERNELS.items():
            if isinstance(block, kind):
                for name in names:
                    if getattr(block, name) is not None:
                        yield ".".join(map(str, (*path, name))), block, name


def _adapters(model: nnx.Module) -> list[tuple[str, nnx.Module, str, L.LoRA]]:
    """(kernel path, block, kernel name, adapter) for every adapted kernel, in a fixed order."""
    found = [(p, b, n, getattr(b, "lora_" + n, None)) for p, b, n in _kernels(model)]
    return [f for f in found if f[3] is not None]


def has_adapters(model: nnx.Module) -> bool:
    return bool(_adapters(model))


def apply(
    model: nnx.Module,
    *,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    targets: Sequence[str] = ("q", "v"),
    seed: int = 0,
) -> nnx.Module:
    """Add an adapter (A random, B zero: the model computes what it did) to every Attention/MLP kernel
    named in ``targets``, in place, and return the model. Adapters of a sharded model are replicated
    on its mesh: they are small, and replicated factors need no collectives beyond the kernel's own."""
    kernels = list(_kernels(model))
    valid = [n for n in NAMES if any(k[2] == n for k in kernels)]
    unknown = [t for t in targets if t not in valid]
    if unknown or not targets:
        raise ValueError(f"LoRA targets {list(targets)}: this model's kernels are {', '.join(valid)}")
    if rank < 1 or not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA needs rank >= 1 and 0 <= dropout < 1, got rank={rank} dropout={dropout}")
    if has_adapters(model):
        raise ValueError("the model already has LoRA adapters")
    root = jax.random.key(seed)
    chosen = [(b, n) for _, b, n in kernels if n in targets]
    for index, (block, name) in enumerate(chosen):
        w = getattr(block, name).get_value()
        adapter = L.LoRA(
            w.shape,
            N_IN.get(name, 1),
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            key=jax.random.fold_in(root, index),
            param_dtype=w.dtype,
        )
        sharding = getattr(w, "sharding", None)  # None for a tracer (apply under eval_shape)
        if isinstance(sharding, NamedSharding):
            replicated = NamedSharding(sharding.mesh, PartitionSpec())
            for factor in (adapter.a, adapter.b):
                factor.set_value(jax.device_put(factor.get_value(), replicated))
        setattr(block, "lora_" + name, adapter)
    return model


def merged(model: nnx.Module) -> nnx.Module:
    """A new model of the same family, each adapted kernel replaced by W + (alpha/r) A B in W's dtype and
    sharding, without adapters: what ``models.save_pretrained`` exports. ``model`` is left as it is."""
    out = nnx.clone(model)
    for _, block, name, adapter in _adapters(out):
        w = getattr(block, name)
        value = w.get_value()
        new = value.astype(jnp.float32) + adapter.delta().reshape(value.shape)
        w.set_value(jax.device_put(new.astype(value.dtype), value.sharding))
        delattr(block, "lora_" + name)
    return out


def save_peft(model: nnx.Module, out_dir: str) -> None:
    """The adapters alone in PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors``),
    for ``PeftModel.from_pretrained(hf_base_model, out_dir)``. PEFT's ``lora_A`` [r, in] and ``lora_B``
    [out, r] are our A and B transposed, HF module names come from the family's checkpoint map, and
    HF's merged weight is ``W + (lora_alpha / r) lora_B @ lora_A``, as ``merged`` computes."""
    found = _adapters(model)
    if not found:
        raise ValueError("the model has no LoRA adapters to save")
    model_type = model.hf_config["model_type"]
    rules = {r.ours: r for r in FAMILIES[model_type].hf_rules(model.config)}
    tensors, modules = {}, set()
    for path, block, _, adapter in found:
        rule, w = rules[path], getattr(block, path.rsplit(".", 1)[1]).get_value()
        matrix = w.reshape(-1, int(np.prod(adapter.out_shape)))  # our kernel as [in, out]
        if rule.part is not None or not bool(jnp.array_equal(rule.to_hf(w), matrix.T)):
            raise ValueError(
                f"{model_type} stores {path} as {rule.hf}, a fused or Conv1D ([in, out]) weight that "
                "PEFT's LoRA layout cannot hold; use merged export (models.save_pretrained(lora.merged(m)))"
            )
        module = rule.hf.removesuffix(".weight")
        modules.add(module.rsplit(".", 1)[1])
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_A.weight"] = np.asarray(jax.device_get(adapter.a.get_value())).T
        tensors[f"{prefix}.lora_B.weight"] = np.asarray(jax.device_get(adapter.b.get_value())).T
    adapter = found[0][3]
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_2_SEQ_LM" if hasattr(model, "encode") else "CAUSAL_LM",
        "base_model_name_or_path": model.hf_config.get("_name_or_path", ""),
        "r": adapter.rank,
        "lora_alpha": adapter.alpha,
        "lora_dropout": adapter.dropout,
        "target_modules": sorted(modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    hf_io.write_safetensors(os.path.join(out_dir, "adapter_model.safetensors"), tensors)
