"""data.task=jsonl: a user's own file, generation or classification, with clear errors naming file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlpp.config import ConfigError, load_config
from fedlpp.data import load_task
from fedlpp.data.schema import CLASSIFICATION, GENERATION


def _write(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_generation_groups_every_reference_of_an_input_for_evaluation(tmp_path):
    train = _write(
        tmp_path / "train.jsonl", [{"input": "Q: 1+1?\nA:", "output": "2"}, {"input": "Q: 2+2?\nA:", "outputs": ["4", "four"]}]
    )
    evals = _write(
        tmp_path / "eval.jsonl",
        [
            {"input": "Q: 3+3?\nA:", "output": "6"},
            {"input": "Q: 3+3?\nA:", "output": "six"},
            {"input": "Q: 5+5?\nA:", "outputs": ["10"]},
        ],
    )
    task = load_task("jsonl", path=train, eval_path=evals)
    assert task.kind == GENERATION
    assert [(e.prompt, e.target) for e in task.train] == [("Q: 1+1?\nA:", "2"), ("Q: 2+2?\nA:", "4"), ("Q: 2+2?\nA:", "four")]
    assert [(e.prompt, e.references) for e in task.eval] == [("Q: 3+3?\nA:", ("6", "six")), ("Q: 5+5?\nA:", ("10",))]


def test_without_an_eval_file_a_seeded_tenth_of_the_inputs_is_held_out(tmp_path):
    rows = [{"input": f"x{i}", "output": f"y{i}", "group": "even" if i % 2 == 0 else "odd"} for i in range(50)]
    rows += [{"input": "x7", "output": "another y7"}]  # a repeated input stays on one side of the split
    path = _write(tmp_path / "all.jsonl", rows)
    task = load_task("jsonl", path=path, seed=3)
    held = {e.prompt for e in task.eval}
    assert len(held) == 5 and not held & {e.prompt for e in task.train}
    assert len(task.train) + sum(len(e.references) for e in task.eval) == 51
    assert load_task("jsonl", path=path, seed=3).eval == task.eval and load_task("jsonl", path=path, seed=4).eval != task.eval
    assert {e.group for e in task.train} == {"even", "odd"}
    assert len(load_task("jsonl", path=path, num_eval=20).eval) == 20


def test_classification_with_string_or_integer_labels(tmp_path):
    words = _write(tmp_path / "w.jsonl", [{"text": f"t{i}", "label": ["spam", "ham", "eggs"][i % 3]} for i in range(30)])
    task = load_task("jsonl", path=words)
    assert task.kind == CLASSIFICATION and task.label_names == ("eggs", "ham", "spam") and task.num_labels == 3
    assert {(e.prompt, e.label) for e in (*task.train, *task.eval)} >= {("t0", 2), ("t1", 1), ("t2", 0)}
    ints = _write(tmp_path / "i.jsonl", [{"text": f"t{i}", "label": i % 2} for i in range(20)])
    evals = _write(tmp_path / "e.jsonl", [{"text": "u", "label": 1}])
    task = load_task("jsonl", path=ints, eval_path=evals)
    assert task.label_names == ("0", "1") and len(task.train) == 20 and [e.label for e in task.eval] == [1]


@pytest.mark.parametrize(
    "rows, message",
    [
        (['{"input": "a", "output": "b"}', "{not json"], "line 2: not valid JSON"),
        ([{"input": "a", "output": "b"}, {"input": "c"}], "line 2: give exactly one of 'output'"),
        ([{"input": "a", "output": "b"}, {"text": "c", "label": 0}], "line 2: a classification example in a file of generation"),
        ([{"input": "", "output": "b"}], "line 1: 'input' must be a non-empty string"),
        ([{"input": "a", "outputs": []}], "line 1: 'outputs' must be a non-empty list"),
        ([{"prompt": "a", "target": "b"}], 'line 1: expected {"input", "output"} or {"text", "label"}'),
        ([{"text": "a", "label": 0}, {"text": "b", "label": "pos"}], "line 2: labels mix integers and strings"),
        ([{"text": "a", "label": -1}], "line 1: 'label' must be a non-negative integer or a string"),
        ([{"text": "a", "label": 1}, {"text": "b", "label": 1}], "every example has the label"),
        (
            [{"text": "a", "label": 1}, {"text": "b", "label": 5}],
            "line 2: integer labels must be 0..K-1 with every class present; 0 never",
        ),
        (
            [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}, {"text": "a", "label": "y"}],
            "line 3: this text has label 'y' but",
        ),
        ([{"input": "a", "output": "b", "group": 3}], "line 1: 'group' must be a string"),
        ([[1, 2]], "line 1: expected a JSON object"),
    ],
)
def test_a_bad_line_is_named(tmp_path, rows, message):
    path = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match="bad.jsonl") as error:
        load_task("jsonl", path=path)
    assert message in str(error.value)


def test_classification_holds_out_whole_texts_and_needs_two_classes_to_train(tmp_path):
    path = _write(tmp_path / "dup.jsonl", [{"text": f"t{i % 10}", "label": i % 2} for i in range(100)])
    task = load_task("jsonl", path=path)
    assert len({e.prompt for e in task.eval}) == 1 and not {e.prompt for e in task.eval} & {e.prompt for e in task.train}
    one_class = _write(tmp_path / "a.jsonl", [{"text": f"t{i}", "label": "a"} for i in range(5)])
    with pytest.raises(ValueError, match="a.jsonl: the training examples have one class only"):
        load_task("jsonl", path=one_class, eval_path=_write(tmp_path / "b.jsonl", [{"text": "u", "label": "b"}]))


def test_outputs_that_span_lines_are_decoded_to_the_end(tmp_path):
    rows = [{"input": f"q{i}", "output": f"first\nsecond {i}"} for i in range(10)]
    assert load_task("jsonl", path=_write(tmp_path / "m.jsonl", rows)).multiline
    assert not load_task(
        "jsonl", path=_write(tmp_path / "s.jsonl", [{"input": f"q{i}", "output": "one"} for i in range(10)])
    ).multiline


def test_dirichlet_needs_groups(tmp_path):
    from fedlpp.data.partition import partition_dirichlet

    with pytest.raises(ValueError, match="every example has the group '': give the data a group"):
        partition_dirichlet([""] * 20, 4, 0.1, seed=0)


def test_files_that_cannot_work_are_refused(tmp_path):
    one = _write(tmp_path / "one.jsonl", [{"input": "a", "output": "b"}])
    with pytest.raises(ValueError, match="cannot hold out 1 of 1 for evaluation.*data.eval_path"):
        load_task("jsonl", path=one)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_task("jsonl", path=str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="empty.jsonl: holds no examples"):
        load_task("jsonl", path=_write(tmp_path / "empty.jsonl", ["", " "]))
    labels = _write(tmp_path / "l.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}])
    with pytest.raises(ValueError, match="holds classification examples but .*one.jsonl holds generation"):
        load_task("jsonl", path=one, eval_path=labels)


def test_config_refuses_eval_path_for_other_tasks_and_jsonl_without_a_file():
    with pytest.raises(ConfigError, match="data.eval_path: is for data.task=jsonl"):
        load_config(None, ["data.task=e2e", "data.eval_path=x.jsonl"])
    with pytest.raises(ConfigError, match="data.path: data.task=jsonl needs data.path=FILE.jsonl"):
        load_config(None, ["data.task=jsonl"])


def test_a_run_on_your_own_file(tmp_path):
    from fedlpp.cli import main

    path = _write(tmp_path / "mine.jsonl", [{"input": f"Spell {i}:", "output": " ".join(str(i))} for i in range(40)])
    out = tmp_path / "run"
    assert (
        main(
            [
                "run",
                "model.name=tiny-llama",
                "data.task=jsonl",
                f"data.path={path}",
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
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["global"]) == {"loss", "bleu", "rouge_l"}
    assert summary["task"] == "jsonl" and summary["rounds"] == 1
