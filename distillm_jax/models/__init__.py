"""Model families in Flax NNX and their Hugging Face checkpoints.

    model = models.from_pretrained("path/or/hub-id", dtype=jnp.bfloat16, mesh=mesh)
    logits = model(input_ids, attention_mask)                       # decoder-only: [B, T, V] float32
    logits = model(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)   # T5 family
    models.save_pretrained(model, "out/")                            # loads in transformers unchanged

Every model also exposes ``hidden(...)`` (final hidden states and KV cache, for the sampler and the
chunked loss), ``head()`` (the [D, V] output embedding) and ``init_cache(batch, slots)``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from types import ModuleType

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from distillm_jax import sharding as shd
from distillm_jax.models import gpt2, hf_io, hub, llama, opt, shapes, t5
from distillm_jax.models.hf_io import CheckpointError

_MODULES: tuple[ModuleType, ...] = (gpt2, llama, opt, t5)
FAMILIES: dict[str, ModuleType] = {t: m for m in _MODULES for t in m.MODEL_TYPES}
"""HF ``model_type`` -> the module that implements it."""

__all__ = [
    "FAMILIES",
    "CheckpointError",
    "Dims",
    "abstract_params",
    "create",
    "dims",
    "encoder_decoder",
    "from_pretrained",
    "load_hf_config",
    "position_limit",
    "save_pretrained",
    "spec_config",
]


class FrozenConfig(dict):
    """A model's HF config as a dict that hashes by content, so a model's graph can key jit caches."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(json.dumps(self, sort_keys=True, default=str))


def _family(model_type: str, where: str) -> ModuleType:
    if model_type not in FAMILIES:
        raise CheckpointError(
            f"unsupported model_type {model_type!r} in {where}; supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def load_hf_config(directory: str):
    """The transformers config of a checkpoint directory (config.json via AutoConfig)."""
    from transformers import AutoConfig

    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"no config.json in {directory}")
    try:
        with open(path) as f:
            model_type = json.load(f).get("model_type")
    except ValueError as e:
        raise CheckpointError(f"corrupt {path}: {e}") from None
    _family(model_type, path)
    return AutoConfig.from_pretrained(directory)


def spec_config(spec, *, planning: bool = False):
    """The transformers config of a model spec (``path``, ``config``: a teacher or student of the run's
    config): its checkpoint's config.json — a hub id's fetched without weights — or ``spec.config`` (HF
    config kwargs with ``model_type``) for a new model. What every model path of a run starts from.
    ``planning``: a hub model of the paper configs takes its shape from ``shapes.KNOWN`` (no hub)."""
    from transformers import AutoConfig

    kwargs = shapes.known(spec.path) if planning and spec.path and not hub.is_local(spec.path) else None
    if spec.path and kwargs is None:
        return load_hf_config(hub.local_dir(spec.path, weights=False))
    if kwargs is None:
        kwargs = spec.config.to_dict() if hasattr(spec.config, "to_dict") else spec.config
    kwargs = dict(kwargs)
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


@dataclasses.dataclass(frozen=True)
class Dims:
    """The sizes a memory plan reads of a model, as its family reads its config.json (``dims``)."""

    enc_layers: int  # 0 for a decoder-only model
    layers: int  # the decoder's
    d: int  # d_model
    heads: int
    kv: int  # key / value width per token and layer: kv heads x head dim
    vocab: int
    enc_dec: bool


def dims(hf_config) -> Dims:
    """``Dims`` of a transformers config, from its family's own ``Config.from_hf`` (one reading of
    the HF names: n_embd / hidden_size / d_model, num_key_value_heads, head_dim / d_kv, ...)."""
    cfg = _family(hf_config.model_type, "the config").Config.from_hf(hf_config)
    enc_dec = hasattr(cfg, "enc_layers")
    head_dim = getattr(cfg, "head_dim", None) or getattr(cfg, "d_kv", None) or cfg.d_model // cfg.heads
    return Dims(
        enc_layers=cfg.enc_layers if enc_dec else 0,
        layers=cfg.dec_layers if enc_dec else cfg.layers,
        d=cfg.d_model,
        heads=cfg.heads,
        kv=getattr(cfg, "kv_heads", cfg.heads) * head_dim,
        vocab=cfg.vocab,
        enc_dec=enc_dec,
    )


def encoder_decoder(hf_config) -> bool:
    """An encoder-decoder family (T5, mT5) rather than a decoder-only one."""
    return _family(hf_config.model_type, "the config") is t5


def position_limit(hf_config) -> int | None:
    """The length of a learned position table (GPT-2, OPT): a longer sequence has no position to take;
    ``None`` for relative or rotary positions."""
    cfg = _family(hf_config.model_type, "the config").Config.from_hf(hf_config)
    return getattr(cfg, "positions", None)


def _builder(hf_config, param_dtype, dtype, seed: int = 0, dropout: float | None = None):
    """(family, its Config, a function building the model) for a transformers config; ``dropout``
    (not None) sets every dropout site of the family to that rate (``dropout.Rates.override``)."""
    family = _family(hf_config.model_type, "the config")
    cfg = family.Config.from_hf(hf_config)
    cfg = dataclasses.replace(cfg, dropout=cfg.dropout.override(dropout))

    def build() -> nnx.Module:
        model = family.Model(cfg, rngs=nnx.Rngs(seed), param_dtype=param_dtype, dtype=dtype)
        model.hf_config = FrozenConfig(hf_config.to_dict())
        return model

    return family, cfg, build


def abstract_model(
    hf_config, param_dtype=jnp.float32, *, dtype=None, dropout: float | None = None
) -> nnx.Module:
    """The model with shape-only parameters (nothing allocated): what the memory planner reads and
    ``config/compiled.py`` compiles; ``dtype`` (default: ``param_dtype``) and ``dropout`` as in
    ``create``."""
    _, _, build = _builder(hf_config, param_dtype, dtype or param_dtype, dropout=dropout)
    return nnx.eval_shape(build)


def abstract_params(hf_config, param_dtype=jnp.float32) -> nnx.State:
    """Shapes, dtypes and logical axes of a model's parameters, without allocating any (the memory
    planner's input)."""
    return nnx.state(abstract_model(hf_config, param_dtype), nnx.Param)


def create(
    hf_config,
    *,
    dtype=jnp.float32,
    param_dtype=None,
    mesh: Mesh | None = None,
    seed: int = 0,
    dropout: float | None = None,
):
    """A randomly initialised model for a transformers config, created directly in its shardings;
    ``dropout`` as in ``from_pretrained``."""
    _, _, build = _builder(hf_config, param_dtype or dtype, dtype, seed, dropout)
    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    out = None if mesh is None else shd.state_shardings(abstract, mesh)
    return nnx.merge(graphdef, jax.jit(lambda: nnx.split(build())[1], out_shardings=out)())


def from_pretrained(
    path_or_hub_id: str,
    dtype=jnp.float32,
    mesh: Mesh | None = None,
    param_dtype=None,
    dropout: float | None = None,
):
    """Load an HF checkpoint (local directory, or hub id ``org/name[@revision]``) into our NNX model,
    torch-free (safetensors, or ``pytorch_model.bin`` read by a restricted unpickler).

    ``dtype`` is the compute dtype; ``param_dtype`` (default: ``dtype``) the dtype parameters are kept
    in. With a ``mesh`` every tensor goes straight to its sharding. Dropout sits where the family's
    transformers model has it, at its config's rates (``dropout``: every site at this rate instead), and
    acts only in a training step (``models.dropout``).
    """
    directory = hub.local_dir(path_or_hub_id)
    hf_config = load_hf_config(directory)
    param_dtype = param_dtype or dtype
    family, cfg, build = _builder(hf_config, param_dtype, dtype, dropout=dropout)
    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    weights = hub.weights_at(path_or_hub_id, directory)  # a bucket's are read in place
    tensors = hf_io.open_checkpoint(weights)
    if hasattr(family, "canonical_keys"):
        tensors = family.canonical_keys(tensors)
    state = hf_io.load_state(
        abstract,
        family.hf_rules(cfg),
        tensors,
        where=weights,
        mesh=mesh,
        ignore=family.ignore_hf_key,
    )
    return nnx.merge(graphdef, state)


def save_pretrained(model: nnx.Module, out_dir: str, tokenizer=None, max_shard_size: int = 5 * 2**30) -> None:
    """Write config.json + safetensors (sharded above ``max_shard_size`` bytes) that transformers loads
    unchanged, plus the tokenizer when given. Tied heads are stored once, as transformers does."""
    family = _family(model.hf_config["model_type"], "the model")
    cfg = family.Config.from_hf(_hf_config_object(model.hf_config))
    tensors = hf_io.export_tensors(nnx.state(model, nnx.Param), family.hf_rules(cfg))
    hf_io.write_checkpoint(out_dir, tensors, max_shard_size)
    config = dict(model.hf_config)
    config["dtype"] = str(jnp.dtype(next(iter(tensors.values())).dtype))
    if hasattr(family, "export_config"):
        config = family.export_config(config, cfg)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def _hf_config_object(config: dict):
    from transformers import AutoConfig

    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    return AutoConfig.for_model(config["model_type"], **kwargs)
