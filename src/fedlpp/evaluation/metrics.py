"""Task metrics from established packages (sacrebleu, rouge-score); all on a 0-100 scale."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation

import sacrebleu
from rouge_score import rouge_scorer


def _streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """sacrebleu's reference streams: equal length, None marking a missing reference."""
    width = max((len(r) for r in references), default=0)
    if width == 0:
        raise ValueError("every hypothesis needs at least one reference")
    return [[refs[j] if j < len(refs) else None for refs in references] for j in range(width)]


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu, 13a tokenisation) with any number of references per hypothesis."""
    _check_lengths(hypotheses, references)
    return float(sacrebleu.corpus_bleu(list(hypotheses), _streams(references)).score)  # type: ignore[arg-type]  # None: no reference


def ter(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus TER (sacrebleu; lower is better), each hypothesis against its closest reference."""
    _check_lengths(hypotheses, references)
    return float(sacrebleu.corpus_ter(list(hypotheses), _streams(references)).score)  # type: ignore[arg-type]  # None: no reference


def _check_lengths(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")


_ROUGE = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)


def _rouge(kind: str) -> Callable[[Sequence[str], Sequence[Sequence[str]]], float]:
    def score(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
        """Mean ROUGE F-measure (rouge-score, no stemming), each hypothesis against its best reference."""
        _check_lengths(hypotheses, references)
        if not hypotheses:
            return 0.0
        scores = [_ROUGE.score_multi(list(refs), hyp)[kind].fmeasure for hyp, refs in zip(hypotheses, references, strict=True)]
        return 100.0 * sum(scores) / len(scores)

    return score


rouge_1, rouge_2, rouge_l = _rouge("rouge1"), _rouge("rouge2"), _rouge("rougeL")

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def final_number(text: str) -> Decimal | None:
    """GSM8K's answer: the number after the last "####" if there is one, else the last number in the text.

    Thousands separators are dropped and values compared as numbers ("1,000.0" == "1000").
    """
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    numbers = _NUMBER.findall(tail)
    if not numbers:
        return None
    try:
        return Decimal(numbers[0 if "####" in text else -1].replace(",", ""))
    except InvalidOperation:
        return None


def exact_match(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """% of outputs whose final number equals the reference's (GSM8K: the number after "####")."""
    _check_lengths(hypotheses, references)
    if not hypotheses:
        return 0.0
    hits = [
        (answer := final_number(hyp)) is not None and answer in {final_number(r) for r in refs}
        for hyp, refs in zip(hypotheses, references, strict=True)
    ]
    return 100.0 * sum(hits) / len(hits)


GENERATION_METRICS: dict[str, Callable[[Sequence[str], Sequence[Sequence[str]]], float]] = {
    "bleu": bleu,
    "rouge_1": rouge_1,
    "rouge_2": rouge_2,
    "rouge_l": rouge_l,
    "ter": ter,
    "exact_match": exact_match,
}


def accuracy(predictions: Sequence[object], labels: Sequence[object]) -> float:
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if not labels:
        return 0.0
    return 100.0 * sum(int(p == y) for p, y in zip(predictions, labels, strict=True)) / len(labels)
