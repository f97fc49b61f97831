"""The papers' tasks from tiny fixtures in their release formats: RTE, GSM8K, DialogSum, DART."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlpp.data import load_task
from fedlpp.data.examples_file import read_examples, write_examples
from fedlpp.data.formatting import encode_for_classification
from fedlpp.data.schema import CLASSIFICATION, GENERATION


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_rte_pairs_reach_the_tokenizer_as_pairs(tmp_path, bert_tokenizer):
    rows = ["index\tsentence1\tsentence2\tlabel"] + [
        f'{i}\tA "quoted" premise {i}.\tHypothesis {i}.\t{"entailment" if i % 2 else "not_entailment"}' for i in range(20)
    ]
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    task = load_task("rte", path=str(tmp_path))
    assert task.kind == CLASSIFICATION and task.label_names == ("entailment", "not_entailment")
    assert len(task.train) == 18 and len(task.eval) == 2
    first = next(e for e in task.train if e.prompt == 'A "quoted" premise 0.')
    assert (first.pair, first.label) == ("Hypothesis 0.", 1)
    ids = encode_for_classification(bert_tokenizer, [first], 64)[0]["input_ids"]
    assert ids.count(bert_tokenizer.sep_token_id) == 2  # [CLS] premise [SEP] hypothesis [SEP]


def test_rte_bad_label_is_named(tmp_path):
    (tmp_path / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n1\tc\td\tentailment\n")
    with pytest.raises(ValueError, match="train.tsv row 1: label 'maybe'"):
        load_task("rte", path=str(tmp_path))


def test_gsm8k_answers_span_lines_and_are_scored_by_their_final_number(tmp_path):
    _jsonl(
        tmp_path / "train.jsonl",
        [{"question": f"What is {i}+{i}?", "answer": f"{i}+{i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}"} for i in range(10)],
    )
    task = load_task("gsm8k", path=str(tmp_path))
    assert task.kind == GENERATION and task.multiline and task.metric_names == ("exact_match",)
    assert len(task.eval) == 1 and task.eval[0].references[0].endswith("#### " + task.eval[0].references[0].split()[-1])
    assert "\n" in task.train[0].target
    _jsonl(tmp_path / "train.jsonl", [{"question": "q", "answer": "no final marker"}])
    with pytest.raises(ValueError, match="train.jsonl, line 1: expected a 'question' and an 'answer' ending in '#### N'"):
        load_task("gsm8k", path=str(tmp_path))


def test_dialogsum_topics_are_groups_and_all_summaries_are_references(tmp_path):
    _jsonl(
        tmp_path / "dialogsum.train.jsonl",
        [
            {
                "fname": f"t{i}",
                "dialogue": f"#Person1#: hi {i}\n#Person2#: bye",
                "summary": f"s{i}",
                "topic": ["food", "travel"][i % 2],
            }
            for i in range(6)
        ],
    )
    _jsonl(
        tmp_path / "dialogsum.dev.jsonl",
        [{"fname": "d0", "dialogue": "#Person1#: x", "summary1": "a", "summary2": "b", "summary3": "c", "topic": "food"}],
    )
    task = load_task("dialogsum", path=str(tmp_path))
    assert task.metric_names == ("rouge_1", "rouge_2", "rouge_l") and not task.multiline
    assert {e.group for e in task.train} == {"food", "travel"}
    assert task.eval[0].references == ("a", "b", "c") and task.eval[0].prompt.endswith("#Person1#: x\nSummary:")
    (tmp_path / "dialogsum.dev.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="dialogsum.dev.jsonl"):
        load_task("dialogsum", path=str(tmp_path))


def test_dart_linearises_triples_and_holds_out_triple_sets_when_only_dev_is_there(tmp_path):
    sets = [
        {
            "tripleset": [[f"S{i}", "P", "O"], [f"S{i}", "Q", "R"]],
            "subtree_was_extended": False,
            "annotations": [{"source": "webnlg", "text": f"S{i} p o."}, {"source": "webnlg", "text": f"S{i} q r."}],
        }
        for i in range(10)
    ]
    (tmp_path / "dart-v1.1.1-full-dev.json").write_text(json.dumps(sets))
    task = load_task("dart", path=str(tmp_path), seed=1)
    assert task.metric_names == ("bleu", "ter")
    assert len(task.eval) == 1 and len(task.train) == 18 and task.eval[0].references[1].endswith("q r.")
    assert "Data: S" in task.eval[0].prompt and " | P | O ; S" in task.eval[0].prompt
    assert not {e.prompt for e in task.eval} & {e.prompt for e in task.train}
    sets[3]["tripleset"] = [["only two", "values"]]
    (tmp_path / "dart-v1.1.1-full-dev.json").write_text(json.dumps(sets))
    with pytest.raises(ValueError, match="triple set 4: 'tripleset' must be a list of"):
        load_task("dart", path=str(tmp_path))


def test_a_clients_examples_file_keeps_the_pair(tmp_path):
    from fedlpp.data.schema import Example

    examples = [
        Example(prompt="premise", pair="hypothesis", target="", label=1, group="1"),
        Example(prompt="alone", target="", label=0),
    ]
    write_examples(tmp_path / "c.jsonl", examples)
    assert read_examples(tmp_path / "c.jsonl") == examples


@pytest.mark.skipif(
    not (Path(__file__).resolve().parents[3] / "shared" / "data" / "rte").is_dir(), reason="../shared/data absent"
)
@pytest.mark.parametrize(
    "task, train, eval_", [("rte", 2241, 249), ("gsm8k", 6726, 747), ("dialogsum", 12460, 500), ("dart", 6307, 272)]
)
def test_the_shared_copies_load(task, train, eval_):
    data = load_task(task, path=str(Path(__file__).resolve().parents[3] / "shared" / "data" / task))
    assert (len(data.train), len(data.eval)) == (train, eval_)


def test_runs_score_each_task_with_its_own_metrics(tmp_path):
    """GSM8K decodes past newlines and reports exact match; RTE trains a pair classifier."""
    from fedlpp.cli import main

    _jsonl(tmp_path / "train.jsonl", [{"question": f"What is {i}+{i}?", "answer": f"It is\n#### {2 * i}"} for i in range(20)])
    out = tmp_path / "gsm"
    assert (
        main(
            [
                "run",
                "model.name=tiny-llama",
                "data.task=gsm8k",
                f"data.path={tmp_path}",
                "fl.rounds=1",
                "fl.num_clients=2",
                "fl.local_steps=1",
                "eval.max_new_tokens=8",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    assert set(json.loads((out / "summary.json").read_text())["global"]) == {"loss", "exact_match"}
    rte = tmp_path / "rte"
    rte.mkdir()
    (rte / "train.tsv").write_text(
        "index\tsentence1\tsentence2\tlabel\n"
        + "".join(f"{i}\tp {i}\th {i}\t{['entailment', 'not_entailment'][i % 2]}\n" for i in range(20))
    )
    out = tmp_path / "rte-run"
    assert (
        main(
            [
                "run",
                "model.name=tiny-bert",
                "data.task=rte",
                f"data.path={rte}",
                "fl.rounds=1",
                "fl.num_clients=2",
                "fl.local_steps=1",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    assert set(json.loads((out / "summary.json").read_text())["global"]) == {"loss", "accuracy"}


def test_multiline_tasks_do_not_stop_at_a_newline(causal_tokenizer):
    from fedlpp.evaluation.evaluate import stop_token_ids

    newline = causal_tokenizer.encode("\n", add_special_tokens=False)[0]
    assert newline in stop_token_ids(causal_tokenizer) and newline not in stop_token_ids(causal_tokenizer, multiline=True)
    assert causal_tokenizer.eos_token_id in stop_token_ids(causal_tokenizer, multiline=True)


def test_hub_layouts(monkeypatch):
    """The hub copies' field names and configs (a fake `load_hub_splits`: tests never touch the network)."""
    from fedlpp.data import dialogsum, gsm8k, rte

    calls = []

    def fake(splits):
        def load(hf_id, config=None):
            calls.append((hf_id, config))
            return splits

        return load

    monkeypatch.setattr(
        rte,
        "load_hub_splits",
        fake(
            {
                "train": [{"sentence1": "p", "sentence2": "h", "label": 1, "idx": 0}],
                "validation": [{"sentence1": "q", "sentence2": "i", "label": 0, "idx": 0}],
            }
        ),
    )
    task = load_task("rte", hf_id="nyu-mll/glue")
    assert calls[-1] == ("nyu-mll/glue", "rte") and (task.train[0].pair, task.train[0].label, task.eval[0].label) == ("h", 1, 0)
    monkeypatch.setattr(
        gsm8k,
        "load_hub_splits",
        fake(
            {
                "train": [{"question": f"q{i}", "answer": "a\n#### 1"} for i in range(3)],
                "test": [{"question": "r", "answer": "b\n#### 2"}],
            }
        ),
    )
    task = load_task("gsm8k", hf_id="openai/gsm8k", split="test")
    assert calls[-1] == ("openai/gsm8k", "main") and task.eval[0].references == ("b\n#### 2",)
    monkeypatch.setattr(
        dialogsum,
        "load_hub_splits",
        fake(
            {
                "train": [{"id": "t", "dialogue": "d", "summary": "s", "topic": "x"}],
                "validation": [{"id": "v", "dialogue": "e", "summary": "u", "topic": "y"}],
            }
        ),
    )
    task = load_task("dialogsum", hf_id="knkarthick/dialogsum")
    assert calls[-1] == ("knkarthick/dialogsum", None) and (task.train[0].group, task.eval[0].references) == ("x", ("u",))
    from fedlpp.data import dart

    row = {
        "tripleset": [["A", "p", "B"]],
        "subtree_was_extended": False,
        "annotations": {"source": ["webnlg", "webnlg"], "text": ["A p B.", "B is A's p."]},
    }
    monkeypatch.setattr(dart, "load_hub_splits", fake({"train": [row], "validation": [row]}))
    task = load_task("dart", hf_id="dart")
    assert task.eval[0].references == ("A p B.", "B is A's p.") and task.train[0].group == "webnlg"


def test_test_splits_are_read_only_when_asked_for(tmp_path):
    e2e = tmp_path / "e2e"
    e2e.mkdir()
    (e2e / "trainset.csv").write_text("mr,ref\n" + "".join(f'"name[A{i}], food[Thai]","A{i} is Thai."\n' for i in range(6)))
    (e2e / "devset.csv").write_text('mr,ref\n"name[D], food[Thai]","D is Thai."\n')
    assert [e.prompt for e in load_task("e2e", path=str(e2e)).eval] == [
        "Describe the restaurant.\nData: name[D], food[Thai]\nText:"
    ]
    with pytest.raises(FileNotFoundError, match="testset_w_refs.csv"):
        load_task("e2e", path=str(e2e), split="test")
    (e2e / "testset_w_refs.csv").write_text(
        'mr,ref\n"name[T], food[Thai]","T is Thai."\n"name[T], food[Thai]","T serves Thai food."\n'
    )
    assert load_task("e2e", path=str(e2e), split="test").eval[0].references == ("T is Thai.", "T serves Thai food.")
    gsm = tmp_path / "gsm"
    gsm.mkdir()
    _jsonl(gsm / "train.jsonl", [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(10)])
    _jsonl(gsm / "test.jsonl", [{"question": "t", "answer": "#### 99"}])
    dev, test = load_task("gsm8k", path=str(gsm)), load_task("gsm8k", path=str(gsm), split="test")
    assert dev.train == test.train and [e.prompt for e in test.eval] == ["Question: t\nAnswer:"] and len(dev.eval) == 1
    with pytest.raises(ValueError, match="task 'sst2' has no test split with references here"):
        load_task("sst2", path=str(tmp_path), split="test")


def test_eval_refuses_to_score_on_training_examples(tmp_path, capsys):
    from fedlpp.cli import main

    _jsonl(tmp_path / "train.jsonl", [{"question": f"What is {i}+{i}?", "answer": f"#### {2 * i}"} for i in range(40)])
    out = tmp_path / "run"
    assert (
        main(
            [
                "run",
                "model.name=tiny-llama",
                "data.task=gsm8k",
                f"data.path={tmp_path}",
                "data.num_eval=2",
                "fl.rounds=1",
                "fl.num_clients=2",
                "fl.local_steps=1",
                "eval.max_new_tokens=4",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["eval", str(out), "data.num_eval=20", "--quiet"]) == 1
    assert "of the 20 evaluation inputs were in the run's training data" in capsys.readouterr().err
