"""GPT-2: learned positions, pre-LayerNorm blocks, fused q/k/v in the Conv1D [in, out] weight layout,
head tied to the token embedding."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from distillm_jax.models import layers as L
from distillm_jax.models.dropout import Dropout, Rates
from distillm_jax.models.hf_io import Rule, merge_heads, split_heads, with_prefix

MODEL_TYPES = ("gpt2",)


@dataclasses.dataclass(frozen=True)
class Config(L.FullMultiHead):
    vocab: int
    positions: int
    d_model: int
    mlp: int
    layers: int
    heads: int
    eps: float
    act: str
    bias: bool = True
    window: None = None
    dropout: Rates = dataclasses.field(default_factory=Rates)

    @classmethod
    def from_hf(cls, c) -> Config:
        if getattr(c, "scale_attn_by_inverse_layer_idx", False) or not getattr(c, "scale_attn_weights", True):
            raise ValueError(
                "gpt2 with scale_attn_by_inverse_layer_idx or without scale_attn_weights is not supported"
            )
        return cls(
            vocab=c.vocab_size,
            positions=c.n_positions,
            d_model=c.n_embd,
            mlp=c.n_inner or 4 * c.n_embd,
            layers=c.n_layer,
            heads=c.n_head,
            eps=c.layer_norm_epsilon,
            act=c.activation_function,
            dropout=Rates(embed=c.embd_pdrop, attn=c.attn_pdrop, resid=c.resid_pdrop),
        )


class Model(L.CausalLM):
    """GPT-2 LM head model. ``model(ids, mask)`` -> float32 logits [B, T, V]."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=jnp.float32):
        kw = dict(param_dtype=param_dtype, dtype=dtype)
        self.config, self.dtype = cfg, dtype
        self.wte = L.Embed(cfg.vocab, cfg.d_model, rngs=rngs, **kw)
        self.wpe = L.param(rngs, (cfg.positions, cfg.d_model), ("positions", "embed"), param_dtype)
        self.layers = nnx.List([L.NormBlock(cfg, pre_norm=True, rngs=rngs, **kw) for _ in range(cfg.layers)])
        self.ln_f = L.LayerNorm(cfg.d_model, cfg.eps, **kw)
        self.embed_drop = Dropout(cfg.dropout.get("embed"))

    def embed_inputs(self, input_ids, positions):
        x = self.wte(input_ids) + jnp.take(self.wpe[...], positions, axis=0).astype(self.dtype)
        return self.embed_drop(x)

    def finish(self, x):
        return self.ln_f(x)

    def head(self) -> jax.Array:
        return self.wte.as_head()


def hf_rules(cfg: Config) -> list[Rule]:
    h, dh = cfg.heads, cfg.head_dim
    rules = [
        Rule("wte.table", "transformer.wte.weight"),
        Rule("wpe", "transformer.wpe.weight"),
        Rule("ln_f.scale", "transformer.ln_f.weight"),
        Rule("ln_f.bias", "transformer.ln_f.bias"),
    ]
    for i in range(cfg.layers):
        hf, us = f"transformer.h.{i}", f"layers.{i}"
        for j, name in enumerate("qkv"):  # c_attn fuses q, k, v along its output axis
            rules.append(
                split_heads(
                    f"{hf}.attn.c_attn.weight", f"{us}.attn.{name}", h, dh, linear=False, part=(j, 3, 1)
                )
            )
            rules.append(
                split_heads(f"{hf}.attn.c_attn.bias", f"{us}.attn.{name}_bias", h, dh, part=(j, 3, 0))
            )
        rules += [
            merge_heads(f"{hf}.attn.c_proj.weight", f"{us}.attn.o", h, dh, linear=False),
            Rule(f"{us}.attn.o_bias", f"{hf}.attn.c_proj.bias"),
            Rule(f"{us}.mlp.up", f"{hf}.mlp.c_fc.weight"),
            Rule(f"{us}.mlp.up_bias", f"{hf}.mlp.c_fc.bias"),
            Rule(f"{us}.mlp.down", f"{hf}.mlp.c_proj.weight"),
            Rule(f"{us}.mlp.down_bias", f"{hf}.mlp.c_proj.bias"),
            Rule(f"{us}.attn_norm.scale", f"{hf}.ln_1.weight"),
            Rule(f"{us}.attn_norm.bias", f"{hf}.ln_1.bias"),
            Rule(f"{us}.mlp_norm.scale", f"{hf}.ln_2.weight"),
            Rule(f"{us}.mlp_norm.bias", f"{hf}.ln_2.bias"),
        ]
    return rules


def canonical_keys(tensors: dict) -> dict:
    """The original hub GPT-2 checkpoints name tensors without the ``transformer.`` prefix."""
    return with_prefix(tensors, "transformer.")


def ignore_hf_key(name: str) -> bool:
    """Causal-mask buffers of old checkpoints and the tied head's stored copy."""
    return name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight"
