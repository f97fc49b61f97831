"""A client's own examples as a JSONL file: what a SuperNode reads from its ``data-path``.

The same fields ``data.task=jsonl`` reads, one JSON object per line:

- generation: ``{"input": ..., "output": ...}``;
- classification: ``{"text": ..., "label": K}`` with K the class id of the experiment's task
  (and ``"pair"``: a sentence pair's second text, as RTE's hypothesis).

Either may carry ``"group"`` and other string fields (the attributes a by-key partition
splits on). ``fedlpp partition`` writes one such file per client from an experiment config.
The spelling of earlier releases (``{"prompt", "target"}``, ``"label"`` for classification)
is still read, with a warning naming the file. Every line of a file is of one kind.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedlpp.data.files import read_json_lines
from fedlpp.data.schema import Example

GENERATION_FIELDS, CLASSIFICATION_FIELDS, OLD_FIELDS = ("input", "output"), ("text", "label"), ("prompt", "target")
RESERVED = {"input", "output", "text", "label", "pair", "group", "prompt", "target"}


class ExamplesFileError(ValueError):
    """A client's data file is missing or malformed; the message names the file and line."""


def line_of(example: Example) -> dict[str, Any]:
    """An example as one line of the file: generation when it has no label, classification otherwise."""
    if example.label is None:
        row: dict[str, Any] = {"input": example.prompt, "output": example.target}
    else:
        row = {"text": example.prompt, "label": example.label, **({"pair": example.pair} if example.pair else {})}
    if example.group or example.label is not None:  # a classification line without one would read back as str(label)
        row["group"] = example.group
    return {**row, **{k: v for k, v in example.attributes if k not in RESERVED}}


def write_examples(path: Path, examples: Sequence[Example]) -> None:
    path.write_text("".join(json.dumps(line_of(e), ensure_ascii=False) + "\n" for e in examples), encoding="utf-8")


def read_examples(path: str | Path) -> list[Example]:
    """Every example of the file; an ExamplesFileError naming file and line for anything else."""
    p = Path(path)
    if not p.is_file():
        raise ExamplesFileError(f"{p}: no such data file (a client's data-path must be a JSONL file of examples)")
    try:
        rows = read_json_lines(p)
    except ValueError as e:
        raise ExamplesFileError(str(e)) from None
    if any(
        OLD_FIELDS[0] in row for _, row in rows
    ):  # a FutureWarning: shown to the user by default (a DeprecationWarning is not)
        warnings.warn(
            f"{p}: 'prompt'/'target' is the old spelling of 'input'/'output' (classification: 'text'/'label'); "
            "it is still read but will be refused in a later release — rewrite the file with `fedlpp partition`",
            FutureWarning,
            stacklevel=2,
        )
    examples = [_example(row, f"{p}, line {number}") for number, row in rows]
    if not examples:
        raise ExamplesFileError(f"{p}: holds no examples")
    kinds = [e.label is None for e in examples]
    if any(k != kinds[0] for k in kinds):
        number = rows[kinds.index(not kinds[0])][0]
        raise ExamplesFileError(
            f"{p}, line {number}: a {'generation' if kinds[0] is False else 'classification'} example in a "
            f"file of {'generation' if kinds[0] else 'classification'} examples"
        )
    return examples


def _example(row: dict[str, Any], where: str) -> Example:
    if OLD_FIELDS[0] in row:
        row = _new_spelling(row)
    if "input" in row and "text" not in row:
        return Example(
            prompt=_text(row, "input", where),
            target=_text(row, "output", where),
            group=_group(row, where, ""),
            attributes=_attributes(row),
        )
    if "text" in row and "input" not in row:
        label = row.get("label")
        if not isinstance(label, int) or isinstance(label, bool) or label < 0:
            raise ExamplesFileError(f"{where}: 'label' must be the example's class id (a non-negative integer), got {label!r}")
        pair = row.get("pair", "")
        if not isinstance(pair, str):
            raise ExamplesFileError(f"{where}: 'pair' must be a string, got {pair!r}")
        return Example(
            prompt=_text(row, "text", where),
            target="",
            label=label,
            pair=pair,
            group=_group(row, where, str(label)),
            attributes=_attributes(row),
        )
    raise ExamplesFileError(
        f'{where}: expected {{"input", "output"}} (generation) or {{"text", "label"}} '
        f"(classification), got the keys {sorted(row)}"
    )


def _new_spelling(row: dict[str, Any]) -> dict[str, Any]:
    """An old-spelling line in today's fields: a label makes it classification, otherwise its target is the output."""
    rest = {k: v for k, v in row.items() if k not in OLD_FIELDS}
    if row.get("label") is not None:
        return {**rest, "text": row["prompt"]}
    return {**rest, "input": row["prompt"], **({"output": row["target"]} if "target" in row else {})}


def _text(row: dict[str, Any], key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ExamplesFileError(f"{where}: {key!r} must be a non-empty string, got {value!r}")
    return value


def _group(row: dict[str, Any], where: str, default: str) -> str:
    group = row.get("group", default)
    if not isinstance(group, str):
        raise ExamplesFileError(f"{where}: 'group' must be a string, got {group!r}")
    return group


def _attributes(row: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple((k, v) for k, v in row.items() if k not in RESERVED and isinstance(v, str))
