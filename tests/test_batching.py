"""Fixed-shape batches (both layouts), truncation and skips, and the resumable batch order."""

import itertools

import numpy as np
import pytest

from distillm_jax.data import batching, demo

LENGTHS = batching.Lengths(max_prompt_length=8, max_length=14)


@pytest.fixture(scope="module")
def tok():
    return demo.tokenizer()


def test_tokenize_truncates_and_counts_skips(tok):
    pairs = [("Anna : Hi", "Ben said hi ."), ("x", "  "), (" ".join(["Anna"] * 20), "Ben and Anna")]
    rows, skipped = batching.tokenize_pairs(pairs, tok, LENGTHS)
    assert skipped == {"empty_response": 1, "prompt_truncated": 1}
    assert [len(p) for p, _ in rows] == [3, 8]
    assert rows[0][1][-1] == tok.eos_token_id and len(rows[1][1]) == 4  # response + EOS
    long, _ = batching.tokenize_pairs([("Hi", " ".join(["Ben"] * 20))], tok, LENGTHS)
    # decoder-only: cut to the room its prompt leaves in max_length (as the authors' data), EOS counted
    assert len(long[0][0]) + len(long[0][1]) == LENGTHS.max_length > len(long[0][0]) + LENGTHS.max_response
    enc, _ = batching.tokenize_pairs([("Hi", " ".join(["Ben"] * 20))], tok, LENGTHS, encoder_decoder=True)
    assert len(enc[0][1]) == LENGTHS.max_response  # encoder-decoder: the decoder's own length


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_tokenized_as_the_models_read_text(kind, tmp_path):
    """SentencePiece: a decoder-only response is the whole text's tokens after the prompt's (a separate
    call would start it with a word-initial piece the model never saw there); an encoder prompt ends
    with </s> and its target is tokenized alone, as transformers' T5 tokenizer encodes them."""
    import hub_assets
    from transformers import AutoTokenizer

    hub_assets.TOKENIZERS[kind][0](tmp_path)
    sp = AutoTokenizer.from_pretrained(str(tmp_path))
    prompt, response = "Instruction: name a city.\n\n### Response:\n", "Paris is a city."
    lengths = batching.Lengths(64, 128)
    enc_dec = kind == "t5"
    [(p, r)], _ = batching.tokenize_pairs([(prompt, response)], sp, lengths, encoder_decoder=enc_dec)
    alone = sp(response, add_special_tokens=False)["input_ids"]
    if enc_dec:
        assert p == sp(prompt)["input_ids"] and p[-1] == sp.eos_token_id
        assert r == sp(text_target=response)["input_ids"]
    else:
        whole = sp(prompt + response, add_special_tokens=False)["input_ids"]
        assert p + r == [*whole, sp.eos_token_id] and r[:-1] != alone  # the separate call differs
    short = batching.Lengths(4, 40)  # a cut encoder prompt keeps its </s>
    [(p, _)], skipped = batching.tokenize_pairs([(prompt, response)], sp, short, encoder_decoder=enc_dec)
    assert len(p) == 4 and skipped["prompt_truncated"] == 1 and (p[-1] == sp.eos_token_id) == enc_dec


def test_decoder_only_layout(tok):
    rows = [([5, 6, 7], [20, 21, 1]), ([9], [30, 1])]
    b = batching.decoder_only_batch(rows, LENGTHS, pad=0)
    assert {k: v.shape for k, v in b.items()} == {
        "input_ids": (2, 14), "attention_mask": (2, 14), "labels": (2, 14), "loss_mask": (2, 14),
        "prompt_ids": (2, 8), "prompt_mask": (2, 8),
    }  # fmt: skip
    np.testing.assert_array_equal(b["input_ids"][0], [0, 0, 0, 0, 0, 5, 6, 7, 20, 21, 1, 0, 0, 0])
    np.testing.assert_array_equal(b["attention_mask"][1], [0] * 7 + [1, 1, 1] + [0] * 4)
    # the loss covers exactly the predictions of response tokens and the EOS
    for i, (_, resp) in enumerate(rows):
        np.testing.assert_array_equal(b["labels"][i][b["loss_mask"][i] == 1], resp)
    np.testing.assert_array_equal(b["prompt_ids"][1], [0] * 7 + [9])


def test_a_long_response_takes_the_room_its_prompt_leaves():
    """A response longer than max_length − max_prompt_length moves its row left into the prompt slots a
    short prompt left free; the sampler's prompt columns still hold the prompt right-aligned, and the
    row computes what it would anywhere (positions count real tokens)."""
    rows = [([5, 6], [*range(20, 30), 1]), ([9, 8, 7], [30, 1])]  # 2 + 11 = 13 of 14 slots
    b = batching.decoder_only_batch(rows, LENGTHS, pad=0)
    np.testing.assert_array_equal(b["input_ids"][0], [0, 5, 6, *range(20, 30), 1])
    np.testing.assert_array_equal(b["attention_mask"][0], [0] + [1] * 13)
    np.testing.assert_array_equal(b["labels"][0][b["loss_mask"][0] == 1], rows[0][1])
    np.testing.assert_array_equal(b["prompt_ids"][0], [0] * 6 + [5, 6])
    np.testing.assert_array_equal(b["prompt_mask"][0], [0] * 6 + [1, 1])
    np.testing.assert_array_equal(b["input_ids"][1], [0] * 5 + [9, 8, 7, 30, 1] + [0] * 4)  # as before
    too_long = batching.decoder_only_batch([([5, 6], list(range(20, 40)))], LENGTHS, pad=0)
    np.testing.assert_array_equal(too_long["input_ids"][0], [5, 6, *range(20, 32)])  # cut to the room


def test_encoder_decoder_layout():
    rows = [([5, 6, 7], [20, 21, 1]), ([9], [30, 1])]
    b = batching.encoder_decoder_batch(rows, LENGTHS, pad=0, start=0)
    np.testing.assert_array_equal(b["input_ids"][0], [5, 6, 7, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(b["labels"][1], [30, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(b["loss_mask"][1], [1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(b["decoder_input_ids"][0], [0, 20, 21, 1, 0, 0])
    np.testing.assert_array_equal(b["decoder_attention_mask"][1], [1, 1, 1, 0, 0, 0])


def test_batch_order_epochs_resume_and_hosts():
    order = batching.BatchOrder(num_rows=10, global_batch=4, seed=3)
    first = [r.tolist() for r in itertools.islice(order, 6)]  # 2 batches per epoch, 3 epochs
    for epoch in range(3):
        seen = first[2 * epoch] + first[2 * epoch + 1]
        assert len(set(seen)) == 8  # no row twice within an epoch
    assert first[0] != first[2]  # a new permutation each epoch
    again = batching.BatchOrder(num_rows=10, global_batch=4, seed=3)
    assert [r.tolist() for r in itertools.islice(again, 6)] == first  # deterministic
    resumed = batching.BatchOrder(num_rows=10, global_batch=4, seed=3)
    resumed.position = (1, 1)  # as restored from a checkpoint taken after 3 batches
    assert [r.tolist() for r in itertools.islice(resumed, 3)] == first[3:]
    hosts = [batching.BatchOrder(10, 4, 3, shards=s, num_shards=4) for s in ((0, 1), (2, 3))]
    shares = [next(iter(h)).tolist() for h in hosts]
    assert shares[0] + shares[1] == first[0]
    odd = [batching.BatchOrder(10, 4, 3, shards=s, num_shards=4) for s in ((0, 2), (1, 3))]
    shares = [next(iter(h)).tolist() for h in odd]  # a host holds the slices of its own shards
    assert shares[0] + shares[1] == [first[0][i] for i in (0, 2, 1, 3)]


def test_bad_lengths_and_batches():
    with pytest.raises(ValueError, match="need 0 < max_prompt_length < max_length, got 16 and 16"):
        batching.Lengths(16, 16)
    with pytest.raises(ValueError, match="global batch 6 does not split over 4 data shards"):
        batching.BatchOrder(100, 6, 0, shards=(0,), num_shards=4)
    with pytest.raises(ValueError, match="3 rows are fewer than one batch of 4"):
        batching.BatchOrder(3, 4, 0)
