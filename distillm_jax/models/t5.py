"""The T5 family: original T5 (ReLU MLP, tied head), T5 v1.1 / Flan-T5 and mT5 (gated-GELU MLP, untied
head). Encoder-decoder with pre-norm RMSNorm blocks, unscaled attention and a learned relative position
bias per stack, computed once and shared by all its layers (HF stores it in block 0).

Tied or untied head. In transformers 5 ``T5Config``/``MT5Config`` always say ``tie_word_embeddings=True``;
T5Config keeps the checkpoint's own flag as ``scale_decoder_outputs``, and MT5 never rescales. Every
released checkpoint either ties the head *and* rescales the decoder output by ``d_model**-0.5`` (T5) or
does neither (v1.1, Flan-T5, mT5: separate ``lm_head.weight``), so one ``tied`` flag covers both.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from distillm_jax.models import layers as L
from distillm_jax.models import stack
from distillm_jax.models.dropout import Dropout, Rates
from distillm_jax.models.hf_io import Rule, merge_heads, split_heads, transposed

MODEL_TYPES = ("t5", "mt5")


@dataclasses.dataclass(frozen=True)
class Config:
    vocab: int
    d_model: int
    d_kv: int
    d_ff: int
    enc_layers: int
    dec_layers: int
    heads: int
    buckets: int
    max_distance: int
    eps: float
    act: str
    gated: bool
    tied: bool
    dropout: Rates = dataclasses.field(default_factory=Rates)

    @classmethod
    def from_hf(cls, c) -> Config:
        if c.model_type == "mt5":
            tied = False  # see the module docstring
        else:  # transformers < 5 has no scale_decoder_outputs and keeps tie_word_embeddings as stored
            tied = bool(getattr(c, "scale_decoder_outputs", c.tie_word_embeddings))
        return cls(
            vocab=c.vocab_size,
            d_model=c.d_model,
            d_kv=c.d_kv,
            d_ff=c.d_ff,
            enc_layers=c.num_layers,
            dec_layers=c.num_decoder_layers if c.num_decoder_layers is not None else c.num_layers,
            heads=c.num_heads,
            buckets=c.relative_attention_num_buckets,
            max_distance=c.relative_attention_max_distance,
            eps=c.layer_norm_epsilon,
            act=c.dense_act_fn,
            gated=bool(c.is_gated_act),
            tied=tied,
            # dropout_rate everywhere transformers' T5 drops: embeddings, attention probabilities, each
            # sublayer's output, the MLP's activations, after the final norm.
            dropout=Rates(*[c.dropout_rate] * 5),
        )


def relative_buckets(rel: jax.Array, *, bidirectional: bool, buckets: int, max_distance: int) -> jax.Array:
    """HF's ``_relative_position_bucket`` (key position - query position -> bucket), same float32 ops so
    that the logarithmic bucket boundaries round the same way."""
    out = jnp.zeros_like(rel)
    if bidirectional:
        buckets //= 2
        out = out + (rel > 0).astype(rel.dtype) * buckets
        rel = jnp.abs(rel)
    else:
        rel = -jnp.minimum(rel, 0)
    exact = buckets // 2
    ratio = jnp.log(jnp.maximum(rel, 1).astype(jnp.float32) / exact) / jnp.float32(
        math.log(max_distance / exact)
    )
    large = jnp.minimum(exact + (ratio * (buckets - exact)).astype(rel.dtype), buckets - 1)
    return out + jnp.where(rel < exact, rel, large)


class Block(nnx.Module):
    """Self-attention, cross-attention (decoder only), MLP; each pre-norm with a residual, its output
    dropped out before the add (``cfg.dropout.resid``)."""

    def __init__(self, cfg: Config, *, cross: bool, rngs: nnx.Rngs, param_dtype, dtype):
        kw = dict(param_dtype=param_dtype, dtype=dtype)
        # HF's T5 initialisation (a new model trains as a new HF T5 would): q (d_model·d_kv)^-½,
        # k/v d_model^-½, o (heads·d_kv)^-½, MLP in d_model^-½ / out d_ff^-½.
        d, inner = cfg.d_model, cfg.heads * cfg.d_kv
        std = ((d * cfg.d_kv) ** -0.5, d**-0.5, inner**-0.5)
        drop = cfg.dropout.get("attn")
        attn = lambda: L.Attention(  # noqa: E731
            d, cfg.heads, cfg.heads, cfg.d_kv, rngs=rngs, std=std, dropout=drop, **kw
        )
        self.attn_norm = L.RMSNorm(cfg.d_model, cfg.eps, **kw)
        self.attn = attn()
        self.cross_norm = L.RMSNorm(cfg.d_model, cfg.eps, **kw) if cross else None
        self.cross = attn() if cross else None
        self.mlp_norm = L.RMSNorm(cfg.d_model, cfg.eps, **kw)
        mlp = dict(gated=cfg.gated, bias=False, std=(d**-0.5, cfg.d_ff**-0.5), dropout=cfg.dropout.get("act"))
        self.mlp = L.MLP(d, cfg.d_ff, cfg.act, rngs=rngs, **mlp, **kw)
        self.resid = Dropout(cfg.dropout.get("resid"))

    def __call__(self, x, mask, bias, *, cache=None, cache_index=0, cross=None, cross_mask=None):
        causal = self.cross is not None  # the decoder's self-attention
        h, cache = self.attn(
            self.attn_norm(x), mask, scale=1.0, bias=bias, cache=cache, cache_index=cache_index, causal=causal
        )
        x = x + self.resid(h)
        if self.cross is not None:
            x = x + self.resid(self.cross(self.cross_norm(x), cross_mask, scale=1.0, cross=cross)[0])
        return x + self.resid(self.mlp(self.mlp_norm(x))), cache


class Stack(nnx.Module):
    """The encoder or the decoder: blocks, their shared relative position bias, the final norm; dropout
    on its input embeddings and on its output."""

    def __init__(self, cfg: Config, layers: int, *, decoder: bool, rngs: nnx.Rngs, param_dtype, dtype):
        kw = dict(param_dtype=param_dtype, dtype=dtype)
        self.blocks = nnx.List([Block(cfg, cross=decoder, rngs=rngs, **kw) for _ in range(layers)])
        self.rel_bias = L.param(
            rngs, (cfg.buckets, cfg.heads), ("rel_buckets", "heads"), param_dtype, std=cfg.d_model**-0.5
        )
        self.norm = L.RMSNorm(cfg.d_model, cfg.eps, **kw)
        self.embed_drop = Dropout(cfg.dropout.get("embed"))
        self.final_drop = Dropout(cfg.dropout.get("final"))
        self.decoder, self.buckets, self.max_distance = decoder, cfg.buckets, cfg.max_distance

    def position_bias(self, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
        """[1, heads, Tq, S]; the decoder's buckets are causal (only keys behind the query count)."""
        rel = k_pos[None, :] - q_pos[:, None]
        b = relative_buckets(
            rel, bidirectional=not self.decoder, buckets=self.buckets, max_distance=self.max_distance
        )
        return jnp.take(self.rel_bias[...], b, axis=0).transpose(2, 0, 1)[None]


class Model(nnx.Module):
    """Encoder-decoder LM. ``model(ids, mask, dec_ids, dec_mask)`` -> float32 logits [B, T_dec, V].

    Decoder cache (``init_cache``): per layer ``{"k", "v"}`` self-attention slots as in layers.py, plus
    the cross-attention keys/values ``"ck", "cv"`` [B, heads, S_enc, d_kv] and the encoder mask
    ``"enc_mask"`` [B, S_enc], all computed once from the encoder output.
    """

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=jnp.float32):
        kw = dict(param_dtype=param_dtype, dtype=dtype)
        self.config, self.dtype = cfg, dtype
        self.shared = L.Embed(cfg.vocab, cfg.d_model, rngs=rngs, std=1.0, **kw)  # HF: factor 1.0
        self.encoder = Stack(cfg, cfg.enc_layers, decoder=False, rngs=rngs, **kw)
        self.decoder = Stack(cfg, cfg.dec_layers, decoder=True, rngs=rngs, **kw)
        self.lm_head = (
            None
            if cfg.tied
            else L.param(rngs, (cfg.d_model, cfg.vocab), ("embed", "vocab"), param_dtype, std=1.0)
        )

    def head(self) -> jax.Array:
        """Output embedding [D, V]."""
        return self.shared.as_head() if self.lm_head is None else self.lm_head[...]

    def encode(self, input_ids, attention_mask) -> jax.Array:
        """Encoder final hidden states [B, S, D]; bidirectional, padded keys masked."""
        pos = jnp.arange(input_ids.shape[1])
        mask = L.slot_mask(pos, attention_mask, causal=False)
        bias = self.encoder.position_bias(pos, pos)
        x = self.encoder.embed_drop(self.shared(input_ids))
        x = stack.run(self.encoder.blocks, x, lambda b, x: b(x, mask, bias)[0], stack.setting(self))
        return self.encoder.final_drop(self.encoder.norm(x))

    def init_cache(self, batch: int, slots: int, encoder_hidden, encoder_mask) -> list[L.Cache]:
        c = self.config
        caches = L.init_kv_cache(c.dec_layers, batch, slots, c.heads, c.d_kv, self.dtype)
        enc = encoder_hidden.astype(self.dtype)
        out = []
        for cache, block in zip(caches, self.decoder.blocks, strict=True):
            cross = block.cross.kv(enc)
            out.append({**cache, "ck": cross["k"], "cv": cross["v"], "enc_mask": encoder_mask})
        return out

    def hidden(
        self,
        decoder_input_ids,
        decoder_attention_mask,
        encoder_hidden,
        encoder_mask,
        *,
        cache=None,
        cache_index=0,
    ):
        """Decoder final hidden states [B, T, D], rescaled for a tied head so that
        ``logits(hidden, head())`` are the logits, and the updated cache. Without a cache the mask is
        [B, T]; with one it is [B, S] over cache slots, and the cross-attention inputs come from the cache
        (``encoder_hidden`` and ``encoder_mask`` are then not used). Positions are decoder slots."""
        t = decoder_input_ids.shape[1]
        q_pos = cache_index + jnp.arange(t)
        mask = L.slot_mask(q_pos, decoder_attention_mask)
        bias = self.decoder.position_bias(q_pos, jnp.arange(decoder_attention_mask.shape[1]))
        enc_mask = encoder_mask if cache is None else cache[0]["enc_mask"]
        cross_mask = L.slot_mask(q_pos, enc_mask, causal=False)
        x = self.decoder.embed_drop(self.shared(decoder_input_ids))
        new_cache = []
        if cache is None:  # training, evaluation, scoring: as the model's layer setting says

            def layer(block, x):
                cross = block.cross.kv(encoder_hidden)
                return block(x, mask, bias, cache=None, cache_index=0, cross=cross, cross_mask=cross_mask)[0]

            x = stack.run(self.decoder.blocks, x, layer, stack.setting(self))
        for block, c in zip(self.decoder.blocks, cache or (), strict=cache is not None):
            self_kv, cross = {"k": c["k"], "v": c["v"]}, {"k": c["ck"], "v": c["cv"]}
            x, kv = block(
                x, mask, bias, cache=self_kv, cache_index=cache_index, cross=cross, cross_mask=cross_mask
            )
            new_cache.append({**c, **kv})
        x = self.decoder.final_drop(self.decoder.norm(x))
        if self.config.tied:  # HF does this before a tied head (T5's embeddings are not scaled on input)
            x = x * self.config.d_model**-0.5
        return x, (None if cache is None else new_cache)

    def __call__(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask):
        enc = self.encode(input_ids, attention_mask)
        h, _ = self.hidden(decoder_input_ids, decoder_attention_mask, enc, attention_mask)
        return L.logits(h, self.head())


def _attention_rules(hf: str, us: str, cfg: Config) -> list[Rule]:
    rules = [split_heads(f"{hf}.{n}.weight", f"{us}.{n}", cfg.heads, cfg.d_kv) for n in "qkv"]
    return [*rules, merge_heads(f"{hf}.o.weight", f"{us}.o", cfg.heads, cfg.d_kv)]


def _stack_rules(stack: str, layers: int, cfg: Config) -> list[Rule]:
    rules = [
        Rule(f"{stack}.norm.scale", f"{stack}.final_layer_norm.weight"),
        Rule(f"{stack}.rel_bias", f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
    ]
    mlp = (("wi_0", "gate"), ("wi_1", "up"), ("wo", "down")) if cfg.gated else (("wi", "up"), ("wo", "down"))
    for i in range(layers):
        hf, us = f"{stack}.block.{i}.layer", f"{stack}.blocks.{i}"
        parts = [("0", "SelfAttention", "attn")]
        if stack == "decoder":
            parts.append(("1", "EncDecAttention", "cross"))
        for n, name, ours in parts:
            rules += _attention_rules(f"{hf}.{n}.{name}", f"{us}.{ours}", cfg)
            rules.append(Rule(f"{us}.{ours}_norm.scale", f"{hf}.{n}.layer_norm.weight"))
        ff = f"{hf}.{len(parts)}"
        rules += [transposed(f"{ff}.DenseReluDense.{name}.weight", f"{us}.mlp.{ours}") for name, ours in mlp]
        rules.append(Rule(f"{us}.mlp_norm.scale", f"{ff}.layer_norm.weight"))
    return rules


def hf_rules(cfg: Config) -> list[Rule]:
    rules = [Rule("shared.table", "shared.weight")]
    rules += _stack_rules("encoder", cfg.enc_layers, cfg) + _stack_rules("decoder", cfg.dec_layers, cfg)
    if not cfg.tied:
        rules.append(transposed("lm_head.weight", "lm_head"))
    return rules


def canonical_keys(tensors: dict) -> dict:
    """Fill in tied tensors a checkpoint stores only once, the way transformers ties them: ``shared`` from
    a stack's ``embed_tokens``, and a missing ``lm_head.weight`` from ``shared`` (transformers 5 saves
    a v1.1/mT5 model built from its config that way: head tied, output not rescaled; we load the head as
    an untied copy, which computes the same)."""
    out = dict(tensors)
    for name in ("shared.weight", "lm_head.weight"):
        src = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
        found = [k for k in src if k in out]
        if name not in out and found:
            out[name] = out[found[0]]
    return out


_IGNORED = {
    "encoder.embed_tokens.weight",  # copies of shared.weight
    "decoder.embed_tokens.weight",
    "lm_head.weight",  # a tied head's copy (an untied head's rule takes it first)
    "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",  # unused; in old checkpoints
}


def ignore_hf_key(name: str) -> bool:
    return name in _IGNORED


def export_config(config: dict, cfg: Config) -> dict:
    """transformers 5 reports tie_word_embeddings=True for every T5; write what the weights are."""
    return {**config, "tie_word_embeddings": cfg.tied}
