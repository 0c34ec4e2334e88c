"""Which tokenizer a run uses: the student checkpoint's own, a directory, or a built-in one (``demo``:
the demo task's word-level vocabulary; ``bytes``: 256 byte tokens + pad/eos/unk, for tiny local models of
any task and language). Teacher and student must share it: distillation compares their distributions
token by token. SentencePiece tokenizers (T5, mT5, Llama 1/2, OpenLLaMA) need the ``sentencepiece`` and
``protobuf`` packages, which requirements.txt installs."""

from __future__ import annotations

import os

from distillm_jax.models import hub

SPECIALS = ("<pad>", "</s>", "<unk>")


def byte_level():
    """Bytes as tokens (ids 3..258) after pad 0, eos 1, unk 2: a vocabulary of 259 for any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(SPECIALS)} | {c: i + 3 for i, c in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=4096
    )


def _has_tokenizer(directory: str) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.json", "tokenizer.model")
    return os.path.isdir(directory) and any(os.path.exists(os.path.join(directory, n)) for n in names)


def load(spec: str, student_path: str = ""):
    """The tokenizer named by ``spec`` ("" = the student checkpoint's)."""
    from distillm_jax.data import demo

    if spec == "demo":
        return demo.tokenizer()
    if spec == "bytes":
        return byte_level()
    where = spec or student_path
    if not where:
        raise ValueError("no tokenizer: set `tokenizer` (a directory, 'demo' or 'bytes') for a new student")
    asked, where = where, hub.local_dir(where, weights=False, model=False)  # a hub id's or bucket's files
    if not _has_tokenizer(where):
        raise ValueError(f"{asked} has no tokenizer files; set `tokenizer` to a directory that has them")
    tok = _auto(where)
    if tok.pad_token_id is None:  # GPT-2 / OPT / Llama convention: pad with EOS, masked out anyway
        tok.pad_token = tok.eos_token
    return tok


def _auto(where: str):
    """``AutoTokenizer`` of a checkpoint directory; a corrupt file there is a one-line ValueError naming
    it (transformers would raise a traceback of its own)."""
    import json

    from transformers import AutoTokenizer

    for name in ("config.json", "tokenizer_config.json", "tokenizer.json"):
        path = os.path.join(where, name)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    json.load(f)
            except (ValueError, UnicodeDecodeError) as e:
                raise ValueError(f"corrupt {path}: {e}") from None
    try:
        return AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError) as e:
        first = next((x.strip() for x in str(e).splitlines() if x.strip()), type(e).__name__)
        raise ValueError(f"cannot read the tokenizer in {where} ({first})") from None


def check_same(tokenizer, teacher_path: str) -> None:
    """Error when the teacher checkpoint ships a tokenizer with a different vocabulary."""
    if not teacher_path:
        return
    teacher_path = hub.local_dir(teacher_path, weights=False, model=False)
    if not _has_tokenizer(teacher_path):
        return
    theirs = _auto(teacher_path)
    if theirs.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"teacher tokenizer ({teacher_path}, {len(theirs)} tokens) differs from the student's "
            f"({len(tokenizer)} tokens); distillation needs one shared vocabulary"
        )
