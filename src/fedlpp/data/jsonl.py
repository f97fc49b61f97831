"""Your own data as JSON Lines: ``data.task=jsonl data.path=FILE.jsonl [data.eval_path=EVAL.jsonl]``.

One JSON object per line, every line of one kind:

- generation: ``{"input": ..., "output": ...}`` or ``{"input": ..., "outputs": [...]}`` (several
  references). The input is the prompt as written; the model learns to continue it with
  " " + output. Training keeps one example per (input, output); evaluation one per distinct
  input with all its references, as the E2E scorer does.
- classification: ``{"text": ..., "label": ...}``, labels all integers 0..K-1 or all strings
  (numbered in sorted order); optionally ``"pair"``, a sentence pair's second text.

Either kind may carry ``"group"`` (a string): what ``data.partition=dirichlet`` splits on
(classification: the label by default). Without ``data.eval_path`` a seeded tenth of the
distinct inputs (or ``data.num_eval`` of them) is held out for evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedlpp.data.files import check_regular_file, read_json_lines
from fedlpp.data.sampling import hold_out, sized_task
from fedlpp.data.schema import CLASSIFICATION, GENERATION, Example, TaskData

NAME = "jsonl"

Line = tuple[str, dict[str, Any]]  # ("FILE, line N", the object)


def load_jsonl(*, path: str, hf_id: str, num_train: int, num_eval: int, seed: int, eval_path: str = "") -> TaskData:
    """Task loader: ``path`` (and ``eval_path``) are JSONL files in one of the two formats above."""
    if hf_id:
        raise ValueError("task 'jsonl' reads a local file: give data.path=FILE.jsonl, not data.hf_id")
    if not path:
        raise ValueError(
            'task \'jsonl\' needs data.path=FILE.jsonl (one {"input", "output"} or {"text", "label"} object per line)'
        )
    lines = _lines(Path(path).expanduser())
    kind = _kind(lines)
    eval_lines = _lines(Path(eval_path).expanduser()) if eval_path else []
    if eval_lines and _kind(eval_lines) != kind:
        raise ValueError(f"{eval_path}: holds {_kind(eval_lines)} examples but {path} holds {kind} examples")
    if kind == GENERATION:
        return _generation(lines, eval_lines, num_train, num_eval, seed)
    return _classification(lines, eval_lines, num_train, num_eval, seed)


def _lines(file: Path) -> list[Line]:
    check_regular_file(file)  # a folder or a FIFO is named as such, not as "not found"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: file not found; task 'jsonl' expects a JSON Lines file")
    lines = [(f"{file}, line {number}", row) for number, row in read_json_lines(file)]
    if not lines:
        raise ValueError(f"{file}: holds no examples")
    return lines


def _kind(lines: Sequence[Line]) -> str:
    """generation when the first object has "input", classification when it has "text"; every line the same."""

    def kind_of(where: str, row: dict[str, Any]) -> str:
        if "input" in row and "text" not in row:
            return GENERATION
        if "text" in row and "input" not in row:
            return CLASSIFICATION
        raise ValueError(f'{where}: expected {{"input", "output"}} or {{"text", "label"}}, got keys {sorted(row)}')

    first = kind_of(*lines[0])
    for where, row in lines[1:]:
        if kind_of(where, row) != first:
            raise ValueError(f"{where}: a {kind_of(where, row)} example in a file of {first} examples")
    return first


def _text(where: str, row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: {key!r} must be a non-empty string, got {value!r}")
    return value


def _group(where: str, row: dict[str, Any], default: str = "") -> str:
    group = row.get("group", default)
    if not isinstance(group, str):
        raise ValueError(f"{where}: 'group' must be a string, got {group!r}")
    return group


def _references(where: str, row: dict[str, Any]) -> list[str]:
    if ("output" in row) == ("outputs" in row):
        raise ValueError(f"{where}: give exactly one of 'output' (a string) or 'outputs' (a list of strings)")
    if "output" in row:
        return [_text(where, row, "output").strip()]
    outputs = row["outputs"]
    if not isinstance(outputs, list) or not outputs or not all(isinstance(o, str) and o.strip() for o in outputs):
        raise ValueError(f"{where}: 'outputs' must be a non-empty list of non-empty strings")
    return [o.strip() for o in outputs]


RESERVED = ("input", "output", "outputs", "text", "label", "pair")


def _attributes(row: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """The line's other string fields, by name: what data.key can partition on."""
    return tuple((k, v) for k, v in row.items() if k not in RESERVED and isinstance(v, str))


Input = tuple[list[str], str, tuple[tuple[str, str], ...]]  # references, group, attributes


def _pairs(lines: Sequence[Line]) -> dict[str, Input]:
    """Each distinct input: all its references (file order, repeats kept), its group and attributes (its first line's)."""
    by_input: dict[str, Input] = {}
    for where, row in lines:
        prompt = _text(where, row, "input")
        refs, _, _ = by_input.setdefault(prompt, ([], _group(where, row), _attributes(row)))
        refs.extend(_references(where, row))
    return by_input


def _generation(lines: Sequence[Line], eval_lines: Sequence[Line], num_train: int, num_eval: int, seed: int) -> TaskData:
    train_inputs = _pairs(lines)
    if eval_lines:
        eval_inputs = _pairs(eval_lines)
    else:
        held = set(_held_out(list(train_inputs), num_eval, seed)[1])
        eval_inputs = {p: v for p, v in train_inputs.items() if p in held}
        train_inputs = {p: v for p, v in train_inputs.items() if p not in held}
        num_eval = 0  # the held-out part already has the requested size
    train = [
        Example(prompt=p, target=ref, group=group, attributes=attrs)
        for p, (refs, group, attrs) in train_inputs.items()
        for ref in refs
    ]
    eval_ = [
        Example(prompt=p, target=refs[0], group=group, references=tuple(refs), attributes=attrs)
        for p, (refs, group, attrs) in eval_inputs.items()
    ]
    multiline = any("\n" in e.target for e in train) or any("\n" in r for e in eval_ for r in e.references)
    return sized_task(NAME, GENERATION, train, eval_, num_train, num_eval, seed, multiline=multiline)


def _classification(lines: Sequence[Line], eval_lines: Sequence[Line], num_train: int, num_eval: int, seed: int) -> TaskData:
    names = _label_names([*lines, *eval_lines])
    examples = _distinct_texts(lines, names)
    if eval_lines:
        train, eval_ = examples, _distinct_texts(eval_lines, names)
    else:  # hold out whole texts: a repeated sentence never lands on both sides
        texts = list(dict.fromkeys(e.prompt for e in examples))
        held = set(_held_out(texts, num_eval, seed)[1])
        train = [e for e in examples if e.prompt not in held]
        eval_ = [e for e in examples if e.prompt in held]
        num_eval = 0
    if len({e.label for e in train}) < 2:
        raise ValueError(f"{lines[0][0].rsplit(', line', 1)[0]}: the training examples have one class only")
    return sized_task(
        NAME, CLASSIFICATION, train, eval_, num_train, num_eval, seed, num_labels=len(names), label_names=tuple(names)
    )


def _label_name(names: Sequence[str], label: int | None) -> str | None:
    return None if label is None else names[label]


def _distinct_texts(lines: Sequence[Line], names: Sequence[str]) -> list[Example]:
    """One example per line; a text given two different labels is an error naming both lines."""
    seen: dict[str, tuple[str, int | None]] = {}
    examples = []
    for where, row in lines:
        example = _labelled(where, row, names)
        first = seen.setdefault(example.prompt, (where, example.label))
        if first[1] != example.label:
            raise ValueError(
                f"{where}: this text has label {_label_name(names, example.label)!r} but {first[0]} gave it "
                f"{_label_name(names, first[1])!r}"
            )
        examples.append(example)
    return examples


def _label_names(lines: Sequence[Line]) -> list[str]:
    """The class names in id order: integer labels 0..K-1 as "0".."K-1", or the sorted distinct strings."""
    labels = []
    for where, row in lines:
        label = row.get("label")
        if isinstance(label, bool) or not isinstance(label, (int, str)) or (isinstance(label, int) and label < 0):
            raise ValueError(f"{where}: 'label' must be a non-negative integer or a string, got {label!r}")
        labels.append((where, label))
    kinds = {type(label) for _, label in labels}
    if len(kinds) > 1:
        where = next(w for w, label in labels if type(label) is not type(labels[0][1]))
        raise ValueError(f"{where}: labels mix integers and strings; use one or the other")
    present = sorted({label for _, label in labels})
    if len(present) < 2:
        raise ValueError(
            f"{lines[0][0].rsplit(', line', 1)[0]}: every example has the label {labels[0][1]!r}; "
            "classification needs two classes or more"
        )
    if kinds == {int} and present != list(range(len(present))):
        missing = next(i for i in range(len(present)) if i not in present)
        where = next(w for w, label in labels if isinstance(label, int) and label >= len(present))
        raise ValueError(
            f"{where}: integer labels must be 0..K-1 with every class present; {missing} never occurs "
            "(use string labels to name classes freely)"
        )
    return [str(label) for label in present]


def _labelled(where: str, row: dict[str, Any], names: Sequence[str]) -> Example:
    label, pair = row["label"], row.get("pair", "")
    if not isinstance(pair, str):
        raise ValueError(f"{where}: 'pair' must be a string, got {pair!r}")
    value = names.index(str(label))
    return Example(
        prompt=_text(where, row, "text").strip(),
        target="",
        label=value,
        group=_group(where, row, str(value)),
        pair=pair,
        attributes=_attributes(row),
    )


def _held_out(keys: Sequence[Any], num_eval: int, seed: int) -> tuple[list[Any], list[Any]]:
    try:
        return hold_out(keys, num_eval, seed, "task 'jsonl'")
    except ValueError as e:
        raise ValueError(f"{e}: give data.eval_path=EVAL.jsonl or a smaller data.num_eval") from None
