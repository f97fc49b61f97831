"""The papers' metric sets: E2E's BLEU and NIST exactly as its scorer's mteval-v13a computes them, and `fedlpp score`."""

from __future__ import annotations

import json

import pytest

from fedlpp.cli import main
from fedlpp.evaluation.mteval import bleu_nist, tokenize

# A fixed set: varying reference counts, punctuation, digits with '.', '-' and '/', '£', upper case, a one-word
# output (brevity penalty), an output with no matching 4-gram.
OUTPUTS = [
    "The Eagle is a coffee shop near Burger King.",
    "Zizzi is an expensive pub.",
    "The Phoenix serves French food for £20-25 in the city centre.",
    "Loch Fyne, rated 5 out of 5.",
    "Blue Spice",
]
REFERENCES = [
    [
        "The Eagle is a coffee shop near Burger King.",
        "Near Burger King is The Eagle, a coffee shop.",
        "The Eagle coffee shop is located near Burger King.",
    ],
    ["Zizzi is a cheap pub."],
    [
        "The Phoenix is a French restaurant in the city centre with prices of £20-25.",
        "In the city centre, The Phoenix offers French food at £20-25.",
    ],
    [
        "Loch Fyne is a highly rated restaurant with a customer rating of 5 out of 5.",
        "Rated 5 out of 5, Loch Fyne is near The Rice Boat.",
        "LOCH FYNE has a 5/5 rating.",
        "The restaurant Loch Fyne has 5.0 stars.",
    ],
    ["Blue Spice is a family friendly coffee shop by the riverside."],
]


def test_bleu_and_nist_match_the_e2e_scorers_mteval():
    """Verified independently: the scoring subroutines of the current e2e-metrics mteval-v13a-sig.pl (tokenization,
    Words2Ngrams, compute_ngram_info, score_segment with its count of non-empty references, bleu_score, nist_score
    called with the mean count of non-empty references, brevity_penalty_closest skipping empty references,
    nist_length_penalty), run with perl on these inputs with references padded as its measure_scores.py pads them,
    printed BLEU 0.4533518932 and NIST 3.3060142095 (and agreed to 1e-10 on the first 200 dev MRs)."""
    scores = bleu_nist(OUTPUTS, REFERENCES)
    assert scores["bleu"] == pytest.approx(45.33518932, abs=1e-7)
    assert scores["nist"] == pytest.approx(3.3060142095, abs=1e-9)


def test_the_scripts_quirks_are_kept():
    """The same perl run: the word "0" as an n-gram prefix counts as false in Perl (information from the word total),
    and a reference empty after tokenisation (<skipped>) is no reference: BLEU 0.2452703429, NIST 2.6014432066."""
    scores = bleu_nist(["0 stars for 0 pounds", "Zizzi"], [["0 stars for Zizzi.", "0 pounds."], ["Zizzi is a pub.", "<skipped>"]])
    assert scores["bleu"] == pytest.approx(24.52703429, abs=1e-7)
    assert scores["nist"] == pytest.approx(2.6014432066, abs=1e-9)


def test_mteval_tokenization():
    assert tokenize('The Eagle, a £20-25 coffee-shop near "Burger King"; rated 5.0/5.') == [
        "the",
        "eagle",
        ",",
        "a",
        "£20",
        "-",
        "25",
        "coffee-shop",
        "near",
        '"',
        "burger",
        "king",
        '"',
        ";",
        "rated",
        "5.0",
        "/",
        "5",
        ".",
    ]
    assert tokenize("CAFÉ &amp; Bar") == ["cafÉ", "&", "bar"]  # only ASCII letters are lowercased, as in the script


def test_score_reads_the_e2e_formats_and_reports_java_metrics_as_unavailable_without_java(tmp_path, capsys, monkeypatch):
    import fedlpp.evaluation.coco as coco

    monkeypatch.setattr(coco.shutil, "which", lambda name: None)  # a machine without Java
    refs = tmp_path / "refs.txt"
    refs.write_text("\n\n".join("\n".join(rs) for rs in REFERENCES) + "\n")
    preds = tmp_path / "preds.txt"
    preds.write_text("\n".join(OUTPUTS) + "\n")
    assert main(["score", "--task", "e2e", str(refs), str(preds)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["inputs"] == 5 and report["references"] == 11
    assert report["metrics"]["bleu"] == pytest.approx(45.33518932, abs=1e-7) and "meteor" not in report["metrics"]
    assert set(report["unavailable"]) == {"meteor", "rouge_l", "cider"} and "Java" in report["unavailable"]["meteor"]
    csv_refs = tmp_path / "refs.csv"
    csv_refs.write_text("mr,ref\n" + "".join(f'"mr {i}","{r}"\n' for i, rs in enumerate(REFERENCES) for r in rs))
    assert main(["score", "--task", "e2e", str(csv_refs), str(preds)]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["nist"] == pytest.approx(3.3060142095, abs=1e-9)
    preds.write_text("\n".join(OUTPUTS[:4]) + "\n")
    assert main(["score", "--task", "e2e", str(refs), str(preds)]) == 1
    assert "holds 4 predictions but" in capsys.readouterr().err


@pytest.mark.skipif(__import__("shutil").which("java") is None, reason="no java: METEOR, ROUGE-L and CIDEr are unavailable here")
def test_meteor_rouge_l_and_cider_run_through_the_coco_code():
    from fedlpp.evaluation.coco import coco_scores

    scores = coco_scores(OUTPUTS[:2], REFERENCES[:2])
    # pycocoevalcap 1.2 on these inputs (ROUGE-L: 1.0 and 0.6, the mean 0.8; a regression check of the wiring)
    assert scores["rouge_l"] == pytest.approx(80.0) and scores["meteor"] == pytest.approx(51.7613, abs=1e-3)
    assert scores["cider"] == pytest.approx(4.2353, abs=1e-3)


def test_other_tasks_metric_sets(tmp_path, capsys):
    refs = tmp_path / "gsm.jsonl"
    refs.write_text(json.dumps({"question": "q", "answer": "so\n#### 72"}) + "\n" + json.dumps({"answer": "#### 5"}) + "\n")
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"output": "It is 72."}) + "\n" + json.dumps({"output": "six"}) + "\n")
    assert main(["score", "--task", "gsm8k", str(refs), str(preds)]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == {"exact_match": 50.0}
    labels, guesses = tmp_path / "labels.txt", tmp_path / "guesses.txt"
    labels.write_text("entailment\nnot_entailment\n")
    guesses.write_text("entailment\nentailment\n")
    assert main(["score", "--task", "rte", str(labels), str(guesses)]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == {"accuracy": 50.0}


def test_score_reads_glue_tsv_and_class_ids_by_name(tmp_path, capsys):
    tsv = tmp_path / "dev.tsv"
    tsv.write_text('sentence\tlabel\nit is "good"\t1\nbad\t0\n')
    preds = tmp_path / "p.txt"
    preds.write_text("positive\nnegative\n")  # fedlpp eval writes class names
    assert main(["score", "--task", "sst2", str(tsv), str(preds)]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == {"accuracy": 100.0}
