"""BLEU and NIST as the E2E challenge's scorer computes them (e2e-metrics' mteval-v13a-sig.pl).

Written from the script's definitions (Papineni et al. 2002; Doddington 2002; NIST's
mteval-v13a, as edited for the E2E challenge to take a varying number of references). The
scorer pads each MR's references with empty ones up to the largest count; its current
version ignores those in the brevity penalty and averages NIST's reference length over each
MR's non-empty references (the version used in the 2017 challenge counted the padding, which
changes NIST whenever MRs have different numbers of references):

- text is tokenised with mteval's default rules (``tokenize``) and lowercased (ASCII A-Z);
- n-gram counts are clipped by their largest count in any one reference;
- BLEU (n = 1..4) is the geometric mean of the corpus n-gram precisions times the brevity
  penalty exp(min(0, 1 - r / c)), r summing each output's closest reference length (ties: the
  shorter); a zero precision is smoothed to 1 / (2^k · count), as the script does;
- NIST (n = 1..5) sums, per n, the information of the matched n-grams over the number of
  output n-grams; an n-gram's information is -log2(count(n-gram) / count(its first n-1 words))
  over all references of the corpus (unigrams: over all reference words); the length penalty
  compares the output length with the average reference length, where the average counts
  each input's non-empty references (the E2E edit).

References empty after tokenisation are skipped, as the script skips them. One quirk is
kept for exactness: Perl reads the one-word prefix "0" as false, so an n-gram starting with
the word 0 takes its information from the total word count, as if it were a unigram.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

BLEU_N, NIST_N, COUNT_N = 4, 5, 9  # the script counts n-grams up to 9 for its information table

_PUNCTUATION = re.compile(r"([{-~\[-` -&(-+:-@/])")  # mteval's punctuation class, each set off by spaces


def tokenize(text: str, preserve_case: bool = False) -> list[str]:
    """mteval-v13a's default (non-international) tokenisation, then split on whitespace."""
    text = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    text = text.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    text = f" {text} "
    if not preserve_case:
        text = text.translate(_ASCII_LOWER)
    text = _PUNCTUATION.sub(r" \1 ", text)
    text = re.sub(r"([^0-9])([.,])", r"\1 \2 ", text)
    text = re.sub(r"([.,])([^0-9])", r" \1 \2", text)
    text = re.sub(r"([0-9])(-)", r"\1 \2 ", text)
    return text.split()


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _ngrams(words: Sequence[str], max_n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i : i + n]) for n in range(1, max_n + 1) for i in range(len(words) - n + 1))


def _information(references: Sequence[Sequence[list[str]]]) -> dict[tuple[str, ...], float]:
    """Each reference n-gram's information in bits, from counts over every reference of the corpus."""
    counts: Counter[tuple[str, ...]] = Counter()
    words = 0
    for refs in references:
        for ref in refs:
            words += len(ref)
            counts.update(_ngrams(ref, COUNT_N))
    return {g: -math.log2(c / (counts[g[:-1]] if _perl_true(g[:-1]) else words)) for g, c in counts.items()}


def _perl_true(prefix: tuple[str, ...]) -> bool:
    """Whether Perl takes the prefix string as true: not empty and not "0" (the script tests ``$mgram ?``)."""
    return bool(prefix) and prefix != ("0",)


def _closest_length(hyp_len: int, ref_lens: Sequence[int]) -> int:
    return min(ref_lens, key=lambda r: (abs(hyp_len - r), r))


def _nist_penalty(ratio: float) -> float:
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    beta = -math.log(0.5) / math.log(1.5) ** 2
    return math.exp(-beta * math.log(ratio) ** 2)


def bleu_nist(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU (0-100) and NIST of one output per input against all of that input's references."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} outputs but {len(references)} reference sets")
    hyps = [tokenize(h) for h in hypotheses]
    refs = [[words for words in (tokenize(r) for r in rs) if words] for rs in references]
    if any(not rs for rs in refs):
        raise ValueError("every output needs at least one reference with a word in it")
    info = _information(refs)
    matched, total = [0] * (COUNT_N + 1), [0] * (COUNT_N + 1)
    matched_info = [0.0] * (COUNT_N + 1)
    ref_length = ref_words = nrefs = 0
    for hyp, rs in zip(hyps, refs, strict=True):
        clip: Counter[tuple[str, ...]] = Counter()
        for ref in rs:
            clip |= _ngrams(ref, COUNT_N)  # the largest count of each n-gram in any one reference
        for gram, count in _ngrams(hyp, COUNT_N).items():
            if gram in clip:
                hits = min(count, clip[gram])
                matched[len(gram)] += hits
                matched_info[len(gram)] += info[gram] * hits
        for n in range(1, COUNT_N + 1):
            total[n] += max(len(hyp) - n + 1, 0)
        ref_length += _closest_length(len(hyp), [len(r) for r in rs])
        ref_words += sum(len(r) for r in rs)
        nrefs += len(rs)
    return {"bleu": 100.0 * _bleu(matched, total, ref_length), "nist": _nist(matched_info, total, ref_words, nrefs / len(hyps))}


def _bleu(matched: Sequence[int], total: Sequence[int], ref_length: int) -> float:
    if total[1] == 0:
        return 0.0
    log_sum, smooth = 0.0, 1
    for n in range(1, BLEU_N + 1):
        if total[n] == 0:
            continue  # the script adds log(1) for an order with no output n-grams
        if matched[n] == 0:
            smooth *= 2
            log_sum += math.log(1 / (smooth * total[n]))
        else:
            log_sum += math.log(matched[n] / total[n])
    return math.exp(log_sum / BLEU_N) * math.exp(min(0.0, 1 - ref_length / total[1]))


def _nist(matched_info: Sequence[float], total: Sequence[int], ref_words: int, refs_per_input: float) -> float:
    score = sum(matched_info[n] / max(total[n], 1) for n in range(1, NIST_N + 1))
    return score * _nist_penalty(total[1] / (ref_words / refs_per_input))
