import pytest

from fedlpp.evaluation.metrics import accuracy, bleu, rouge_l


def test_bleu_is_100_for_exact_match_and_uses_every_reference():
    hyps = ["the cat sat on the mat today", "a dog barks at the moon tonight"]
    assert bleu(hyps, [[hyps[0]], [hyps[1]]]) == pytest.approx(100.0)
    # The second hypothesis matches only its *second* reference: multi-reference BLEU finds it.
    refs = [[hyps[0]], ["something else entirely here", hyps[1]]]
    assert bleu(hyps, refs) == pytest.approx(100.0)
    assert bleu(hyps, [[hyps[0]], ["something else entirely here"]]) < 100.0


def test_rouge_l_takes_the_best_reference():
    assert rouge_l(["the cat sat"], [["the cat sat"]]) == pytest.approx(100.0)
    # LCS "the cat sat" of 3 tokens vs a 5-token reference: P = 1, R = 0.6, F = 0.75.
    assert rouge_l(["the cat sat"], [["the cat sat on mat", "x"]]) == pytest.approx(75.0)


def test_accuracy_and_length_checks():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == pytest.approx(50.0)
    with pytest.raises(ValueError):
        accuracy([1], [1, 0])
    with pytest.raises(ValueError):
        bleu(["a"], [])
