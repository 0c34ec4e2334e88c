"""The sampler: prefill, then a ``lax.while_loop`` decode over a fixed-size KV cache.

One jitted function per (model graph, settings, shapes): evaluation (ROUGE-L, BLEU) and student-generated
outputs call the same code on the training state's params, which are passed in, not copied or closed
over. The loop stops as soon as every row has produced its EOS. Decoder-only prompts may be padded on
either side: rows are left-aligned first, and positions count real tokens only, so a padded row generates
what it would alone. Encoder-decoder models run the encoder once; the decoder caches cross-attention keys
and values.

The cache grows in segments (``segment_ends``): the loop runs once per segment, each over a cache just
long enough for the tokens of that segment, so that a step attends over the slots filled so far (rounded
up) rather than the whole sequence's — on CPU, where decoding is bound by the bytes it reads, the
attention over empty slots was a quarter or more of a step. Each segment compiles its own loop body, so
there are few (``MAX_SEGMENTS``) and none shorter than ``MIN_SEGMENT`` tokens.

MiniLLM draws its rollouts from a teacher-student mixture: with ``mix_model`` the teacher runs in
lockstep with the student in the same loop (each with its own cache, both fed every drawn token), and
each token comes from ``mix_alpha * p_teacher + (1 - mix_alpha) * q_student``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from distillm_jax import sharding as shd
from distillm_jax.models import layers as L

Array = jax.Array
NEG_INF = -jnp.inf
MIN_SEGMENT = 32  # new tokens
MAX_SEGMENTS = 4


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a sampler draws tokens: softmax(logits / temperature) after top-k (0: off) and top-p; a
    temperature of 0 is greedy. A run's samplers (evaluation, SGOs, a method's cached responses) each
    take one, read from their config group (``of``)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    @classmethod
    def of(cls, group) -> Sampling:
        """From a config group with ``temperature``, ``top_p`` and (optionally) ``top_k``."""
        return cls(float(group.temperature), int(group.get("top_k", 0)), float(group.top_p))


def segment_ends(n_new: int) -> tuple[int, ...]:
    """Where the decode loop's segments end, in new tokens: at most ``MAX_SEGMENTS`` of equal length
    (the last may be shorter), none of them under ``MIN_SEGMENT`` but the last (so short generations
    keep one loop, one compiled body)."""
    length = max(MIN_SEGMENT, -(-n_new // MAX_SEGMENTS))
    return (*range(length, n_new, length), n_new)


def first_new_slot(prompt_len: int, encoder_decoder: bool) -> int:
    """The cache slot of the first generated token: after the prompt in a decoder-only cache, after the
    start token in an encoder-decoder's own (the prompt lives in the encoder)."""
    return 1 if encoder_decoder else prompt_len


def cache_slots_held(prompt_len: int, n_new: int, encoder_decoder: bool) -> int:
    """The most key/value slots per layer a sampler holds at once (what a memory plan must budget):
    the self-attention cache of the last segment and, while it is grown from the previous one, that one
    too; plus, for an encoder-decoder, the cross-attention entries over the prompt. A decoder-only
    cache holds prompt and new tokens; an encoder-decoder's own cache only the start and new tokens."""
    offset = first_new_slot(prompt_len, encoder_decoder)
    ends = segment_ends(n_new)
    held = offset + ends[-1] + (offset + ends[-2] if len(ends) > 1 else 0)
    return held + (prompt_len if encoder_decoder else 0)


def _ban_repeated_ngrams(logits: Array, seq: Array, length: Array, n: int) -> Array:
    """HF's no_repeat_ngram_size: forbid every token that would complete an n-gram already present
    in ``seq[:, :length]`` (prompt, padding included as HF does, and generated tokens)."""
    b, total = seq.shape
    if n == 1:
        banned = seq
        valid = jnp.arange(total)[None, :] < length
    else:
        tail = jax.lax.dynamic_slice_in_dim(seq, length - (n - 1), n - 1, axis=1)  # last n-1 tokens
        starts = jnp.arange(total - n + 1)
        windows = jnp.stack([seq[:, k : k + total - n + 1] for k in range(n - 1)], axis=-1)  # [B, W, n-1]
        hit = jnp.all(windows == tail[:, None, :], axis=-1) & (starts + n - 1 < length)[None, :]
        hit = hit & (length >= n - 1)
        banned, valid = seq[:, n - 1 :], hit
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], banned.shape)
    ban = jnp.zeros(logits.shape, bool).at[rows, banned].max(valid)
    return jnp.where(ban, NEG_INF, logits)


def _filter(logits: Array, temperature: float, top_k: int, top_p: float) -> Array:
    """Temperature, then top-k, then top-p (nucleus), as HF's warpers; removed entries become -inf."""
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, NEG_INF, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of strictly better tokens
        keep_sorted = mass_before < top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, NEG_INF)
    return logits


DRAW_BLOCK = 128  # vocabulary entries per block of the two-level draw


def _sample(key: Array, logits: Array) -> Array:
    """One draw per row from softmax(logits) by inverting the CDF with a single uniform per row: the
    same distribution as ``jax.random.categorical``, without its Gumbel noise for every vocabulary entry.
    The CDF is inverted in two levels — over blocks of ``DRAW_BLOCK`` entries, then within the chosen
    block — so the vocabulary is read twice (exp, block sums) and no cumulative sum runs over it (9x
    cheaper per step than one cumsum over V = 50257 on CPU). Weights are left unnormalised (u is scaled
    by their total). Entries at -inf have zero mass and are never drawn."""
    b, v = logits.shape
    blocks = -(-v // DRAW_BLOCK)
    w = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    w = jnp.pad(w, ((0, 0), (0, blocks * DRAW_BLOCK - v))).reshape(b, blocks, DRAW_BLOCK)
    mass = w.sum(-1)
    cdf = jnp.cumsum(mass, axis=-1)
    u = jax.random.uniform(key, (b, 1), minval=1e-7) * cdf[:, -1:]
    block = jnp.argmax(cdf >= u, axis=-1)  # the first block whose CDF reaches u: its mass is > 0
    inner = jnp.take_along_axis(cdf - mass, block[:, None], axis=-1) + jnp.cumsum(
        jnp.take_along_axis(w, block[:, None, None], axis=1)[:, 0], axis=-1
    )
    # u capped at the block's total (rounding) still lands on an entry of positive mass
    return block * DRAW_BLOCK + jnp.argmax(inner >= jnp.minimum(u, inner[:, -1:]), axis=-1)


def _step_logits(last: Array, head_rows: Array) -> Array:
    """float32 logits [B, V] of the last position ``last`` [B, 1, D] against the output embedding as
    rows ``head_rows`` [V, D]. A tied head is stored this way (``head().T`` of the embedding's ``[D, V]``
    view is the table itself, no copy); an untied one is transposed once, before the loop. Each
    decode step then reads V contiguous rows of D: on CPU that skinny matmul ran 1.3-1.5x faster than
    against the ``[D, V]`` layout, and the head is a fifth to a quarter of a decode step. (XLA folds the
    ``.T`` into the dot's contracting dimension: the compiled dot is the one a ``[V, D]`` einsum gives.)"""
    return L.logits(last[:, -1:], head_rows.T)[:, 0]


def _left_align(ids: Array, mask: Array) -> tuple[Array, Array]:
    """Move every row's padding to the left, keeping token order (a stable sort on the mask)."""
    order = jnp.argsort(mask != 0, axis=1, stable=True)
    return jnp.take_along_axis(ids, order, axis=1), jnp.take_along_axis(mask, order, axis=1)


def _mix(student: Array, teacher: Array, alpha: Array) -> Array:
    """log(alpha * softmax(teacher) + (1 - alpha) * softmax(student)), formed in log space so that
    alpha = 0 or 1 reproduces one model exactly and -inf (filtered, banned) entries stay -inf."""
    return jnp.logaddexp(
        jnp.log(alpha) + jax.nn.log_softmax(teacher), jnp.log1p(-alpha) + jax.nn.log_softmax(student)
    )


@dataclasses.dataclass(frozen=True)
class Decode:
    """The static settings of one compiled decode loop (with the model graphs and the rows' sharding,
    its cache key)."""

    n_new: int
    sampling: Sampling
    eos: int | None
    pad: int
    ngram: int  # no_repeat_ngram_size (0: off)
    start: int  # an encoder-decoder's decoder start token
    ends: tuple[int, ...]  # segment_ends(n_new)


class _Loop:
    """One generation, traced: the models (the sampled one, then the mixer if any) each with its own
    cache, fed the same tokens; ``__call__`` prefills, then runs one ``lax.while_loop`` per cache
    segment."""

    def __init__(self, nets: list, encoder_decoder: bool, decode: Decode, alpha: Array | None):
        self.nets, self.enc_dec, self.d, self.alpha = nets, encoder_decoder, decode, alpha
        self.heads = [net.head().T for net in nets]  # [V, D] rows: see _step_logits

    def advance(self, net, ids, kv_valid, positions, cache, index):
        """``ids`` through one model's decoder into cache slots from ``index`` (T5 takes positions
        from the slots)."""
        if self.enc_dec:
            return net.hidden(ids, kv_valid, None, None, cache=cache, cache_index=index)
        return net.hidden(ids, kv_valid, positions=positions, cache=cache, cache_index=index)

    def new_cache(self, net, prompt_ids, prompt_mask, b: int, slots: int):
        """One model's empty cache; encoder-decoder models encode the prompt into it, once."""
        if self.enc_dec:
            return net.init_cache(b, slots, net.encode(prompt_ids, prompt_mask), prompt_mask)
        return net.init_cache(b, slots)

    def prefill(self, prompt_ids, prompt_mask, rng) -> tuple:
        """The loop's first carry: the caches after the prompt (decoder-only) or the start token."""
        d, (b, p) = self.d, prompt_ids.shape
        slots = self.offset + d.ends[0]  # the cache's length in the first segment
        caches = [self.new_cache(net, prompt_ids, prompt_mask, b, slots) for net in self.nets]
        seq = jnp.full((b, self.offset + d.n_new), d.pad, jnp.int32)
        if self.enc_dec:  # prefill the decoder's start token
            seq = seq.at[:, 0].set(d.start)
            kv_valid = jnp.zeros((b, slots), jnp.int32).at[:, 0].set(1)
            first, positions = seq[:, :1], None
        else:  # prefill the prompt
            seq = seq.at[:, :p].set(prompt_ids)
            kv_valid = jnp.zeros((b, slots), jnp.int32).at[:, :p].set(prompt_mask)
            first, positions = prompt_ids, L.default_positions(prompt_mask)
        hs, caches = zip(
            *(
                self.advance(n, first, kv_valid, positions, c, 0)
                for n, c in zip(self.nets, caches, strict=True)
            ),
            strict=True,
        )
        lasts = tuple(h[:, -1:] for h in hs)
        return (
            jnp.int32(0),
            caches,
            seq,
            kv_valid,
            lasts,
            jnp.zeros((b,), bool),
            jnp.zeros((b, d.n_new), bool),
            rng,
        )

    def next_token(self, lasts, seq, i, rng) -> tuple[Array, Array]:
        """Step ``i``'s token of every row, from the models' last hidden states."""
        d, sampling = self.d, self.d.sampling
        logits = [_step_logits(last, head) for last, head in zip(lasts, self.heads, strict=True)]
        if self.alpha is not None:  # padded vocabularies may differ: keep the entries both have
            v = min(x.shape[-1] for x in logits)
            logits = [x[:, :v] for x in logits]
        if d.ngram > 0:
            logits = [_ban_repeated_ngrams(x, seq, self.offset + i, d.ngram) for x in logits]
        greedy = sampling.temperature == 0.0
        if not greedy:
            rng, key = jax.random.split(rng)
            logits = [_filter(x, sampling.temperature, sampling.top_k, sampling.top_p) for x in logits]
        scores = logits[0] if self.alpha is None else _mix(logits[0], logits[1], self.alpha)
        if greedy:
            return jnp.argmax(scores, axis=-1).astype(jnp.int32), rng
        return _sample(key, scores).astype(jnp.int32), rng

    def body(self, carry):
        i, caches, seq, kv_valid, lasts, done, out_mask, rng = carry
        d, b = self.d, seq.shape[0]
        token, rng = self.next_token(lasts, seq, i, rng)
        token = jnp.where(done, d.pad, token)
        out_mask = out_mask.at[:, i].set(~done)
        done = done | (token == d.eos) if d.eos is not None else done
        seq = jax.lax.dynamic_update_slice_in_dim(seq, token[:, None], self.offset + i, axis=1)
        kv_valid = jax.lax.dynamic_update_slice_in_dim(
            kv_valid, jnp.ones((b, 1), jnp.int32), self.offset + i, 1
        )
        pos = None if self.enc_dec else (self.lengths + i)[:, None]
        stepped = [
            self.advance(net, token[:, None], kv_valid, pos, cache, self.offset + i)
            for net, cache in zip(self.nets, caches, strict=True)
        ]
        lasts, caches = zip(*stepped, strict=True)
        return i + 1, caches, seq, kv_valid, lasts, done, out_mask, rng

    def grow(self, carry, end: int):
        """The next segment's cache slots, zeroed and not yet valid."""
        i, caches, seq, kv_valid, *rest = carry
        caches = tuple(L.grow_kv_cache(c, self.offset + end) for c in caches)
        kv_valid = jnp.pad(kv_valid, ((0, 0), (0, self.offset + end - kv_valid.shape[1])))
        return (i, caches, seq, kv_valid, *rest)

    def __call__(self, prompt_ids, prompt_mask, rng) -> tuple[Array, Array]:
        if not self.enc_dec:
            prompt_ids, prompt_mask = _left_align(prompt_ids, prompt_mask)
        self.offset = first_new_slot(prompt_ids.shape[1], self.enc_dec)  # new token i goes to offset + i
        self.lengths = jnp.sum(prompt_mask != 0, axis=1).astype(jnp.int32)  # next position of each row
        carry = self.prefill(prompt_ids, prompt_mask, rng)
        for j, end in enumerate(self.d.ends):
            if j:
                carry = self.grow(carry, end)
            running = lambda c, end=end: (c[0] < self.d.n_new) & ~jnp.all(c[5]) & (c[0] < end)  # noqa: E731
            carry = jax.lax.while_loop(running, self.body, carry)
        seq, out_mask = carry[2], carry[6]
        return seq[:, self.offset : self.offset + self.d.n_new], out_mask


@functools.lru_cache(maxsize=64)
def _compiled(graphdef, encoder_decoder: bool, decode: Decode, rows, mix_graphdef=None):
    """The jitted generation function for one model graph (and mixer graph, if any) and one ``Decode``;
    its outputs keep the prompts' row sharding ``rows`` (each host then reads the rows it fed, no
    all-gather). The mixer's state and alpha are arguments, so one compilation serves every alpha and
    every teacher checkpoint of that graph."""

    def run(state, prompt_ids, prompt_mask, rng, mixer=None):
        nets = [nnx.merge(graphdef, state)]
        if mixer is not None:
            nets.append(nnx.merge(mix_graphdef, mixer[0]))
        alpha = None if mixer is None else mixer[1]
        return _Loop(nets, encoder_decoder, decode, alpha)(prompt_ids, prompt_mask, rng)

    return jax.jit(run, out_shardings=None if rows is None else (rows, rows))


def _config_value(model: nnx.Module, *names: str):
    config = getattr(model, "hf_config", None) or {}
    for name in names:
        value = config.get(name)
        if isinstance(value, list):
            value = value[0]
        if value is not None:
            return value
    return None


def _mesh_of(state) -> jax.sharding.Mesh | None:
    for leaf in jax.tree.leaves(state):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            return sharding.mesh
    return None


def generate(
    model: nnx.Module,
    prompt_ids,
    prompt_mask,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    rng: Array | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    no_repeat_ngram_size: int = 0,
    max_prompt_length: int | None = None,
    mix_model: nnx.Module | None = None,
    mix_alpha: float = 0.0,
) -> tuple[Array, Array]:
    """Generate ``max_new_tokens`` tokens after each prompt.

    Args:
      model: any model of ``distillm_jax.models`` (decoder-only or T5-family).
      prompt_ids, prompt_mask: ``[B, P]``; decoder-only prompts may be padded on either side.
      temperature: 0 is greedy; otherwise sample from softmax(logits / temperature) after top-k (0 = off)
        and top-p (1.0 = off), as transformers' warpers do.
      rng: a ``jax.random`` key, required when sampling.
      eos_token_id, pad_token_id: default to the model's config; rows stop at their first EOS.
      no_repeat_ngram_size: forbid repeating any n-gram of the sequence so far (0 = off).
      max_prompt_length: the configured prompt length, if any: longer prompts are an error.
      mix_model, mix_alpha: MiniLLM's teacher-mixed sampling. With a mixer (the teacher, of the same
        kind as ``model``) every token is drawn from ``mix_alpha * p_mixer + (1 - mix_alpha) * q_model``,
        each filtered as above (no_repeat_ngram bans a token in both), over the vocabulary entries
        both have; greedy takes the mixture's argmax. Both run in one loop, each with its own cache.
    Returns:
      ``tokens [B, max_new_tokens]`` (pad after a row's EOS) and ``mask [B, max_new_tokens]``, True for
      the generated tokens up to and including the first EOS.
    """
    sampling = Sampling(float(temperature), int(top_k), float(top_p))
    _check_request(
        model,
        np.shape(prompt_ids),
        np.shape(prompt_mask),
        max_new_tokens,
        sampling,
        rng,
        no_repeat_ngram_size,
        max_prompt_length,
        mix_model,
        mix_alpha,
    )
    decode = _decode(model, max_new_tokens, sampling, eos_token_id, pad_token_id, no_repeat_ngram_size)
    graphdef, state = nnx.split(model)
    mix_graphdef, mixer = None, None
    if mix_model is not None:
        mix_graphdef, mix_state = nnx.split(mix_model)
        mixer = (mix_state, jnp.float32(mix_alpha))
    ids, mask, rows = _placed(prompt_ids, prompt_mask, _mesh_of((state, mixer)))
    rng = jax.random.key(0) if rng is None else rng
    fn = _compiled(graphdef, hasattr(model, "encode"), decode, rows, mix_graphdef)
    return fn(state, ids, mask, rng, mixer)


def _check_request(
    model,
    ids_shape,
    mask_shape,
    max_new_tokens,
    sampling: Sampling,
    rng,
    ngram,
    max_prompt_length,
    mix_model,
    mix_alpha,
) -> None:
    """``generate``'s arguments, each problem one ``ValueError`` that names the argument."""
    b, p = ids_shape
    if mask_shape != (b, p):
        raise ValueError(f"generate: prompt_mask {mask_shape} must match prompt_ids {(b, p)}")
    if max_prompt_length is not None and p > max_prompt_length:
        raise ValueError(
            f"generate: prompt length {p} exceeds the configured max_prompt_length {max_prompt_length}"
        )
    if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"generate: max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not 0.0 < sampling.top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1], got {sampling.top_p}")
    if sampling.temperature < 0 or sampling.top_k < 0 or ngram < 0:
        raise ValueError(
            f"generate: temperature, top_k and no_repeat_ngram_size must be >= 0, got "
            f"{sampling.temperature}, {sampling.top_k}, {ngram}"
        )
    if not 0.0 <= mix_alpha <= 1.0:
        raise ValueError(f"generate: mix_alpha must be in [0, 1], got {mix_alpha}")
    if mix_alpha and mix_model is None:
        raise ValueError(f"generate: mix_alpha {mix_alpha} needs a mix_model to mix with")
    encoder_decoder = hasattr(model, "encode")
    if mix_model is not None and hasattr(mix_model, "encode") != encoder_decoder:
        kinds = ("decoder-only", "encoder-decoder")
        raise ValueError(
            f"generate: mix_model is {kinds[not encoder_decoder]} but model is {kinds[encoder_decoder]}; "
            "both must be the same kind"
        )
    if sampling.temperature > 0 and rng is None:
        raise ValueError("generate: sampling (temperature > 0) needs rng, e.g. jax.random.key(0)")
    for net, which in ((model, "model"), (mix_model, "mix_model")):
        limit = None if net is None else _config_value(net, "n_positions", "max_position_embeddings")
        if not encoder_decoder and limit is not None and p + max_new_tokens > limit:
            raise ValueError(
                f"generate: prompt length {p} + max_new_tokens {max_new_tokens} exceeds the {which}'s "
                f"{limit} positions"
            )


def _decode(model, n_new: int, sampling: Sampling, eos_token_id, pad_token_id, ngram: int) -> Decode:
    """The loop's settings, EOS / pad / decoder start defaulting to the model's config."""
    eos = eos_token_id if eos_token_id is not None else _config_value(model, "eos_token_id")
    pad = pad_token_id if pad_token_id is not None else _config_value(model, "pad_token_id")
    pad = pad if pad is not None else (eos if eos is not None else 0)
    start = _config_value(model, "decoder_start_token_id")
    start = start if start is not None else pad
    return Decode(n_new, sampling, eos, pad, ngram, start, segment_ends(n_new))


def _placed(prompt_ids, prompt_mask, mesh) -> tuple[Array, Array, jax.sharding.Sharding | None]:
    """The prompts on the model's mesh: rows over the data axes when they divide evenly, else
    replicated; and that sharding (None without a mesh)."""
    ids, mask = jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_mask, jnp.int32)
    if mesh is None:
        return ids, mask, None
    rows = shd.batch_sharding(mesh)
    if ids.shape[0] % (mesh.shape["data"] * mesh.shape["fsdp"]):
        rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.device_put(ids, rows), jax.device_put(mask, rows), rows
