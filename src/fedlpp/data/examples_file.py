"""A client's own examples as a JSONL file: what a SuperNode reads from its ``data-path``.

One JSON object per line with the fields of ``Example``: ``prompt`` and ``target`` (text;
target "" for classification), optionally ``label`` (an integer class id), ``group`` and
``pair`` (a sentence pair's second text).
``fedlpp partition`` writes one such file per client from an experiment config.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from fedlpp.data.files import read_json_lines
from fedlpp.data.schema import Example


class ExamplesFileError(ValueError):
    """A client's data file is missing or malformed; the message names the file and line."""


def write_examples(path: Path, examples: Sequence[Example]) -> None:
    lines = [json.dumps({"prompt": e.prompt, "target": e.target, "label": e.label, "group": e.group, **({"pair": e.pair} if e.pair else {})})
             for e in examples]
    path.write_text("".join(line + "\n" for line in lines))


def read_examples(path: str | Path) -> list[Example]:
    """Every example of the file; an ExamplesFileError naming file and line for anything else."""
    p = Path(path)
    if not p.is_file():
        raise ExamplesFileError(f"{p}: no such data file (a client's data-path must be a JSONL file of examples)")
    try:
        rows = read_json_lines(p)
    except ValueError as e:
        raise ExamplesFileError(str(e)) from None
    examples = [_example(row, f"{p}, line {number}") for number, row in rows]
    if not examples:
        raise ExamplesFileError(f"{p}: holds no examples")
    return examples


def _example(row: dict, where: str) -> Example:
    prompt, target, label, group, pair = row.get("prompt"), row.get("target", ""), row.get("label"), row.get("group", ""), row.get("pair", "")
    if not isinstance(prompt, str) or not prompt:
        raise ExamplesFileError(f"{where}: 'prompt' must be a non-empty string")
    if not isinstance(target, str) or not isinstance(group, str) or not isinstance(pair, str):
        raise ExamplesFileError(f"{where}: 'target', 'group' and 'pair' must be strings")
    if label is not None and (not isinstance(label, int) or isinstance(label, bool) or label < 0):
        raise ExamplesFileError(f"{where}: 'label' must be a non-negative integer or absent, got {label!r}")
    return Example(prompt=prompt, target=target, label=label, group=group, pair=pair)
