"""ROUGE-L and BLEU as the paper computes them, on hand-checkable examples."""

import pytest

from distillm_jax import metrics


def test_rouge_l_stems_takes_the_best_reference_and_scales_by_100():
    assert metrics.rouge_l(["the cats are running"], ["the cat is running"]) == pytest.approx(75.0)  # stems
    # LCS("a b c d", "a c d") = 3: P = 3/4, R = 3/3, F = 6/7
    assert metrics.rouge_l(["a b c d"], [["x y", "a c d"]]) == pytest.approx(100 * 6 / 7)
    assert metrics.rouge_l(["same words", "nothing"], ["same words", "else"]) == pytest.approx(50.0)


def test_bleu_matches_sacrebleu_conventions():
    assert metrics.bleu(["Das ist ein kleines Haus ."], ["Das ist ein kleines Haus ."]) == pytest.approx(
        100.0
    )
    assert metrics.bleu(["völlig anders"], ["Das ist ein Haus ."]) == pytest.approx(0.0)
    two_refs = metrics.bleu(["Das ist ein Haus ."], [["Dies ist ein Haus .", "Das ist ein Haus ."]])
    assert two_refs == pytest.approx(100.0)


def test_mismatched_lengths():
    with pytest.raises(ValueError, match="rouge_l: 2 predictions for 1 references"):
        metrics.rouge_l(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="bleu: 1 predictions for 2 references"):
        metrics.bleu(["a"], ["a", "b"])
