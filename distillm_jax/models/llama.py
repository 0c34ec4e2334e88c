"""The Llama family: Llama 1/2/3 (llama3 rope scaling), OpenLLaMA, Mistral (sliding window), Qwen2/2.5
(q/k/v biases) and Qwen3 (q/k RMSNorm, explicit head_dim); grouped-query attention; tied or untied head.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from distillm_jax.models import layers as L
from distillm_jax.models.dropout import Rates
from distillm_jax.models.hf_io import Rule, merge_heads, split_heads, transposed

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True)
class Config:
    vocab: int
    d_model: int
    mlp: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    rope: tuple  # sorted items of HF rope_parameters, hashable
    tied: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    act: str
    window: int | None
    dropout: Rates = dataclasses.field(
        default_factory=Rates
    )  # attention_dropout only (0 in the released checkpoints)

    @classmethod
    def from_hf(cls, c) -> Config:
        heads = c.num_attention_heads
        rope = dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})
        rope.setdefault("rope_theta", getattr(c, "rope_theta", None) or 10000.0)
        if (rope.get("rope_type") or rope.get("type") or "default") not in L.ROPE_TYPES:
            raise ValueError(
                f"unsupported rope_type {rope.get('rope_type')!r}; supported: {', '.join(L.ROPE_TYPES)}"
            )
        qwen = c.model_type in ("qwen2", "qwen3")
        if qwen and getattr(c, "use_sliding_window", False):
            raise ValueError(f"{c.model_type} with use_sliding_window=True is not supported")
        return cls(
            vocab=c.vocab_size,
            d_model=c.hidden_size,
            mlp=c.intermediate_size,
            layers=c.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
            eps=c.rms_norm_eps,
            rope=tuple(sorted(rope.items())),
            tied=bool(c.tie_word_embeddings),
            qkv_bias=c.model_type == "qwen2" or bool(getattr(c, "attention_bias", False)),
            o_bias=c.model_type != "qwen2" and bool(getattr(c, "attention_bias", False)),
            mlp_bias=bool(getattr(c, "mlp_bias", False)),
            qk_norm=c.model_type == "qwen3",
            act=c.hidden_act,
            window=None if qwen else getattr(c, "sliding_window", None),
            dropout=Rates(attn=getattr(c, "attention_dropout", 0.0) or 0.0),
        )


class Block(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs, param_dtype, dtype):
        kw = dict(param_dtype=param_dtype, dtype=dtype)
        self.attn_norm = L.RMSNorm(cfg.d_model, cfg.eps, **kw)
        self.attn = L.Attention(
            cfg.d_model,
            cfg.heads,
            cfg.kv_heads,
            cfg.head_dim,
            rngs=rngs,
            qkv_bias=cfg.qkv_bias,
            out_bias=cfg.o_bias,
            qk_norm_eps=cfg.eps if cfg.qk_norm else None,
            dropout=cfg.dropout.get("attn"),
            **kw,
        )
        self.mlp_norm = L.RMSNorm(cfg.d_model, cfg.eps, **kw)
        self.mlp = L.MLP(cfg.d_model, cfg.mlp, cfg.act, gated=True, bias=cfg.mlp_bias, rngs=rngs, **kw)
        self.head_dim, self.rope = cfg.head_dim, cfg.rope

    def __call__(self, x, mask, positions, cache, cache_index):
        h, cache = self.attn(
            self.attn_norm(x),
            mask,
            scale=self.head_dim**-0.5,
            positions=positions,
            inv_freq=L.rope_inv_freq(self.head_dim, dict(self.rope)),
            cache=cache,
            cache_index=cache_index,
            causal=True,
        )
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), cache


class Model(L.CausalLM):
    """Decoder-only causal LM. ``model(ids, mask)`` -> float32 logits [B, T, V]."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=jnp.float32):
        kw = dict(param_dtype=param_dtype, dtype=dtype)
        self.config, self.dtype = cfg, dtype
        self.embed = L.Embed(cfg.vocab, cfg.d_model, rngs=rngs, **kw)
        self.layers = nnx.List([Block(cfg, rngs=rngs, **kw) for _ in range(cfg.layers)])
        self.norm = L.RMSNorm(cfg.d_model, cfg.eps, **kw)
        self.lm_head = (
            None if cfg.tied else L.param(rngs, (cfg.d_model, cfg.vocab), ("embed", "vocab"), param_dtype)
        )

    def embed_inputs(self, input_ids, positions):
        return self.embed(input_ids)

    def finish(self, x):
        return self.norm(x)

    def head(self) -> jax.Array:
        """Output embedding [D, V]."""
        return self.embed.as_head() if self.lm_head is None else self.lm_head[...]


def hf_rules(cfg: Config) -> list[Rule]:
    rules = [Rule("embed.table", "model.embed_tokens.weight"), Rule("norm.scale", "model.norm.weight")]
    if not cfg.tied:
        rules.append(transposed("lm_head.weight", "lm_head"))
    for i in range(cfg.layers):
        hf, us = f"model.layers.{i}", f"layers.{i}"
        for name, heads in (("q", cfg.heads), ("k", cfg.kv_heads), ("v", cfg.kv_heads)):
            rules.append(
                split_heads(f"{hf}.self_attn.{name}_proj.weight", f"{us}.attn.{name}", heads, cfg.head_dim)
            )
            if cfg.qkv_bias:
                rules.append(
                    split_heads(
                        f"{hf}.self_attn.{name}_proj.bias", f"{us}.attn.{name}_bias", heads, cfg.head_dim
                    )
                )
        rules.append(merge_heads(f"{hf}.self_attn.o_proj.weight", f"{us}.attn.o", cfg.heads, cfg.head_dim))
        if cfg.o_bias:
            rules.append(Rule(f"{us}.attn.o_bias", f"{hf}.self_attn.o_proj.bias"))
        if cfg.qk_norm:
            rules.append(Rule(f"{us}.attn.q_norm.scale", f"{hf}.self_attn.q_norm.weight"))
            rules.append(Rule(f"{us}.attn.k_norm.scale", f"{hf}.self_attn.k_norm.weight"))
        for name, ours in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            rules.append(transposed(f"{hf}.mlp.{name}.weight", f"{us}.mlp.{ours}"))
        if cfg.mlp_bias:
            for name, ours in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
                rules.append(Rule(f"{us}.mlp.{ours}_bias", f"{hf}.mlp.{name}.bias"))
        rules.append(Rule(f"{us}.attn_norm.scale", f"{hf}.input_layernorm.weight"))
        rules.append(Rule(f"{us}.mlp_norm.scale", f"{hf}.post_attention_layernorm.weight"))
    return rules


def ignore_hf_key(name: str) -> bool:
    """Checkpoint entries that are not parameters: rotary buffers, and a tied head's stored copy."""
    return name.endswith("rotary_emb.inv_freq") or name == "lm_head.weight"
