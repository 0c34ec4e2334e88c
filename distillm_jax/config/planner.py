"""Memory per device of a run, before anything is loaded: will this teacher/student pair, batch, lengths
and mesh fit on these devices?

Parameters and optimizer state are exact: every parameter's shape and logical axes come from the model
code run abstractly (``models.abstract_params``), and the config's mesh and sharding rules give each
device's shard. Activations and the sampler's KV cache are estimates: the student's saved activations per
layer follow Korthikanti et al. (2022) — ``rows·T·(34·d + 5·heads·T)`` bytes in 16-bit, no recomputation —
with ``student.remat`` only each layer's input is kept, plus one layer's activations rebuilt at a time; the
logits count four ``[rows, T, V]`` float32 buffers (teacher, student, their softmaxes / gradient), or
one chunk's worth with ``loss.chunk_size``; the sum is scaled to what XLA compiles (``ACTIVATION_SCALE``);
a scanned stack (``scan_layers``) adds one copy of its params. Training and generation do not overlap, so
the peak is the larger of the two on top of the states. A 10 % margin is kept for XLA's scratch and
fragmentation.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from distillm_jax import lora, methods, models
from distillm_jax import sharding as shd
from distillm_jax.config import settings
from distillm_jax.generate import cache_slots_held

GIB = 2**30
MARGIN = 0.9  # the share of a device's memory a plan may use
# XLA's compiled scratch for the whole train step (teacher forward, loss temporaries, gradient buffers
# besides the saved activations) measured 1.55-1.75x the formula below (CPU, float32, GPT-2 shapes,
# d_model 128-512, T 128-512); tests/test_planner.py checks the scaled estimate against it.
ACTIVATION_SCALE = 1.65


@dataclasses.dataclass(frozen=True)
class _MeshShape:
    """What ``sharding.logical_to_spec`` reads of a mesh: the size of each axis (no devices needed)."""

    shape: dict


def shard_bytes(hf, dtype, mesh: dict) -> int:
    """Bytes of one device's shard of every parameter of a model."""
    total = 0
    fake = _MeshShape(mesh)
    for var in nnx.to_flat_state(models.abstract_params(hf, dtype)):
        v = var[1]
        shape = v.get_value().shape
        axes = v.get_metadata().get("axes") or (None,) * len(shape)
        spec = shd.logical_to_spec(axes, shape, fake)
        split = [math.prod(mesh[a] for a in ((s,) if isinstance(s, str) else s)) if s else 1 for s in spec]
        total += math.prod(d // k for d, k in zip(shape, split, strict=True)) * jnp.dtype(dtype).itemsize
    return total


def lora_bytes(hf, spec: ConfigDict, dtype) -> int:
    """Bytes of a model's LoRA adapters for ``spec`` (a ``lora`` config group), replicated on every
    device: counted from adapters added to the shape-only model."""
    model = lora.apply(
        models.abstract_model(hf, dtype), rank=spec.rank, alpha=spec.alpha, targets=tuple(spec.targets)
    )
    return sum(v.get_value().nbytes for _, v in nnx.to_flat_state(nnx.state(model, lora.TRAINABLE)))


def plan(config: ConfigDict, devices: int) -> dict[str, float]:
    """Bytes per device of each part of the run (``total`` is the peak)."""
    mesh = dict(zip(shd.MESH_AXES, shd.mesh_sizes(**config.mesh, devices=devices), strict=True))
    data, tensor = mesh["data"] * mesh["fsdp"], mesh["tensor"]
    c, o = config, config.optim
    student = models.spec_config(c.student, planning=True)
    s_dtype = c.student.param_dtype or "float32"
    out = {"student params": shard_bytes(student, s_dtype, mesh)}
    trained = out["student params"]
    if c.student.lora.rank:  # only the adapters (replicated) have gradients and optimizer state
        out["LoRA adapters"] = trained = lora_bytes(student, c.student.lora, s_dtype)
    out["gradients"] = trained
    out["AdamW state"] = 2 * trained * (1.5 if o.grad_accum > 1 else 1)
    teacher, method = None, methods.get(c.method)
    if method.teacher:
        teacher = models.spec_config(c.teacher, planning=True)
        out["teacher params"] = shard_bytes(teacher, c.teacher.param_dtype or c.teacher.dtype, mesh)

    d = models.dims(student)
    el = jnp.dtype(c.student.dtype).itemsize
    rows = math.ceil(o.batch_size // o.grad_accum / data)
    p, total_len = c.data.max_prompt_length, c.data.max_length
    t = total_len - p if d.enc_dec else total_len

    def layer(tokens: int, keys: int) -> float:  # a layer's saved activations, bytes
        return rows * tokens * (34 * d.d + 5 * d.heads * keys) * el / 2 / tensor

    cross = p if d.enc_dec else 0  # the decoder also attends over the prompt
    acts = d.enc_layers * layer(p, p) + d.layers * layer(t, t + cross)
    how = settings.ModelSpec.of(c.student).layers
    if how.remat != "none":  # each layer's input kept; one layer's activations rebuilt at a time
        inputs = rows * (d.enc_layers * p + d.layers * t) * d.d * el / tensor
        acts = inputs + max(layer(p, p) if d.enc_layers else 0.0, layer(t, t + cross))
    logits = 4 * rows * (settings.chunk_size(c, d.vocab) or t) * d.vocab * 4 / tensor
    out["activations (est.)"] = ACTIVATION_SCALE * (acts + logits)

    # The largest sampler the run holds: evaluation samples the student; the method's own samplers
    # (methods.Method.samplers) may hold several models' KV caches at once (MiniLLM's mixture).
    samplers = [*((("student",),) if c.eval.generate else ()), *method.samplers]
    dims = {"student": d, "teacher": models.dims(teacher) if teacher is not None else d}
    gen = 0.0
    if samplers:
        gen_rows = math.ceil(max(c.eval.batch_size, o.batch_size // o.grad_accum) / data)

        held_len = cache_slots_held(p, total_len - p, d.enc_dec)  # the cache grows in segments

        def cache(model: models.Dims) -> float:  # K and V of every slot held
            kv = 2 * model.layers * gen_rows * held_len * model.kv * el / tensor
            return kv + 2 * gen_rows * model.vocab * 4  # and a step's logits

        gen = max(sum(cache(dims[name]) for name in held) for held in samplers)
    out["generation KV cache (est.)"] = gen
    scanned = [(role, out[f"{role} params"]) for role in ("student", "teacher") if f"{role} params" in out]
    copies = sum(n for role, n in scanned if c[role].get("scan_layers"))
    if copies:  # a scanned stack stacks its layers' shards inside the step: one more copy of them
        out["scanned stack copies"] = copies
    states = sum(v for k, v in out.items() if "est." not in k)
    out["total"] = states + max(out["activations (est.)"], gen)
    return out


def device_memory() -> int | None:
    """Bytes the first device may use, if it says (accelerators do; a CPU does not)."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    return int(stats["bytes_limit"]) if "bytes_limit" in stats else None


def _size(n: float) -> str:
    return f"{n / GIB:9.2f} GiB" if n >= GIB else f"{n / 2**20:9.2f} MiB"


def report(parts: dict[str, float], devices: int, memory: int | None) -> str:
    lines = [f"memory per device, {devices} devices:"]
    lines += [f"  {k:<28} {_size(v)}" for k, v in parts.items()]
    if memory:
        lines.append(f"  {'device memory':<28} {_size(memory)} (a plan may use {MARGIN:.0%})")
    return "\n".join(lines)


def fits(parts: dict[str, float], memory: int) -> bool:
    return parts["total"] <= MARGIN * memory


def advice(parts: dict[str, float], memory: int) -> str:
    return (
        f"the run needs about {parts['total'] / GIB:.2f} GiB per device, more than {MARGIN:.0%} of "
        f"{memory / GIB:.2f} GiB: shard over more devices (mesh.fsdp), keep the teacher in bfloat16, take "
        "smaller micro-batches (optim.grad_accum), or chunk the loss (loss.chunk_size)"
    )
