"""The ``:tiny`` variant every paper config shares (``--config configs/gpt2_dolly.py:tiny``): the same
method, loss, task and model families as the full run, but tiny random models (a teacher bigger than the
student) with the built-in byte tokenizer, a small local sample of the task's data (``samples/<task>/``),
short sequences and a few steps on any machine: a smoke test of the full config's code path (all four
stages of the pipeline) in seconds.

The family builders return HF config kwargs (``teacher.config`` / ``student.config``) shaped like the
real checkpoints of the pair: GPT-2, OPT (pre-norm), Llama (no GQA, untied), Qwen2 (GQA, q/k/v bias, the
small one tied), T5 (ReLU, tied head) and mT5 (gated GELU, untied head).
"""

from __future__ import annotations

from pathlib import Path

from ml_collections import ConfigDict

from configs import paper

SAMPLES = Path(__file__).resolve().parent / "samples"  # absolute: works from any working directory
VOCAB = 264  # the byte tokenizer's 259 ids, rounded up to a multiple of 8 (pad 0, eos 1, unk 2)
IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1}  # the byte tokenizer's
POSITIONS = 128  # learned / rotary position tables; >= the tiny max_length


def _hf(model_type: str, **kwargs) -> ConfigDict:
    return ConfigDict({"model_type": model_type, "vocab_size": VOCAB, **kwargs}, type_safe=False)


def gpt2(width: int, layers: int, heads: int) -> ConfigDict:
    return _hf("gpt2", n_embd=width, n_layer=layers, n_head=heads, n_positions=POSITIONS, **IDS)


def opt(width: int, layers: int, heads: int) -> ConfigDict:
    return _hf(
        "opt",
        hidden_size=width,
        word_embed_proj_dim=width,
        ffn_dim=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=POSITIONS,
        do_layer_norm_before=True,  # as OPT-125m / 1.3b / 2.7b (opt-350m is the post-norm odd one out)
        **IDS,
    )


def llama(
    width: int, layers: int, heads: int, kv_heads: int | None = None, *, tied: bool = False
) -> ConfigDict:
    return _hf(
        "llama",
        hidden_size=width,
        intermediate_size=(8 * width // 3 + 7) // 8 * 8,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=POSITIONS,
        tie_word_embeddings=tied,
        **IDS,
    )


def qwen2(width: int, layers: int, heads: int, kv_heads: int, *, tied: bool) -> ConfigDict:
    c = llama(width, layers, heads, kv_heads, tied=tied)
    c.model_type = "qwen2"
    c.use_sliding_window = False
    return c


def t5(d_model: int, layers: int, heads: int, *, model_type: str = "t5") -> ConfigDict:
    gated = model_type == "mt5"  # T5 v1.1 / mT5: gated GELU and an untied head; original T5: ReLU, tied
    return _hf(
        model_type,
        d_model=d_model,
        d_kv=d_model // heads,
        d_ff=(2 if gated else 4) * d_model,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu" if gated else "relu",
        tie_word_embeddings=not gated,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )


def mt5(d_model: int, layers: int, heads: int) -> ConfigDict:
    return t5(d_model, layers, heads, model_type="mt5")


def apply(c: ConfigDict, name: str, teacher: ConfigDict, student: ConfigDict) -> ConfigDict:
    """``c`` (a full paper config) shrunk in place to its tiny variant; ``teacher`` / ``student`` are
    HF config kwargs from the builders above."""
    c.run_dir = f"runs/{name}_tiny"
    c.tokenizer = "bytes"
    for role, hf in (("teacher", teacher), ("student", student)):  # both SFT'd first, as the full run's
        c[role].path = ""
        c[role].config = hf
        c[role].train_steps, c[role].train_epochs, c[role].train_lr = 2, 0, 0.0
        c[role].tuned = False  # a tiny random model (or a stand-in's, by hub id): tuned by its SFT stage
    c.student.seed = 1
    c.data.source = str(SAMPLES / c.data.task)  # train.jsonl / validation.jsonl in the task's columns
    c.data.train_split, c.data.valid_split, c.data.test_split = "train", "validation", "test"
    if c.data.test_sets:  # the Dolly configs' other test sets: a few rows each, as the hub's files hold them
        names = [entry.split("=", 1)[0] for entry in c.data.test_sets]
        c.data.test_sets = tuple(f"{n}={SAMPLES / n}" + ("#test[:4]" if n == "uinst" else "") for n in names)
    c.data.max_prompt_length = 48
    c.data.max_length = 64
    c.data.max_train_rows = 0
    c.data.max_valid_rows = 8
    c.data.lm_source = ""
    c.loss.lm_coef = 0.0
    c.loss.chunk_size = min(c.loss.chunk_size, 16)  # still chunked when the full config is, in 4 chunks
    c.optim.batch_size = 8
    c.optim.grad_accum = 1
    c.optim.epochs = 0
    c.minillm.rollouts = 8  # one batch a round
    c.optim.steps = 3
    c.eval.interval = 2
    c.eval.batch_size = 8
    c.eval.max_new_tokens = 8
    c.eval.seeds = (10, 20)
    c.checkpoint.interval = 0
    c.log_interval = 1
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1  # batch 8 divides any 1, 2, 4 or 8 devices
    return c


def variant(
    c: ConfigDict,
    arg: str,
    name: str,
    teacher: ConfigDict,
    student: ConfigDict,
    scripts: dict[str, tuple[str, int]] | None = None,
) -> ConfigDict:
    """What ``get_config(arg)`` of a paper config returns: ``arg`` is a comma-separated list of ``tiny``
    (the tiny variant; the tiny models are only used then), at most one method of the paper
    (``configs/gpt2_dolly.py:gkd``, ``:tiny,imitkd``) and ``scripts`` (the method starts and batches as
    the authors' script for the pair, ``scripts``: ``paper.scripts``); ``""``: DistiLLM on the full
    setup."""
    parts = [p for p in arg.split(",") if p]
    methods = [p for p in parts if p in paper.METHODS]
    unknown = [p for p in parts if p not in ("tiny", "scripts") and p not in paper.METHODS]
    if unknown or len(methods) > 1:
        raise ValueError(
            f"configs/{name}.py takes 'tiny', 'scripts' and/or one method of {', '.join(paper.METHODS)} "
            f"(comma-separated), got {arg!r}"
        )
    if "scripts" in parts and scripts is None:
        raise ValueError(
            f"configs/{name}.py has no 'scripts' setting: the authors released scripts for the GPT-2, OPT "
            "and OpenLLaMA pairs only (gpt2_dolly, opt_dolly, openllama_dolly)"
        )
    if methods:
        paper.method(c, methods[0])
    if "scripts" in parts:
        paper.scripts(c, scripts)
    if "tiny" in parts:
        apply(c, name, teacher, student)
        c.run_dir = c.run_dir if not methods or methods[0] == "distillm" else f"{c.run_dir}_{methods[0]}"
    return c
