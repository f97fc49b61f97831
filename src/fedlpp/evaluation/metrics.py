"""Task metrics from established packages (sacrebleu, rouge-score); all on a 0-100 scale."""

from __future__ import annotations

from collections.abc import Sequence

import sacrebleu
from rouge_score import rouge_scorer


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu, 13a tokenisation) with any number of references per hypothesis."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")
    width = max((len(r) for r in references), default=0)
    if width == 0:
        raise ValueError("every hypothesis needs at least one reference")
    # sacrebleu wants reference streams of equal length; None marks a missing reference.
    streams = [[refs[j] if j < len(refs) else None for refs in references] for j in range(width)]
    return float(sacrebleu.corpus_bleu(list(hypotheses), streams).score)


_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean ROUGE-L F-measure, each hypothesis scored against its best reference."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")
    if not hypotheses:
        return 0.0
    scores = [_ROUGE.score_multi(list(refs), hyp)["rougeL"].fmeasure for hyp, refs in zip(hypotheses, references, strict=True)]
    return 100.0 * sum(scores) / len(scores)


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if not labels:
        return 0.0
    return 100.0 * sum(int(p == y) for p, y in zip(predictions, labels, strict=True)) / len(labels)
