"""The shapes (config.json fields that size a model) of the hub models the paper configs name, so that
planning a run — ``launch/plan.py``, with or without ``--topology`` — works offline, before anything is
downloaded. Training never reads them: it reads the checkpoint's own config.json.

Each entry is the hub repo's config.json, reduced to the fields the model code reads (the rest take
transformers' defaults). A repo named with ``@revision`` plans as its main branch."""

from __future__ import annotations

_GPT2 = dict(model_type="gpt2", vocab_size=50257, n_positions=1024, activation_function="gelu_new")
_OPT = dict(model_type="opt", vocab_size=50272, max_position_embeddings=2048, activation_function="relu")
_OPT.update(do_layer_norm_before=True, enable_bias=True, pad_token_id=1, bos_token_id=2, eos_token_id=2)
_LLAMA = dict(model_type="llama", vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6)
_LLAMA.update(tie_word_embeddings=False, hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=0)
_QWEN = dict(model_type="qwen2", max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1e6)
_QWEN.update(hidden_act="silu", use_sliding_window=False, sliding_window=131072, bos_token_id=151643)
_QWEN.update(eos_token_id=151645)
_T5 = dict(model_type="t5", vocab_size=32128, d_kv=64, feed_forward_proj="relu", tie_word_embeddings=True)
_T5.update(decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, relative_attention_num_buckets=32)
_MT5 = dict(
    _T5, model_type="mt5", vocab_size=250112, feed_forward_proj="gated-gelu", tie_word_embeddings=False
)


def _gpt2(d: int, layers: int, heads: int) -> dict:
    return dict(_GPT2, n_embd=d, n_layer=layers, n_head=heads)


def _opt(d: int, layers: int, heads: int, ffn: int, **more) -> dict:
    sizes = dict(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=ffn)
    return {**_OPT, **sizes, "word_embed_proj_dim": d, **more}


def _t5(base: dict, d: int, ff: int, layers: int, heads: int, **more) -> dict:
    return dict(
        base, d_model=d, d_ff=ff, num_layers=layers, num_decoder_layers=layers, num_heads=heads, **more
    )


KNOWN: dict[str, dict] = {
    "openai-community/gpt2": _gpt2(768, 12, 12),
    "openai-community/gpt2-medium": _gpt2(1024, 24, 16),
    "openai-community/gpt2-large": _gpt2(1280, 36, 20),
    "openai-community/gpt2-xl": _gpt2(1600, 48, 25),
    "MiniLLM/teacher-gpt2-1.5B": _gpt2(1600, 48, 25),  # GPT-2 XL fine-tuned on Dolly
    "facebook/opt-125m": _opt(768, 12, 12, 3072),
    "facebook/opt-350m": _opt(1024, 24, 16, 4096, word_embed_proj_dim=512, do_layer_norm_before=False),
    "facebook/opt-1.3b": _opt(2048, 24, 32, 8192),
    "facebook/opt-2.7b": _opt(2560, 32, 32, 10240),
    "openlm-research/open_llama_3b_v2": dict(
        _LLAMA, hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32
    ),
    "openlm-research/open_llama_7b_v2": dict(
        _LLAMA, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
    ),
    "Qwen/Qwen2.5-0.5B-Instruct": dict(
        _QWEN,
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "Qwen/Qwen2.5-7B-Instruct": dict(
        _QWEN,
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    ),
    "google-t5/t5-small": _t5(_T5, 512, 2048, 6, 8),
    "google-t5/t5-base": _t5(_T5, 768, 3072, 12, 12),
    "google-t5/t5-large": _t5(_T5, 1024, 4096, 24, 16),
    "google-t5/t5-3b": _t5(_T5, 1024, 16384, 24, 32, d_kv=128),
    "google/mt5-small": _t5(_MT5, 512, 1024, 8, 6),
    "google/mt5-base": _t5(_MT5, 768, 2048, 12, 12),
    "google/mt5-large": _t5(_MT5, 1024, 2816, 24, 16),
    "google/mt5-xl": _t5(_MT5, 2048, 5120, 24, 32),
}
KNOWN["gpt2"] = KNOWN["openai-community/gpt2"]  # the hub's old unprefixed names
KNOWN["t5-small"], KNOWN["t5-base"] = KNOWN["google-t5/t5-small"], KNOWN["google-t5/t5-base"]


def known(hub_id: str) -> dict | None:
    """The shape of a hub model the paper configs name (config.json kwargs with model_type), if known."""
    return KNOWN.get(hub_id.partition("@")[0])
