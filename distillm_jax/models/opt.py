"""OPT: learned positions offset by 2, pre- or post-LayerNorm blocks (``do_layer_norm_before``), and
project_in/project_out when the embedding width differs from the hidden size (OPT-350m). The head is
tied to the token embedding. Dropout as transformers' OPT: ``dropout`` on each sublayer's output,
``attention_dropout`` on the attention probabilities, none on the embeddings; ``layerdrop`` (0 in
every released checkpoint) is not implemented."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from distillm_jax.models import layers as L
from distillm_jax.models.dropout import Rates
from distillm_jax.models.hf_io import Rule, merge_heads, split_heads, transposed, with_prefix

MODEL_TYPES = ("opt",)
POSITION_OFFSET = 2  # OPT's learned position table starts two rows in


@dataclasses.dataclass(frozen=True)
class Config(L.FullMultiHead):
    vocab: int
    positions: int
    d_model: int
    d_embed: int
    mlp: int
    layers: int
    heads: int
    act: str
    bias: bool
    pre_norm: bool
    affine: bool
    final_norm: bool
    eps: float = 1e-5
    window: None = None
    dropout: Rates = dataclasses.field(default_factory=Rates)

    @classmethod
    def from_hf(cls, c) -> Config:
        pre = bool(c.do_layer_norm_before)
        return cls(
            vocab=c.vocab_size,
            positions=c.max_position_embeddings,
            d_model=c.hidden_size,
            d_embed=c.word_embed_proj_dim or c.hidden_size,
            mlp=c.ffn_dim,
            layers=c.num_hidden_layers,
            heads=c.num_attention_heads,
            act=c.activation_function,
            bias=bool(getattr(c, "enable_bias", True)),
            pre_norm=pre,
            affine=bool(getattr(c, "layer_norm_elementwise_affine", True)),
            final_norm=pre and not getattr(c, "_remove_final_layer_norm", False),
            dropout=Rates(attn=getattr(c, "attention_dropout", 0.0), resid=getattr(c, "dropout", 0.0)),
        )


class Model(L.CausalLM):
    """OPT causal LM. ``model(ids, mask)`` -> float32 logits [B, T, V]."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=jnp.float32):
        kw = dict(param_dtype=param_dtype, dtype=dtype)
        self.config, self.dtype = cfg, dtype
        self.embed = L.Embed(cfg.vocab, cfg.d_embed, rngs=rngs, **kw)
        rows = cfg.positions + POSITION_OFFSET
        self.positions = L.param(rngs, (rows, cfg.d_model), ("positions", "embed"), param_dtype)
        projected = cfg.d_embed != cfg.d_model
        self.project_in = (
            L.param(rngs, (cfg.d_embed, cfg.d_model), (None, "embed"), param_dtype) if projected else None
        )
        self.project_out = (
            L.param(rngs, (cfg.d_model, cfg.d_embed), ("embed", None), param_dtype) if projected else None
        )
        block = dict(pre_norm=cfg.pre_norm, affine=cfg.affine, rngs=rngs, **kw)
        self.layers = nnx.List([L.NormBlock(cfg, **block) for _ in range(cfg.layers)])
        self.final_norm = (
            L.LayerNorm(cfg.d_model, cfg.eps, affine=cfg.affine, **kw) if cfg.final_norm else None
        )

    def embed_inputs(self, input_ids, positions):
        x = self.embed(input_ids)
        if self.project_in is not None:
            x = x @ self.project_in[...].astype(self.dtype)
        return x + jnp.take(self.positions[...], positions + POSITION_OFFSET, axis=0).astype(self.dtype)

    def finish(self, x):
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x if self.project_out is None else x @ self.project_out[...].astype(self.dtype)

    def head(self) -> jax.Array:
        return self.embed.as_head()


def hf_rules(cfg: Config) -> list[Rule]:
    hf0 = "model.decoder"
    rules = [
        Rule("embed.table", f"{hf0}.embed_tokens.weight"),
        Rule("positions", f"{hf0}.embed_positions.weight"),
    ]
    if cfg.d_embed != cfg.d_model:
        rules += [
            transposed(f"{hf0}.project_in.weight", "project_in"),
            transposed(f"{hf0}.project_out.weight", "project_out"),
        ]
    if cfg.final_norm and cfg.affine:
        rules += [
            Rule("final_norm.scale", f"{hf0}.final_layer_norm.weight"),
            Rule("final_norm.bias", f"{hf0}.final_layer_norm.bias"),
        ]
    h, dh = cfg.heads, cfg.head_dim
    for i in range(cfg.layers):
        hf, us = f"{hf0}.layers.{i}", f"layers.{i}"
        for name in "qkv":
            rules.append(split_heads(f"{hf}.self_attn.{name}_proj.weight", f"{us}.attn.{name}", h, dh))
        rules += [
            merge_heads(f"{hf}.self_attn.out_proj.weight", f"{us}.attn.o", h, dh),
            transposed(f"{hf}.fc1.weight", f"{us}.mlp.up"),
            transposed(f"{hf}.fc2.weight", f"{us}.mlp.down"),
        ]
        if cfg.bias:
            for name in "qkv":
                rules.append(split_heads(f"{hf}.self_attn.{name}_proj.bias", f"{us}.attn.{name}_bias", h, dh))
            rules += [
                Rule(f"{us}.attn.o_bias", f"{hf}.self_attn.out_proj.bias"),
                Rule(f"{us}.mlp.up_bias", f"{hf}.fc1.bias"),
                Rule(f"{us}.mlp.down_bias", f"{hf}.fc2.bias"),
            ]
        if cfg.affine:
            for hf_norm, ours in (("self_attn_layer_norm", "attn_norm"), ("final_layer_norm", "mlp_norm")):
                rules += [
                    Rule(f"{us}.{ours}.scale", f"{hf}.{hf_norm}.weight"),
                    Rule(f"{us}.{ours}.bias", f"{hf}.{hf_norm}.bias"),
                ]
    return rules


def canonical_keys(tensors: dict) -> dict:
    """Older hub OPT checkpoints name tensors ``decoder.*`` without the ``model.`` prefix."""
    return with_prefix(tensors, "model.")


def ignore_hf_key(name: str) -> bool:
    return name == "lm_head.weight"
