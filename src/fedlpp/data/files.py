"""Reading the delimited text files the local task loaders take, with clear errors."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path


def require_dir(path: str, task: str, expected: str) -> Path:
    """`path` as a directory, or an error saying what the task expects there."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"task {task!r}: {folder} is not a directory; expected a folder holding {expected}"
        )
    return folder


def read_table(
    file: Path,
    columns: Sequence[str],
    *,
    delimiter: str = ",",
    quote_none: bool = False,
) -> list[dict[str, str]]:
    """Rows of a headed CSV/TSV file as dicts, checking that `columns` are present.

    newline="" lets the csv module handle CRLF line ends and newlines inside
    quoted fields; utf-8-sig also accepts a file saved with a byte-order mark.
    quote_none reads quote characters as text (SST-2 sentences contain them).
    """
    if not file.is_file():
        raise FileNotFoundError(
            f"{file}: file not found; expected a file with columns {list(columns)}"
        )
    with file.open(encoding="utf-8-sig", newline="") as handle:
        reader = (
            csv.DictReader(handle, delimiter=delimiter, quoting=csv.QUOTE_NONE)
            if quote_none
            else csv.DictReader(handle, delimiter=delimiter)
        )
        found = list(reader.fieldnames or [])
        missing = [c for c in columns if c not in found]
        if missing:
            raise ValueError(f"{file}: expected columns {list(columns)}, found {found}")
        rows = list(reader)
    for number, row in enumerate(rows, start=1):
        if any(row.get(c) is None for c in columns):
            raise ValueError(f"{file}: data row {number} has fewer fields than the header {found}")
    return rows
