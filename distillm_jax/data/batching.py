"""Prompt/response pairs -> fixed-shape numpy batches, and a deterministic, resumable batch order.

Fixed shapes (docs/architecture.md §6): every batch has the configured lengths, so each jitted function
compiles once. Layouts:

- decoder-only, ``[B, max_length]``: prompt, response and its EOS, then padding. A response gets the
  room its prompt leaves (``max_length`` − the prompt's length, as the authors' data does), so the row
  starts where its prompt ends at slot ``max_prompt_length`` (left padding) unless the response needs
  the room before it; positions count real tokens only, so where a row sits changes nothing.
  ``labels[t]`` is the token at ``t + 1``; ``loss_mask[t]`` marks the positions whose label is a
  response token or the EOS — never the prompt or padding. ``prompt_ids``/``prompt_mask`` hold the
  prompt alone, right-aligned in ``max_prompt_length`` columns: what the sampler reads.
- encoder-decoder: ``input_ids`` [B, max_prompt_length] (right padding), ``decoder_input_ids``
  [B, max_length - max_prompt_length] = start token + response, ``labels`` = response + EOS.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

Row = tuple[list[int], list[int]]  # (prompt token ids, response token ids ending with EOS when produced)


@dataclasses.dataclass(frozen=True)
class Lengths:
    max_prompt_length: int
    max_length: int

    def __post_init__(self):
        if not 0 < self.max_prompt_length < self.max_length:
            raise ValueError(
                f"need 0 < max_prompt_length < max_length, got {self.max_prompt_length} and {self.max_length}"
            )

    @property
    def max_response(self) -> int:
        """Room for a response and its EOS after any prompt: an encoder-decoder's decoder length, and the
        sampler's new tokens (a decoder-only training row's response may take what a shorter prompt
        leaves: ``response_room``)."""
        return self.max_length - self.max_prompt_length

    def response_room(self, prompt: Sequence[int], encoder_decoder: bool) -> int:
        """Room for the response (and its EOS) of a row with this (cut) prompt."""
        return self.max_response if encoder_decoder else self.max_length - len(prompt)


def tokenize_pairs(
    pairs: Sequence[tuple[str, str]], tokenizer, lengths: Lengths, *, encoder_decoder: bool = False
) -> tuple[list[tuple[list[int], list[int]]], dict[str, int]]:
    """Token ids of (prompt, response + EOS), truncated to the configured lengths, tokenized as the
    models were trained to read them (docs/method.md):

    - decoder-only: the response is the tail of the whole text's tokens after the prompt's, as the
      official code cuts it, so a SentencePiece response starts as it does inside the text (not with
      the word-initial piece a separate call gives); where the prompt's last token merges with the
      response's first, the response is tokenized on its own.
    - encoder-decoder: the prompt ends with EOS (``</s>``), as Hugging Face's T5 tokenizers encode every
      input the pretrained models saw; the response, the decoder's own sequence, is tokenized alone.

    Rows with an empty response are skipped and counted, not silently trained on; so are prompts that
    had to be cut (an encoder prompt keeps its EOS)."""
    out, skipped = [], {"empty_response": 0, "prompt_truncated": 0}
    eos = tokenizer.eos_token_id
    room = lengths.max_prompt_length - int(encoder_decoder)
    for prompt, response in pairs:
        if not response.strip():
            skipped["empty_response"] += 1
            continue
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = None
        if not encoder_decoder:
            whole = tokenizer(prompt + response, add_special_tokens=False)["input_ids"]
            r = whole[len(p) :] if whole[: len(p)] == p and len(whole) > len(p) else None
        if r is None:
            r = tokenizer(response, add_special_tokens=False)["input_ids"]
        if len(p) > room:
            skipped["prompt_truncated"] += 1
            p = p[:room]
        if encoder_decoder:
            p = [*p, eos]
        out.append((p, [*r, eos][: lengths.response_room(p, encoder_decoder)]))
    return out, skipped


def decoder_only_batch(rows: Sequence[tuple[list[int], list[int]]], lengths: Lengths, pad: int) -> dict:
    b, p, total = len(rows), lengths.max_prompt_length, lengths.max_length
    ids = np.full((b, total), pad, np.int32)
    mask = np.zeros((b, total), np.int32)
    response = np.zeros((b, total), bool)
    prompt_ids, prompt_mask = np.full((b, p), pad, np.int32), np.zeros((b, p), np.int32)
    for i, (prompt, resp) in enumerate(rows):
        resp = resp[: total - len(prompt)]
        start = min(p - len(prompt), total - len(prompt) - len(resp))  # the prompt ends at slot p if it can
        end = start + len(prompt)
        ids[i, start:end], ids[i, end : end + len(resp)] = prompt, resp
        mask[i, start : end + len(resp)] = 1
        response[i, end : end + len(resp)] = True
        prompt_ids[i, p - len(prompt) :], prompt_mask[i, p - len(prompt) :] = prompt, 1
    labels = np.concatenate([ids[:, 1:], np.full((b, 1), pad, np.int32)], axis=1)
    loss_mask = np.concatenate([response[:, 1:], np.zeros((b, 1), bool)], axis=1).astype(np.int32)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "loss_mask": loss_mask,
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
    }


def encoder_decoder_batch(
    rows: Sequence[tuple[list[int], list[int]]], lengths: Lengths, pad: int, start: int
) -> dict:
    b, p, r = len(rows), lengths.max_prompt_length, lengths.max_response
    ids, mask = np.full((b, p), pad, np.int32), np.zeros((b, p), np.int32)
    labels, loss_mask = np.full((b, r), pad, np.int32), np.zeros((b, r), np.int32)
    for i, (prompt, resp) in enumerate(rows):
        ids[i, : len(prompt)], mask[i, : len(prompt)] = prompt, 1
        labels[i, : len(resp)], loss_mask[i, : len(resp)] = resp, 1
    dec = np.concatenate([np.full((b, 1), start, np.int32), labels[:, :-1]], axis=1)
    dec_mask = np.concatenate([np.ones((b, 1), np.int32), loss_mask[:, :-1]], axis=1)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "decoder_input_ids": dec,
        "decoder_attention_mask": dec_mask,
        "labels": labels,
        "loss_mask": loss_mask,
    }


def shard_rows(rows: Sequence, shards: Sequence[int], num_shards: int) -> list:
    """This host's part of a global batch's ``rows``: the slices of the data shards (``shards``, global
    indices out of ``num_shards``) its devices hold, in order. A host holding every shard takes all
    rows (also when they do not split evenly: such a batch is replicated)."""
    if len(shards) == num_shards:
        return list(rows)
    if len(rows) % num_shards:
        raise ValueError(f"a batch of {len(rows)} rows does not split over {num_shards} data shards")
    k = len(rows) // num_shards
    return [row for s in shards for row in rows[s * k : (s + 1) * k]]


class BatchOrder:
    """Which rows form each batch: a fresh permutation per epoch from ``seed``, cut into full batches
    (the last partial batch of an epoch is dropped: fixed shapes). ``position`` (epoch, batch) is all a
    checkpoint needs to resume the exact sequence. With several hosts, each takes the slices of every
    global batch that its data shards hold (``shard_rows``), so hosts never load each other's rows and a
    global batch is the same whatever the number of processes."""

    def __init__(
        self,
        num_rows: int,
        global_batch: int,
        seed: int,
        *,
        shards: Sequence[int] = (0,),
        num_shards: int = 1,
    ):
        if len(shards) != num_shards and global_batch % num_shards:
            raise ValueError(f"global batch {global_batch} does not split over {num_shards} data shards")
        if num_rows < global_batch:
            raise ValueError(f"{num_rows} rows are fewer than one batch of {global_batch}")
        self.num_rows, self.global_batch, self.seed = num_rows, global_batch, seed
        self.shards, self.num_shards = tuple(shards), num_shards
        self.position = (0, 0)

    @property
    def batches_per_epoch(self) -> int:
        return self.num_rows // self.global_batch

    def _rows(self, epoch: int, index: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
        batch = perm[index * self.global_batch : (index + 1) * self.global_batch]
        return np.asarray(shard_rows(batch, self.shards, self.num_shards))

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            epoch, index = self.position
            rows = self._rows(epoch, index)
            index += 1
            self.position = (epoch + 1, 0) if index == self.batches_per_epoch else (epoch, index)
            yield rows


class LazyTokens(Sequence):
    """Texts tokenized (+ EOS) when read: a large plain-text corpus (the LM loss's) costs each host only
    the rows its data shards train on, and no memory for token ids."""

    def __init__(self, texts: Sequence[str], tokenizer):
        self.texts, self.tokenizer = texts, tokenizer

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> list[int]:
        ids = self.tokenizer(self.texts[i], add_special_tokens=False)["input_ids"]
        return [*ids, self.tokenizer.eos_token_id]


def text_batch(rows: Sequence[list[int]], length: int, pad: int) -> dict:
    """Plain text for the language-modelling loss: each row's tokens from the first slot, next-token
    labels on every real token."""
    b = len(rows)
    ids, mask = np.full((b, length), pad, np.int32), np.zeros((b, length), np.int32)
    for i, toks in enumerate(rows):
        toks = toks[:length]
        ids[i, : len(toks)], mask[i, : len(toks)] = toks, 1
    labels = np.concatenate([ids[:, 1:], np.full((b, 1), pad, np.int32)], axis=1)
    loss_mask = np.concatenate([mask[:, 1:], np.zeros((b, 1), np.int32)], axis=1)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "loss_mask": loss_mask}
