"""Tiny stand-ins for the hub assets the paper configs name, in the layout ``hub_stub.HubStub`` serves.

For each model family of the configs: a teacher whose ``main`` holds only a README and whose ``refs/pr/1``
holds a sharded ``pytorch_model-0000k-of-00002.bin`` + index (as ``.bin``-only checkpoints and their
conversion PRs are on the hub), and a student with a single ``pytorch_model.bin`` on ``main``. Weights are
written by ``torch.save`` of a transformers model; tokenizers are trained on the spot: SentencePiece for
T5 / mT5 (``spiece.model``) and Llama (``tokenizer.model``), byte-level BPE (``tokenizer.json``) for
GPT-2, OPT and Qwen2. The datasets are the configs' local samples in the forms that load today: SAMSum as
CSV (one summary cell empty), IWSLT 2017 as a script repo with its parquet export branch, Dolly as
MiniLLM's ``raw.jsonl`` / ``valid.jsonl`` (its other test sets as its repos hold them: Self-Instruct and
Vicuna in ``valid.jsonl``, S-NI and UnNI in ``11_/valid.jsonl``), OpenWebText as parquet export shards.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "configs" / "samples"
VOCAB = 400
FAMILY = {  # config -> (model family, tokenizer kind)
    "gpt2_dolly": ("gpt2", "bpe"),
    "opt_dolly": ("opt", "bpe"),
    "openllama_dolly": ("llama", "llama"),
    "qwen_dolly": ("qwen2", "bpe"),
    "t5_samsum": ("t5", "t5"),
    "mt5_iwslt": ("mt5", "t5"),
}
SOURCES = {  # task -> data.source in the hub forms of the configs' defaults
    "dolly": "MiniLLM/dolly?data_files=train:raw.jsonl,test:valid.jsonl",
    "samsum": "knkarthick/samsum",
    "iwslt2017": "IWSLT/iwslt2017@refs/convert/parquet?data_dir=iwslt2017-en-de",
}
OPENWEBTEXT = "Skylion007/openwebtext@refs/convert/parquet?data_dir=plain_text"
TEST_SETS = {"self-inst": "MiniLLM/self-inst", "vicuna": "MiniLLM/Vicuna", "sinst": "MiniLLM/sinst",
             "uinst": "MiniLLM/uinst"}  # fmt: skip


def _rows(task: str, split: str) -> list[dict]:
    with open(SAMPLES / task / f"{split}.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def _texts() -> list[str]:
    out = []
    for task in ("dolly", "samsum", "iwslt2017"):
        for split in ("train", "validation", "test"):
            for row in _rows(task, split):
                out += [v for v in (row.get("translation") or row).values() if isinstance(v, str)]
    return out


def _put(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def _sentencepiece(out: Path, name: str, config: dict, **ids: int) -> None:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_texts()),
        model_writer=model,
        vocab_size=VOCAB,
        model_type="unigram",
        byte_fallback=True,
        hard_vocab_limit=False,
        character_coverage=0.98,
        minloglevel=2,
        **ids,
    )
    _put(out / name, model.getvalue())
    _put(out / "tokenizer_config.json", json.dumps(config))


def _bpe(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_texts(), trainer)
    _put(out / "tokenizer.json", tok.to_str())
    special = "<|endoftext|>"
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": special, "bos_token": special}
    _put(out / "tokenizer_config.json", json.dumps(config))


TOKENIZERS = {  # kind -> (writer, the ids a model config takes from it)
    "t5": (
        lambda out: _sentencepiece(
            out,
            "spiece.model",
            {"tokenizer_class": "T5Tokenizer", "extra_ids": 0},
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
        ),
        {"pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0},
    ),
    "llama": (
        lambda out: _sentencepiece(
            out,
            "tokenizer.model",
            {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False},
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
        ),
        {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    ),
    "bpe": (_bpe, {"pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0}),
}


def _save_bin(model, out: Path, shards: int) -> None:
    """``torch.save`` of the state dict, as one file or ``shards`` files with an index."""
    import torch

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if shards == 1:
        torch.save(state, out / "pytorch_model.bin")
        return
    names, weight_map = sorted(state), {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in names[i::shards]}
        torch.save(part, out / file)
        weight_map |= dict.fromkeys(part, file)
    _put(out / "pytorch_model.bin.index.json", json.dumps({"metadata": {}, "weight_map": weight_map}))


def _model(hf: dict, ids: dict, out: Path, shards: int, seed: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    kwargs = (
        {k: v for k, v in hf.items() if k not in ("model_type", "bos_token_id")} | ids | {"vocab_size": VOCAB}
    )
    config = AutoConfig.for_model(hf["model_type"], **kwargs)
    auto = AutoModelForSeq2SeqLM if hf["model_type"] in ("t5", "mt5") else AutoModelForCausalLM
    torch.manual_seed(seed)
    model = auto.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    _save_bin(model, out, shards)


def build(root: Path, teacher_hf: dict, student_hf: dict, name: str) -> dict[str, str]:
    """The hub repos of config ``name``'s tiny pair; returns the config overrides that point at them."""
    family, kind = FAMILY[name]
    write_tokenizer, ids = TOKENIZERS[kind]
    teacher = root / "models" / "org" / f"tiny-{family}-teacher"
    student = root / "models" / "org" / f"tiny-{family}"
    _put(teacher / "main" / "README.md", "# weights in the conversion PR\n")
    _model(teacher_hf, ids, teacher / "refs" / "pr" / "1", shards=2, seed=0)
    _model(student_hf, ids, student / "main", shards=1, seed=1)
    for where in (teacher / "refs" / "pr" / "1", student / "main"):
        write_tokenizer(where)
    return {
        "teacher.path": f"org/tiny-{family}-teacher@refs/pr/1",
        "student.path": f"org/tiny-{family}",
        "tokenizer": "",
    }


def build_datasets(root: Path) -> None:
    """The tasks' samples (and OpenWebText) as the hub serves those datasets today."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = root / "datasets"
    for split, rows in (("train", "train"), ("validation", "validation"), ("test", "test")):
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["id", "dialogue", "summary"], extrasaction="ignore")
        writer.writeheader()
        samples = [{"id": str(i), **r} for i, r in enumerate(_rows("samsum", rows))]
        if split == "train":
            samples.append({"id": "empty", "dialogue": "A: hi\nB: hey", "summary": ""})  # None when read
        writer.writerows(samples)
        _put(d / "knkarthick/samsum/main" / f"{split}.csv", buf.getvalue())
        table = pa.Table.from_pylist(_rows("iwslt2017", rows))
        where = d / "IWSLT/iwslt2017/refs/convert/parquet/iwslt2017-en-de" / split / "0000.parquet"
        where.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, where)
    _put(d / "IWSLT/iwslt2017/main/iwslt2017.py", "import datasets\n")  # the script datasets >= 4 refuses
    _put(d / "Skylion007/openwebtext/main/openwebtext.py", "import datasets\n")

    def minillm(rows: list[dict]) -> str:
        out = [
            {"instruction": r["instruction"], "input": r["context"], "output": r["response"]} for r in rows
        ]
        return "".join(json.dumps(r) + "\n" for r in out)

    # raw.jsonl: the dev rows first (the tiny configs hold out 8), then the training rows
    _put(d / "MiniLLM/dolly/main/raw.jsonl", minillm(_rows("dolly", "validation") + _rows("dolly", "train")))
    _put(d / "MiniLLM/dolly/main/valid.jsonl", minillm(_rows("dolly", "test")))
    for name, repo in TEST_SETS.items():  # the configs' samples of them, in MiniLLM's columns already
        folder = "11_/" if name in ("sinst", "uinst") else ""
        _put(d / repo / "main" / f"{folder}valid.jsonl", (SAMPLES / name / "test.jsonl").read_text())
        _put(d / repo / "main" / f"{folder}valid.txt", "prompts as text: not what is read\n")
    for shard in range(2):
        texts = [r["response"] for r in _rows("dolly", "train")[shard::2]]
        where = d / "Skylion007/openwebtext/refs/convert/parquet/plain_text/train" / f"{shard:04d}.parquet"
        where.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"text": texts}), where)
