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


def test_final_number_is_what_follows_the_marker_else_the_last_number():
    from decimal import Decimal

    from fedlpp.evaluation.metrics import final_number

    assert final_number("48/2 = 24 clips.\n#### 72") == Decimal(72)
    assert final_number("so she has 1,000.50 dollars") == Decimal("1000.50")
    assert final_number("it is -3, not 4") == Decimal(4) and final_number("no digits") is None


def test_exact_match_compares_final_numbers_as_numbers():
    from fedlpp.evaluation.metrics import exact_match

    refs = [["... #### 72"], ["... #### 1000"], ["#### 5"], ["#### 6"]]
    assert exact_match(["so 72", "1,000.0 in all", "#### 5.5", "nothing"], refs) == 50.0


def test_rouge_n_and_ter_from_their_packages():
    from fedlpp.evaluation.metrics import rouge_1, rouge_2, ter

    assert rouge_1(["the cat sat"], [["the cat ran"]]) == pytest.approx(100 * 2 / 3)
    assert rouge_2(["the cat sat"], [["the cat ran"]]) == pytest.approx(50.0)
    assert ter(["the cat sat"], [["the cat ran"]]) == pytest.approx(100 / 3)
    # tercom's convention: the edits to the closest reference over the references' average length (1 / 2.5)
    assert ter(["the cat sat"], [["a dog", "the cat ran"]]) == pytest.approx(40.0)
