"""Blocks that several model families share: parameters with logical axes, norms, attention with a KV
cache, MLPs, rotary embeddings, masks.

KV cache (the sampler's interface). A self-attention layer's cache is ``{"k", "v"}``, each
``[B, kv_heads, S, head_dim]`` in the compute dtype, where ``S`` is a fixed number of *slots* (prompt
length + new tokens). Heads come before slots so that a decode step reads each head's keys contiguously:
with slots first, XLA on CPU transposes the whole cache every step (measured 14x slower attention).
A call with ``T`` new tokens writes them to slots ``[index, index + T)`` and attends over all ``S``
slots, masked by ``kv_valid [B, S]`` (which slots hold real tokens) and causality on slots. Left-padded
prompts simply have invalid leading slots; *positions* (for rotary or learned position embeddings) are
passed separately and count only real tokens, so a left-padded row computes exactly what the unpadded
row would.

LoRA hooks. ``Attention`` and ``MLP`` are the only places a family multiplies by a projection kernel, so
they are where low-rank adapters plug in: a ``LoRA`` block stored as ``lora_<kernel name>`` on the block
(``lora.apply`` adds them) has its update added to that projection. Without one nothing changes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from distillm_jax.models import stack
from distillm_jax.models.dropout import Dropout

Array = jax.Array
Cache = dict[str, Array]
MASKED = float(jnp.finfo(jnp.float32).min)  # finite, so an all-masked row softmaxes to uniform, not NaN


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], dtype, std: float = 0.02):
    """A normally initialised parameter carrying its logical axis names (see sharding.py)."""
    return nnx.Param(std * jax.random.normal(rngs.params(), tuple(shape), dtype), axes=tuple(axes))


def ones_param(shape: Sequence[int], axes: Sequence[str | None], dtype) -> nnx.Param:
    return nnx.Param(jnp.ones(tuple(shape), dtype), axes=tuple(axes))


def zeros_param(shape: Sequence[int], axes: Sequence[str | None], dtype) -> nnx.Param:
    return nnx.Param(jnp.zeros(tuple(shape), dtype), axes=tuple(axes))


def _gelu_exact(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=True)


# One function object per name: a block's graph holds it, so identical blocks have equal graphs (a scanned
# stack needs that) and a rebuilt model hits the jit cache.
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": _gelu_exact,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str):
    """HF activation names -> functions (gelu_new is the tanh approximation)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, computed in float32 (Llama, Qwen, T5's 'LayerNorm')."""

    def __init__(self, dim: int, eps: float, *, param_dtype, dtype, axes: str = "norm"):
        self.scale = ones_param((dim,), (axes,), param_dtype)
        self.eps, self.dtype = eps, dtype

    def __call__(self, x: Array) -> Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nnx.Module):
    """Standard LayerNorm with scale and bias, computed in float32 (GPT-2, OPT)."""

    def __init__(self, dim: int, eps: float, *, param_dtype, dtype, affine: bool = True):
        self.scale = ones_param((dim,), ("norm",), param_dtype) if affine else None
        self.bias = zeros_param((dim,), ("norm",), param_dtype) if affine else None
        self.eps, self.dtype = eps, dtype

    def __call__(self, x: Array) -> Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        xf = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        if self.scale is not None:
            xf = xf * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return xf.astype(self.dtype)


class Embed(nnx.Module):
    """Token embedding [V, D]; also the tied output head."""

    def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs, param_dtype, dtype, std: float = 0.02):
        self.table = param(rngs, (vocab, dim), ("vocab", "embed"), param_dtype, std)
        self.dtype = dtype

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.table[...], ids, axis=0).astype(self.dtype)

    def as_head(self) -> Array:
        """[D, V], the layout ``losses.chunked_divergence`` and ``logits`` take."""
        return self.table[...].T


def logits(hidden: Array, head: Array) -> Array:
    """[B, T, D] @ [D, V] -> float32 [B, T, V]."""
    return jnp.einsum("btd,dv->btv", hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)


# ---------------------------------------------------------------------------------------------------
# Positions and masks.


def default_positions(attention_mask: Array) -> Array:
    """Positions that count real tokens only: left padding does not shift them (as HF generate does)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def slot_mask(q_slots: Array, kv_valid: Array, *, causal: bool = True, window: int | None = None) -> Array:
    """Boolean [B, 1, Tq, S]: query slot may attend key slot (valid, not in the future, in the window)."""
    k_slots = jnp.arange(kv_valid.shape[-1])
    allowed = kv_valid[:, None, None, :].astype(bool)
    if causal:
        allowed = allowed & (k_slots[None, :] <= q_slots[:, None])[None, None]
    if window is not None:
        allowed = allowed & (k_slots[None, :] > q_slots[:, None] - window)[None, None]
    return allowed


ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(head_dim: int, rope: dict) -> Array:
    """Rotary inverse frequencies from HF ``rope_parameters`` (default, linear and llama3 scaling)."""
    theta = float(rope.get("rope_theta", 10000.0))
    inv = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    kind = rope.get("rope_type", rope.get("type", "default")) or "default"
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / rope["factor"]
    if kind == "llama3":
        factor, lo, hi = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        return jnp.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_type {kind!r}; supported: {', '.join(ROPE_TYPES)}")


def apply_rope(x: Array, positions: Array, inv_freq: Array) -> Array:
    """Rotate [B, T, H, Dh] by positions [B, T] (HF's rotate_half convention), in float32."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, Dh/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, -1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, -1)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    return (xf * cos + jnp.concatenate([-x2, x1], -1) * sin).astype(x.dtype)


# ---------------------------------------------------------------------------------------------------
# LoRA adapters (distillm_jax/lora.py adds, merges and exports them).


class LoRAParam(nnx.Param):
    """An adapter factor: its own variable type so that a LoRA run trains exactly these
    (``nnx.split(model, LoRAParam, ...)``) and leaves every other parameter frozen."""


class LoRA(nnx.Module):
    """The low-rank update ``(alpha / rank) * (dropout(x) A) B`` of a kernel whose first ``n_in`` dims
    are inputs: A [prod(in), rank] starts random, B [rank, prod(out)] zero, so a fresh adapter changes
    nothing. Factors are kept in the kernel's dtype and replicated (they are small); the update is
    computed in the projection's compute dtype. Its input dropout runs only in a training step
    (``dropout.set_key``)."""

    def __init__(
        self,
        shape: Sequence[int],
        n_in: int,
        *,
        rank: int,
        alpha: float,
        dropout: float,
        key,
        param_dtype,
    ):
        fan_in = math.prod(shape[:n_in])
        bound = fan_in**-0.5  # kaiming-uniform with a=sqrt(5), torch's Linear init, the usual choice for A
        a = jax.random.uniform(key, (fan_in, rank), param_dtype, -bound, bound)
        self.a = LoRAParam(a, axes=(None, None))
        self.b = LoRAParam(jnp.zeros((rank, math.prod(shape[n_in:])), param_dtype), axes=(None, None))
        self.n_in, self.out_shape = n_in, tuple(shape[n_in:])
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.drop = Dropout(dropout)

    def delta(self) -> Array:
        """The update as an [prod(in), prod(out)] float32 matrix, ``(alpha / rank) A B``."""
        return (self.alpha / self.rank) * (self.a[...].astype(jnp.float32) @ self.b[...].astype(jnp.float32))

    def __call__(self, x: Array, dtype) -> Array:
        lead = x.shape[: x.ndim - self.n_in]
        x = self.drop(x.reshape(*lead, -1).astype(dtype))
        y = (x @ self.a[...].astype(dtype)) @ self.b[...].astype(dtype)
        return (y * jnp.asarray(self.alpha / self.rank, dtype)).reshape(*lead, *self.out_shape)


def adapted(block: nnx.Module, name: str, x: Array, y: Array) -> Array:
    """``y``, the projection of ``x`` by ``block``'s kernel ``name``, plus that kernel's LoRA update when
    it has one."""
    lora = getattr(block, "lora_" + name, None)
    return y if lora is None else y + lora(x, y.dtype)


# ---------------------------------------------------------------------------------------------------
# Attention.


def dot_attention(
    q: Array, k: Array, v: Array, mask: Array, bias: Array | None, scale: float, drop: Dropout | None = None
) -> Array:
    """Grouped-query attention. q [B, Tq, H, Dh]; k, v [B, Hkv, S, Dh]; mask [B, 1, Tq, S]; bias
    broadcastable to [B, H, Tq, S]. Softmax in float32; ``drop``: dropout on the probabilities."""
    b, tq, h, dh = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, tq, hkv, h // hkv, dh)
    # Scores in the compute dtype, softmax in float32, as transformers' eager attention does (XLA:CPU also
    # has no bf16 x bf16 -> f32 kernel for these batched shapes).
    scores = jnp.einsum("bqkgd,bksd->bkgqs", qg, k).astype(jnp.float32) * scale
    if bias is not None:
        scores = scores + bias.astype(jnp.float32).reshape(bias.shape[0], hkv, h // hkv, *bias.shape[2:])
    scores = jnp.where(mask[:, :, None], scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    if drop is not None:
        probs = drop(probs)
    return jnp.einsum("bkgqs,bksd->bqkgd", probs, v).reshape(b, tq, h, v.shape[-1])


CAUSAL_BLOCK = 64  # the smallest query block of ``causal_attention``; shorter sequences run whole
CAUSAL_BLOCKS = 8  # at most this many blocks: the unrolled graph stays small at long sequence lengths


def causal_attention(
    q: Array, k: Array, v: Array, mask: Array, bias: Array | None, scale: float, drop: Dropout | None = None
) -> Array:
    """``dot_attention`` for causal self-attention over a whole sequence (query slot i is key slot i,
    no cache), by query blocks that attend only to the keys up to their own end. The keys after a
    block's end are masked for all of its queries, so leaving them out changes no valid output (up to
    summation order) while saving up to half of the scores, softmax and probabilities·values work, and
    the whole [Tq, S] score array never exists at once: about 1.8x faster per layer on CPU at T = 512.
    A query whose keys are all masked (left padding) averages its block's prefix instead of every key;
    it is padding, and padding keys are masked for every other query, so no valid position sees it."""
    t = q.shape[1]
    n = min(CAUSAL_BLOCKS, t // CAUSAL_BLOCK)
    if n < 2 or k.shape[2] != t:
        return dot_attention(q, k, v, mask, bias, scale, drop)
    ends = [round(t * (i + 1) / n) for i in range(n)]
    outs = []
    for start, end in zip([0, *ends[:-1]], ends, strict=True):
        part = None if bias is None else bias[:, :, start:end, :end]
        rows = mask[:, :, start:end, :end]
        outs.append(dot_attention(q[:, start:end], k[:, :, :end], v[:, :, :end], rows, part, scale, drop))
    return jnp.concatenate(outs, axis=1)


class Attention(nnx.Module):
    """Multi-head / grouped-query attention with optional biases, q/k norm, rotary, relative bias, a
    self-attention KV cache, and cross-attention (keys and values from another sequence)."""

    def __init__(
        self,
        d_model: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        *,
        rngs: nnx.Rngs,
        param_dtype,
        dtype,
        qkv_bias: bool = False,
        out_bias: bool = False,
        qk_norm_eps: float | None = None,
        std: float | tuple[float, float, float] = 0.02,
        dropout: float = 0.0,
    ):
        if heads % kv_heads:
            raise ValueError(f"attention heads ({heads}) must be a multiple of key/value heads ({kv_heads})")
        q_std, kv_std, o_std = std if isinstance(std, tuple) else (std, std, std)
        self.q = param(rngs, (d_model, heads, head_dim), ("embed", "heads", "head_dim"), param_dtype, q_std)
        self.k = param(
            rngs, (d_model, kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), param_dtype, kv_std
        )
        self.v = param(
            rngs, (d_model, kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), param_dtype, kv_std
        )
        self.o = param(rngs, (heads, head_dim, d_model), ("heads", "head_dim", "embed"), param_dtype, o_std)
        self.q_bias = zeros_param((heads, head_dim), ("heads", "head_dim"), param_dtype) if qkv_bias else None
        kv_bias = lambda: zeros_param((kv_heads, head_dim), ("kv_heads", "head_dim"), param_dtype)  # noqa: E731
        self.k_bias = kv_bias() if qkv_bias else None
        self.v_bias = kv_bias() if qkv_bias else None
        self.o_bias = zeros_param((d_model,), ("embed",), param_dtype) if out_bias else None
        norm = dict(param_dtype=param_dtype, dtype=dtype, axes="head_dim")
        self.q_norm = RMSNorm(head_dim, qk_norm_eps, **norm) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(head_dim, qk_norm_eps, **norm) if qk_norm_eps is not None else None
        self.drop = Dropout(dropout)  # on the attention probabilities
        self.dtype = dtype

    def _proj(self, x: Array, name: str) -> Array:
        y = jnp.einsum("btd,dhk->bthk", x, getattr(self, name)[...].astype(self.dtype))
        y = adapted(self, name, x, y)
        b = getattr(self, name + "_bias")
        return y if b is None else y + b[...].astype(self.dtype)

    def kv(self, x: Array, positions: Array | None = None, inv_freq: Array | None = None) -> Cache:
        """Keys and values of ``x`` [B, S, D] as [B, kv_heads, S, head_dim] (the cache layout; also what
        a cross-attention cache holds), rotated when ``inv_freq`` is given."""
        k = self._proj(x, "k")
        if self.k_norm is not None:
            k = self.k_norm(k)
        if inv_freq is not None:
            k = apply_rope(k, positions, inv_freq)
        return {"k": k.transpose(0, 2, 1, 3), "v": self._proj(x, "v").transpose(0, 2, 1, 3)}

    def __call__(
        self,
        x: Array,
        mask: Array,
        *,
        scale: float,
        positions: Array | None = None,
        inv_freq: Array | None = None,
        bias: Array | None = None,
        cache: Cache | None = None,
        cache_index: Array | int = 0,
        cross: Cache | None = None,
        causal: bool = False,
    ) -> tuple[Array, Cache | None]:
        """Self-attention over ``x`` (writing to ``cache`` when given), or cross-attention to the
        precomputed keys/values ``cross``. Returns the output and the updated cache. ``causal``: the
        caller's mask is causal, so without a cache the keys after each query block are skipped."""
        q = self._proj(x, "q")
        if self.q_norm is not None:
            q = self.q_norm(q)
        if cross is not None:
            kv = cross
        else:
            kv = self.kv(x, positions, inv_freq)
            if inv_freq is not None:
                q = apply_rope(q, positions, inv_freq)
            if cache is not None:
                at = (0, 0, cache_index, 0)
                kv = {n: jax.lax.dynamic_update_slice(cache[n], kv[n].astype(cache[n].dtype), at) for n in kv}
                cache = kv
        attend = causal_attention if causal and cache is None and cross is None else dot_attention
        out = attend(q, kv["k"], kv["v"], mask, bias, scale, self.drop)
        y = adapted(self, "o", out, jnp.einsum("bthk,hkd->btd", out, self.o[...].astype(self.dtype)))
        return (y if self.o_bias is None else y + self.o_bias[...].astype(self.dtype)), cache


def init_kv_cache(layers: int, batch: int, slots: int, kv_heads: int, head_dim: int, dtype) -> list[Cache]:
    """Zeroed self-attention caches, one ``{"k", "v"}`` per layer, [B, kv_heads, slots, head_dim]."""
    shape = (batch, kv_heads, slots, head_dim)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(layers)]


def grow_kv_cache(caches: list[Cache], slots: int) -> list[Cache]:
    """The caches with their self-attention slots ("k", "v") zero-padded to ``slots``; other entries (a
    decoder's cross-attention keys and values) as they are. The sampler grows its cache as tokens fill
    it, so that attention reads only the slots filled so far (rounded up to a segment)."""

    def grow(x: Array) -> Array:
        return jnp.pad(x, ((0, 0), (0, 0), (0, slots - x.shape[2]), (0, 0)))

    return [{**c, "k": grow(c["k"]), "v": grow(c["v"])} for c in caches]


class MLP(nnx.Module):
    """Gated (act(x W_gate) * x W_up) W_down, or plain act(x W_in + b) W_out + b; ``dropout`` on the
    hidden activations before W_down (T5's)."""

    def __init__(
        self,
        d_model: int,
        hidden: int,
        act: str,
        *,
        gated: bool,
        bias: bool,
        rngs: nnx.Rngs,
        param_dtype,
        dtype,
        std: float | tuple[float, float] = 0.02,
        dropout: float = 0.0,
    ):
        in_std, out_std = std if isinstance(std, tuple) else (std, std)
        self.gate = param(rngs, (d_model, hidden), ("embed", "mlp"), param_dtype, in_std) if gated else None
        self.up = param(rngs, (d_model, hidden), ("embed", "mlp"), param_dtype, in_std)
        self.down = param(rngs, (hidden, d_model), ("mlp", "embed"), param_dtype, out_std)
        self.gate_bias = zeros_param((hidden,), ("mlp",), param_dtype) if bias and gated else None
        self.up_bias = zeros_param((hidden,), ("mlp",), param_dtype) if bias else None
        self.down_bias = zeros_param((d_model,), ("embed",), param_dtype) if bias else None
        self.act, self.dtype = activation(act), dtype
        self.drop = Dropout(dropout)

    def __call__(self, x: Array) -> Array:
        w = lambda p: p[...].astype(self.dtype)  # noqa: E731
        h = adapted(self, "up", x, x @ w(self.up))
        if self.up_bias is not None:
            h = h + w(self.up_bias)
        if self.gate is None:
            h = self.act(h)
        else:
            g = adapted(self, "gate", x, x @ w(self.gate))
            h = self.act(g if self.gate_bias is None else g + w(self.gate_bias)) * h
        h = self.drop(h)
        y = adapted(self, "down", h, h @ w(self.down))
        return y if self.down_bias is None else y + w(self.down_bias)


class NormBlock(nnx.Module):
    """A LayerNorm transformer block, pre-norm (GPT-2, most OPT) or post-norm (OPT-350m): attention
    with biases and a plain MLP; dropout on the attention probabilities and on each sublayer's output
    before its residual add (``cfg.dropout``'s ``attn`` and ``resid``)."""

    def __init__(self, cfg, *, pre_norm: bool, affine: bool = True, rngs: nnx.Rngs, param_dtype, dtype):
        kw = dict(param_dtype=param_dtype, dtype=dtype)
        self.attn_norm = LayerNorm(cfg.d_model, cfg.eps, affine=affine, **kw)
        self.attn = Attention(
            cfg.d_model,
            cfg.heads,
            cfg.heads,
            cfg.head_dim,
            rngs=rngs,
            qkv_bias=cfg.bias,
            out_bias=cfg.bias,
            dropout=cfg.dropout.get("attn"),
            **kw,
        )
        self.mlp_norm = LayerNorm(cfg.d_model, cfg.eps, affine=affine, **kw)
        self.mlp = MLP(cfg.d_model, cfg.mlp, cfg.act, gated=False, bias=cfg.bias, rngs=rngs, **kw)
        self.resid = Dropout(cfg.dropout.get("resid"))
        self.pre_norm, self.scale = pre_norm, cfg.head_dim**-0.5

    def __call__(self, x, mask, positions, cache, cache_index):
        h = self.attn_norm(x) if self.pre_norm else x
        h, cache = self.attn(h, mask, scale=self.scale, cache=cache, cache_index=cache_index, causal=True)
        h = self.resid(h)
        x = x + h if self.pre_norm else self.attn_norm(x + h)
        h = self.resid(self.mlp(self.mlp_norm(x) if self.pre_norm else x))
        return (x + h if self.pre_norm else self.mlp_norm(x + h)), cache


class FullMultiHead:
    """Config mixin for families with plain multi-head attention (GPT-2, OPT): as many key/value heads
    as query heads, head_dim = d_model / heads."""

    @property
    def kv_heads(self) -> int:
        return self.heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads


class CausalLM(nnx.Module):
    """What every decoder-only family shares: masks, positions, the KV cache and the layer loop.

    A family sets ``config`` (with layers, kv_heads, head_dim, window), ``layers`` (blocks called as
    ``block(x, mask, positions, cache, cache_index)``), ``dtype``, and implements ``embed_inputs``,
    ``finish`` (final norm/projection) and ``head`` ([D, V] output embedding).
    """

    def init_cache(self, batch: int, slots: int) -> list[Cache]:
        c = self.config
        return init_kv_cache(c.layers, batch, slots, c.kv_heads, c.head_dim, self.dtype)

    def hidden(self, input_ids, attention_mask, *, positions=None, cache=None, cache_index=0):
        """Final hidden states [B, T, D] and the updated cache. Without a cache ``attention_mask`` is
        [B, T]; with one it is [B, S] over cache slots and ``positions`` [B, T] must be given."""
        if positions is None:
            if cache is not None:
                raise ValueError("decoding with a cache needs explicit positions")
            positions = default_positions(attention_mask)
        q_slots = cache_index + jnp.arange(input_ids.shape[1])
        mask = slot_mask(q_slots, attention_mask, window=self.config.window)
        x = self.embed_inputs(input_ids, positions)
        if cache is None:  # training, evaluation, scoring: as the model's layer setting says
            x = stack.run(self.layers, x, lambda b, x: b(x, mask, positions, None, 0)[0], stack.setting(self))
            return self.finish(x), None
        new_cache = []
        for block, layer_cache in zip(self.layers, cache, strict=True):
            x, c = block(x, mask, positions, layer_cache, cache_index)
            new_cache.append(c)
        return self.finish(x), new_cache

    def __call__(self, input_ids, attention_mask):
        """Float32 logits [B, T, V]; left padding allowed."""
        return logits(self.hidden(input_ids, attention_mask)[0], self.head())
