"""The sampler against transformers' generate, its sampling distribution, EOS handling, sharding, errors."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from distillm_jax import generate as gen
from distillm_jax import models, sharding
from distillm_jax.generate import _filter, _sample, generate
from distillm_jax.models import layers as L

FIXTURES = Path(__file__).parent / "fixtures"
FAMILIES = [
    "gpt2",
    "opt",
    "opt_350m_style",
    "llama",
    "llama3_tied",
    "mistral",
    "qwen2",
    "qwen3",
    "t5",
    "t5_v1_1",
]
N = 8


def load(name):
    ref = dict(np.load(FIXTURES / name / "reference.npz"))
    return models.from_pretrained(str(FIXTURES / name)), ref["input_ids"], ref["attention_mask"]


def hf_generate(name, ids, mask, **kw):
    """transformers' greedy generate; the new tokens only."""
    torch = pytest.importorskip("torch")
    import transformers

    seq2seq = "t5" in name
    auto = transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModelForCausalLM
    hf = auto.from_pretrained(str(FIXTURES / name)).eval()
    if seq2seq:  # transformers 5.24's cached T5 decoding breaks when decoder and encoder depths differ
        kw["use_cache"] = False
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=N,
            do_sample=False,
            **kw,
        ).numpy()
    return out[:, 1:] if seq2seq else out[:, ids.shape[1] :]


def assert_same_tokens(ours, mask, theirs, pad):
    ours, mask = np.asarray(ours), np.asarray(mask)
    k = theirs.shape[1]  # transformers stops early when every row has finished
    np.testing.assert_array_equal(np.where(mask[:, :k], ours[:, :k], pad), theirs)
    assert not mask[:, k:].any()


@pytest.mark.parametrize("ngram", [0, 2])
@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_equals_transformers_generate(name, ngram):
    model, ids, mask = load(name)
    tokens, valid = generate(model, ids, mask, N, no_repeat_ngram_size=ngram, eos_token_id=-1)
    theirs = hf_generate(name, ids, mask, no_repeat_ngram_size=ngram or None, eos_token_id=None)
    assert_same_tokens(tokens, valid, theirs, pad=-1)


def test_no_repeat_ngram_removes_every_repeated_ngram():
    model, ids, mask = load("gpt2")
    plain = np.asarray(generate(model, ids, mask, N)[0])
    banned = np.asarray(generate(model, ids, mask, N, no_repeat_ngram_size=2)[0])
    bigrams = lambda seq: [tuple(seq[i : i + 2]) for i in range(len(seq) - 1)]  # noqa: E731
    assert len(set(bigrams(plain[0]))) < len(bigrams(plain[0]))  # greedy on this model repeats itself ...
    for row in range(ids.shape[0]):  # ... and with the ban no generated token completes a seen bigram
        full = list(ids[row]) + list(banned[row])
        for t in range(ids.shape[1], len(full)):
            assert tuple(full[t - 1 : t + 1]) not in bigrams(full[:t]), (row, t)


@pytest.mark.parametrize("name", ["gpt2", "llama", "t5"])
def test_eos_stops_rows_pads_after_and_mask_includes_it(name):
    model, ids, mask = load(name)
    free, _ = generate(model, ids, mask, N, eos_token_id=-1)
    eos = int(np.asarray(free)[0, 2])  # a token row 0 produces third: row 0 must stop there
    pad = 5
    tokens, valid = (np.asarray(x) for x in generate(model, ids, mask, N, eos_token_id=eos, pad_token_id=pad))
    first = np.argmax(np.asarray(free) == eos, axis=1)
    assert first[0] <= 2
    for row in range(ids.shape[0]):
        hit = (np.asarray(free)[row] == eos).any()
        stop = first[row] + 1 if hit else N
        assert valid[row, :stop].all() and not valid[row, stop:].any()  # through and including the EOS
        assert (tokens[row, stop:] == pad).all()
        np.testing.assert_array_equal(tokens[row, :stop], np.asarray(free)[row, :stop])
    theirs = hf_generate(name, ids, mask, eos_token_id=eos, pad_token_id=pad)
    assert_same_tokens(tokens, valid, theirs, pad=pad)


def test_right_padded_prompts_generate_as_left_padded():
    model, ids, mask = load("llama")
    left, _ = generate(model, ids, mask, N)
    order = np.argsort(mask == 0, axis=1, kind="stable")  # move padding to the right
    right, _ = generate(model, np.take_along_axis(ids, order, 1), np.take_along_axis(mask, order, 1), N)
    np.testing.assert_array_equal(np.asarray(left), np.asarray(right))


def test_sampling_reproducible_and_top_k_1_is_greedy():
    model, ids, mask = load("qwen2")
    a = generate(model, ids, mask, N, temperature=1.0, rng=jax.random.key(3))[0]
    b = generate(model, ids, mask, N, temperature=1.0, rng=jax.random.key(3))[0]
    c = generate(model, ids, mask, N, temperature=1.0, rng=jax.random.key(4))[0]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    greedy = generate(model, ids, mask, N)[0]
    top1 = generate(model, ids, mask, N, temperature=0.7, top_k=1, rng=jax.random.key(5))[0]
    np.testing.assert_array_equal(np.asarray(top1), np.asarray(greedy))


def test_first_sampled_token_follows_softmax_of_logits_over_temperature():
    model, ids, _ = load("gpt2")
    draws, temperature = 4096, 1.5
    prompt = np.repeat(ids[:1, -4:], draws, 0)
    tokens, _ = generate(
        model, prompt, np.ones_like(prompt), 1, temperature=temperature, rng=jax.random.key(0)
    )
    logits = np.asarray(model(jnp.asarray(prompt[:1]), jnp.ones((1, 4), jnp.int32)))[0, -1]
    expected = np.exp((logits.astype(np.float64) - logits.max()) / temperature)
    expected = draws * expected / expected.sum()
    observed = np.bincount(np.asarray(tokens)[:, 0], minlength=logits.shape[0])
    big = expected >= 5  # pool the rare tokens into one cell, as a chi-square test needs
    obs = np.append(observed[big], observed[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    exp *= obs.sum() / exp.sum()
    assert stats.chisquare(obs, exp).pvalue > 1e-3
    assert big.sum() > 10, "the test distribution must be spread over many tokens"


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([[0.05, 0.5, 0.15, 0.3]])
    logits = jnp.log(jnp.asarray(probs))
    kept = lambda p: set(np.nonzero(np.isfinite(np.asarray(_filter(logits, 1.0, 0, p))))[1])  # noqa: E731
    assert kept(0.5) == {1}
    assert kept(0.8) == {1, 3}
    assert kept(0.81) == {1, 3, 2}
    assert kept(1.0) == {0, 1, 2, 3}
    assert set(np.nonzero(np.isfinite(np.asarray(_filter(logits, 1.0, 2, 1.0))))[1]) == {1, 3}  # top-k
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import TopPLogitsWarper

    for p in (0.3, 0.5, 0.8, 0.81, 0.95):
        hf = TopPLogitsWarper(p)(None, torch.tensor(np.log(probs), dtype=torch.float32)).numpy()
        assert kept(p) == set(np.nonzero(np.isfinite(hf))[1]), p


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "t5"])
def test_sharded_generation_equals_unsharded(name):
    model, ids, mask = load(name)
    ids, mask = np.tile(ids, (4, 1))[:8], np.tile(mask, (4, 1))[:8]
    plain = generate(model, ids, mask, N, temperature=1.0, rng=jax.random.key(1))
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharded_model = models.from_pretrained(str(FIXTURES / name), mesh=mesh)
    got = generate(sharded_model, ids, mask, N, temperature=1.0, rng=jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(plain[0]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(plain[1]))
    odd = generate(sharded_model, ids[:3], mask[:3], N)[0]  # 3 rows do not divide the 4 data shards
    np.testing.assert_array_equal(np.asarray(odd), np.asarray(generate(model, ids[:3], mask[:3], N)[0]))


def test_compiles_once_per_shape():
    model, ids, mask = load("gpt2")
    generate(model, ids, mask, 4)
    generate(model, ids, mask, 4)
    from distillm_jax.generate import Decode, Sampling, _compiled

    # the settings generate() derives for gpt2's config (eos = pad = start = 1), greedy, 4 new tokens
    decode = Decode(4, Sampling(0.0, 0, 1.0), eos=1, pad=1, ngram=0, start=1, ends=(4,))
    fn = _compiled(nnx.graphdef(model), False, decode, None, None)
    assert fn._cache_size() == 1  # the second call reused the first compilation
    generate(model, ids[:, 1:], mask[:, 1:], 4)  # a new prompt length: exactly one more
    assert fn._cache_size() == 2


def test_segment_ends_cover_the_generation_in_few_long_segments():
    for n in (1, 8, 31, 32, 33, 100, 130, 256, 1000):
        ends = gen.segment_ends(n)
        assert ends[-1] == n and list(ends) == sorted(set(ends)) and len(ends) <= gen.MAX_SEGMENTS
        lengths = np.diff((0, *ends))
        assert (lengths[:-1] >= gen.MIN_SEGMENT).all() and (lengths[:-1] == lengths[0]).all()
    assert gen.segment_ends(256) == (64, 128, 192, 256)


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_a_cache_grown_in_segments_generates_what_one_cache_does(name, monkeypatch):
    """Two segments of 4 tokens (the cache grown once; T5's cross-attention entries kept) against
    transformers (greedy, left-padded prompts) and against one segment (sampled, n-gram bans reading the
    whole sequence)."""
    model, ids, mask = load(name)
    sampled = dict(temperature=1.0, top_k=20, no_repeat_ngram_size=2, rng=jax.random.key(3), eos_token_id=-1)
    monkeypatch.setattr(gen, "MIN_SEGMENT", 1000)
    whole = [np.asarray(x) for x in generate(model, ids, mask, N, **sampled)]
    monkeypatch.setattr(gen, "MIN_SEGMENT", 4)
    assert gen.segment_ends(N) == (4, 8)
    tokens, valid = generate(model, ids, mask, N, eos_token_id=-1)
    assert_same_tokens(tokens, valid, hf_generate(name, ids, mask, eos_token_id=None), pad=-1)
    for got, expected in zip(generate(model, ids, mask, N, **sampled), whole, strict=True):
        np.testing.assert_array_equal(np.asarray(got), expected)


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_the_cache_grows_a_segment_at_a_time_and_the_plan_counts_what_is_held(name, monkeypatch):
    """The work segments save, read off the compiled sampler: its loops carry self-attention caches of
    exactly the slots each segment needs (a change that allocated the whole cache up front fails here),
    and ``cache_slots_held``, the planner's figure, is the last two of them plus T5's cross-attention."""
    model, ids, mask = load(name)
    b, p = ids.shape
    monkeypatch.setattr(gen, "MIN_SEGMENT", 4)
    n = 16
    assert gen.segment_ends(n) == (4, 8, 12, 16)
    lowered, compiled = {}, gen._compiled

    def spy(*key):
        fn = compiled(*key)

        def call(*args):
            lowered["text"] = fn.lower(*args).as_text()
            return fn(*args)

        return call

    monkeypatch.setattr(gen, "_compiled", spy)
    generate(model, ids, mask, n)
    c = model.config
    heads, dim = c.heads, (c.d_kv if name == "t5" else c.d_model // c.heads)
    cache = re.compile(rf"tensor<{b}x{heads}x(\d+)x{dim}xf32>")
    carried = [line for line in lowered["text"].splitlines() if "stablehlo.while" in line]
    slots = sorted({int(s) for line in carried for s in cache.findall(line)})
    offset, cross = (1, {p}) if name == "t5" else (p, set())
    grown = [offset + end for end in (4, 8, 12, 16)]
    assert set(slots) == set(grown) | cross, slots
    assert gen.cache_slots_held(p, n, name == "t5") == grown[-1] + grown[-2] + len(cross) * p
    assert gen.cache_slots_held(p, 4, name == "t5") == offset + 4 + len(cross) * p  # one segment: no growth


def test_bad_inputs():
    model, ids, mask = load("gpt2")
    with pytest.raises(ValueError, match=r"prompt length 12 exceeds the configured max_prompt_length 8"):
        generate(model, ids, mask, 4, max_prompt_length=8)
    with pytest.raises(ValueError, match=r"max_new_tokens must be a positive int, got 0"):
        generate(model, ids, mask, 0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 1.5"):
        generate(model, ids, mask, 4, temperature=1.0, top_p=1.5, rng=jax.random.key(0))
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 0"):
        generate(model, ids, mask, 4, temperature=1.0, top_p=0, rng=jax.random.key(0))
    with pytest.raises(ValueError, match=r"exceeds the model's 64 positions"):
        generate(model, ids, mask, 60)
    with pytest.raises(ValueError, match=r"sampling \(temperature > 0\) needs rng"):
        generate(model, ids, mask, 4, temperature=1.0)
    with pytest.raises(ValueError, match=r"prompt_mask \(3, 11\) must match prompt_ids \(3, 12\)"):
        generate(model, ids, mask[:, 1:], 4)


def test_logits_helper_is_what_generation_uses():
    """Greedy's first token is the argmax of the full forward's last real position."""
    model, ids, mask = load("opt")
    first = np.asarray(generate(model, ids, mask, 1)[0])[:, 0]
    logits = np.asarray(L.logits(model.hidden(jnp.asarray(ids), jnp.asarray(mask))[0], model.head()))
    np.testing.assert_array_equal(first, logits[:, -1].argmax(-1))


@pytest.mark.parametrize("block", [128, 3, 2])
def test_inverse_cdf_sampler_matches_softmax_and_skips_removed_tokens(block, monkeypatch):
    """One block, and blocks of 3 or 2 entries (one wholly removed, the last partly padding)."""
    monkeypatch.setattr(gen, "DRAW_BLOCK", block)
    row = [0.0, -jnp.inf, 1.0, -jnp.inf, -jnp.inf, -jnp.inf, 2.0, 0.5, -jnp.inf, 0.0, -jnp.inf]
    logits = jnp.tile(jnp.array([row]), (20000, 1))
    draws = np.asarray(_sample(jax.random.key(7), logits))
    counts = np.bincount(draws, minlength=len(row))
    kept = np.isfinite(row)
    assert counts[~kept].sum() == 0
    p = np.exp(np.array(row)[kept])
    assert stats.chisquare(counts[kept], 20000 * p / p.sum()).pvalue > 1e-3


# MiniLLM's teacher-mixed sampling: tokens drawn from alpha * p_mixer + (1 - alpha) * q_model.


@pytest.mark.slow
@pytest.mark.parametrize(("student", "teacher"), [("gpt2", "llama"), ("t5", "t5_v1_1")])
def test_mix_alpha_0_and_1_reproduce_each_model_alone(student, teacher):
    model, ids, mask = load(student)
    mixer = load(teacher)[0]
    kw = dict(temperature=1.0, top_k=40, no_repeat_ngram_size=2, rng=jax.random.key(2), eos_token_id=-1)
    alone = [np.asarray(generate(m, ids, mask, N, **kw)[0]) for m in (model, mixer)]
    assert not np.array_equal(*alone)
    for alpha, expected in zip((0.0, 1.0), alone, strict=True):
        got = generate(model, ids, mask, N, mix_model=mixer, mix_alpha=alpha, **kw)[0]
        np.testing.assert_array_equal(np.asarray(got), expected)


def probs(logits, top_k=0):
    """softmax over the last axis after keeping the ``top_k`` largest logits (0 = all), in float64."""
    x = np.asarray(logits, np.float64)
    if top_k:
        x = np.where(x < np.sort(x, axis=-1)[..., -top_k, None], -np.inf, x)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_mixed_first_token_follows_the_mixture_of_both_filtered_models():
    student, ids, _ = load("gpt2")
    teacher = load("llama")[0]
    table = student.wte.table  # pad the student's vocabulary from 96 to 100 entries
    table.set_value(
        jnp.concatenate([table[...], 4 * jax.random.normal(jax.random.key(0), (4, table.shape[1]))])
    )
    prompts, alpha, draws = ids[:, -4:], 0.3, 8192
    last_logits = nnx.jit(lambda m, x: m(x, jnp.ones_like(x))[:, -1])  # jitted: 3x faster than eager here
    q, p = (np.asarray(last_logits(m, jnp.asarray(prompts))) for m in (student, teacher))
    assert probs(q[0], 8)[96:].sum() > 0.1  # the padding would take top-k slots if it were not cut first
    rows = np.repeat(prompts[:1], draws, 0)
    kw = dict(temperature=1.0, top_k=8, rng=jax.random.key(0), eos_token_id=-1)
    tokens, _ = generate(student, rows, np.ones_like(rows), 1, mix_model=teacher, mix_alpha=alpha, **kw)
    observed = np.bincount(np.asarray(tokens)[:, 0], minlength=96) / draws
    q8, p8 = probs(q[0, :96], 8), probs(p[0, :96], 8)
    tv = lambda a, b: 0.5 * np.abs(a - b).sum()  # noqa: E731
    assert tv(observed, alpha * p8 + (1 - alpha) * q8) < 0.05
    assert tv(observed, q8) > 0.15
    # greedy: the argmax of the unfiltered mixture, which differs here from the student's own argmax
    greedy, _ = generate(student, prompts, np.ones_like(prompts), 1, mix_model=teacher, mix_alpha=0.5)
    mixture = probs(p[:, :96]) + probs(q[:, :96])
    np.testing.assert_array_equal(np.asarray(greedy)[:, 0], mixture.argmax(-1))
    assert (q[:, :96].argmax(-1) != mixture.argmax(-1)).any()


def test_mix_bad_inputs():
    model, ids, mask = load("gpt2")
    mixer, t5 = load("llama")[0], load("t5")[0]
    for alpha in (-0.1, 1.5):
        with pytest.raises(ValueError, match=rf"mix_alpha must be in \[0, 1\], got {alpha}"):
            generate(model, ids, mask, 4, mix_model=mixer, mix_alpha=alpha)
    with pytest.raises(ValueError, match=r"mix_alpha 0.2 needs a mix_model"):
        generate(model, ids, mask, 4, mix_alpha=0.2)
    with pytest.raises(ValueError, match=r"mix_model is encoder-decoder but model is decoder-only"):
        generate(model, ids, mask, 4, mix_model=t5, mix_alpha=0.2)
    with pytest.raises(ValueError, match=r"mix_model is decoder-only but model is encoder-decoder"):
        generate(t5, ids, mask, 4, mix_model=model, mix_alpha=0.2)
