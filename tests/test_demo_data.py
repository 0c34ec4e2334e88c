"""The offline demo task: deterministic, varied, extractive, and fully covered by its tokenizer."""

import re

from distillm_jax.data import demo


def test_deterministic_and_splits_differ():
    assert demo.examples("train", 50) == demo.examples("train", 50)
    train = {e["dialogue"] for e in demo.examples("train", 2000)}
    test = {e["dialogue"] for e in demo.examples("test", 2000)}
    assert len(train) == 2000  # no duplicates within a split
    assert len(train & test) < 20  # the splits are different draws, not copies


def test_varied_and_extractive():
    pairs = demo.examples("validation", 1000)
    for phrase in ("will", "invites", "move their plan", "will lend", "wants to borrow", "According to"):
        assert any(phrase in e["summary"] for e in pairs), phrase  # every intent and phrasing appears
    for e in pairs:
        names = set(re.findall(r"\b[A-Z][a-z]+\b", e["summary"])) & set(demo.NAMES)
        assert names and all(n in e["dialogue"] for n in names), e  # who is in the dialogue
        assert not any(t in e["summary"] for t in demo.SMALL_TALK)  # small talk stays out
    with_small_talk = sum(any(t in e["dialogue"] for t in demo.SMALL_TALK) for e in pairs)
    assert 400 < with_small_talk < 800


def test_tokenizer_covers_every_split_and_round_trips():
    tok = demo.tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    for split in ("train", "validation", "test"):
        for e in demo.examples(split, 500, seed=9):
            for text in (e["dialogue"], e["summary"]):
                ids = tok(text)["input_ids"]
                assert tok.unk_token_id not in ids, text
            decoded = tok.decode(tok(e["summary"])["input_ids"])
            assert decoded.replace(" ", "") == e["summary"].replace(" ", "")


def test_shipped_teacher_knows_the_current_task():
    """The demo's teacher was trained on this generator: a change to the generator that it no longer
    knows (new words, new templates) shows here as a high loss — retrain it with configs/demo.py:teacher."""
    import jax.numpy as jnp

    from distillm_jax import losses, models
    from distillm_jax.data import batching, tasks

    teacher = models.from_pretrained(str(demo.TEACHER))
    task, lengths = tasks.get("demo"), batching.Lengths(96, 128)
    pairs = tasks.to_pairs(task, demo.examples("validation", 64), encoder_decoder=True)
    rows, _ = batching.tokenize_pairs(pairs, demo.tokenizer(), lengths, encoder_decoder=True)
    b = {k: jnp.asarray(v) for k, v in batching.encoder_decoder_batch(rows, lengths, 0, 0).items()}
    logits = teacher(b["input_ids"], b["attention_mask"], b["decoder_input_ids"], b["decoder_attention_mask"])
    assert float(losses.cross_entropy(logits, b["labels"], b["loss_mask"])) < 0.35


def test_long_task_every_fact_in_its_dialogue_in_order():
    """``demo_long``: each record's fields are said in its dialogue, the dialogues follow the records'
    order, and the responses are long (the regime of bench/evidence.py) yet fit the 256-token decoder."""
    assert demo.long_examples("train", 20) == demo.long_examples("train", 20)
    assert not {e["records"] for e in demo.long_examples("train", 500)} & {
        e["records"] for e in demo.long_examples("test", 500)
    }
    tok = demo.tokenizer()
    lengths = []
    for e in demo.long_examples("validation", 300, seed=4):
        records = e["records"].split("\n")
        assert demo.RECORDS_PER_ROW[0] <= len(records) <= demo.RECORDS_PER_ROW[1]
        at = 0
        for record in records:
            kind, fields = record.rstrip(" .").split(" : ")
            assert kind in ("plan", "move", "lend", "borrow", "news")
            first, second = fields.split(" , ")[:2]
            speaker = first if kind != "lend" else second  # who opens the dialogue
            at = e["dialogues"].index(f"{speaker}: ", at)  # in order, after the previous record's
            for field in fields.split(" , "):
                assert field in e["dialogues"], (field, e)
        for text in (e["records"], e["dialogues"]):
            assert tok.unk_token_id not in tok(text)["input_ids"], text
        lengths.append(len(tok(e["dialogues"])["input_ids"]))
    assert 150 < sum(lengths) / len(lengths) < 200 and sum(n >= 256 for n in lengths) <= 6


def test_shipped_long_teacher_knows_the_long_task():
    """As the demo's teacher: retrain it with configs/demo.py:teacher,long if the generator changes."""
    import jax.numpy as jnp

    from distillm_jax import losses, models
    from distillm_jax.data import batching, tasks

    teacher = models.from_pretrained(str(demo.LONG_TEACHER))
    task, lengths = tasks.get("demo_long"), batching.Lengths(96, 352)
    pairs = tasks.to_pairs(task, demo.long_examples("validation", 32), encoder_decoder=True)
    rows, skipped = batching.tokenize_pairs(pairs, demo.tokenizer(), lengths, encoder_decoder=True)
    assert len(rows) == 32 and not skipped["prompt_truncated"]
    b = {k: jnp.asarray(v) for k, v in batching.encoder_decoder_batch(rows, lengths, 0, 0).items()}
    logits = teacher(b["input_ids"], b["attention_mask"], b["decoder_input_ids"], b["decoder_attention_mask"])
    assert float(losses.cross_entropy(logits, b["labels"], b["loss_mask"])) < 0.6
