"""The paper's text metrics (docs/method.md): ROUGE-L F-measure from Google's ``rouge_score`` with the
Porter stemmer, the max over a prediction's references, ×100, averaged over examples; and corpus BLEU
from ``sacrebleu`` for translation."""

from __future__ import annotations

from collections.abc import Sequence


def _as_references(references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    return [[r] if isinstance(r, str) else list(r) for r in references]


def rouge_l(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Mean over examples of the best ROUGE-L F-measure against that example's references, ×100."""
    from rouge_score import rouge_scorer

    refs = _as_references(references)
    if len(refs) != len(predictions) or not predictions:
        raise ValueError(f"rouge_l: {len(predictions)} predictions for {len(refs)} references")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    best = [
        max(scorer.score(r, p)["rougeL"].fmeasure for r in rs)
        for p, rs in zip(predictions, refs, strict=True)
    ]
    return 100.0 * sum(best) / len(best)


def bleu(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """sacrebleu's corpus BLEU (default 13a tokenisation); several references per example allowed."""
    import sacrebleu

    refs = _as_references(references)
    if len(refs) != len(predictions) or not predictions:
        raise ValueError(f"bleu: {len(predictions)} predictions for {len(refs)} references")
    width = max(len(r) for r in refs)
    streams = [[r[i] if i < len(r) else r[0] for r in refs] for i in range(width)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


METRICS = {"rougeL": rouge_l, "bleu": bleu}
