"""Reading the delimited text files the local task loaders take, with clear errors."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path


def require_dir(path: str, task: str, expected: str) -> Path:
    """`path` as a directory, or an error saying what the task expects there."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"task {task!r}: {folder} is not a directory; expected a folder holding {expected}")
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
    Every problem (not UTF-8, a row with more or fewer fields than the header, a field
    beyond the csv module's size limit) is a ValueError naming the file and line.
    """
    if not file.is_file():
        raise FileNotFoundError(f"{file}: file not found; expected a file with columns {list(columns)}")
    text = read_text(file)
    reader = (
        csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=csv.QUOTE_NONE)
        if quote_none
        else csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    )
    try:
        found = list(reader.fieldnames or [])
        missing = [c for c in columns if c not in found]
        if missing:
            raise ValueError(f"{file}: expected columns {list(columns)}, found {found}")
        rows = []
        for row in reader:
            _check_fields(file, reader.line_num, row, columns, found)
            rows.append(row)
    except csv.Error as e:  # e.g. a field longer than csv.field_size_limit()
        raise ValueError(f"{file}, line {reader.line_num + 1}: {e}") from None  # the line being read
    return rows


def _check_fields(file: Path, line: int, row: dict, columns: Sequence[str], header: list[str]) -> None:
    if None in row:  # DictReader's key for fields beyond the header
        raise ValueError(
            f"{file}, line {line}: {len(header) + len(row[None])} fields, more than the header's {len(header)} {header}"
        )
    if any(row.get(c) is None for c in columns):
        raise ValueError(f"{file}, line {line}: fewer fields than the header {header}")


def read_text(file: Path) -> str:
    """The file as UTF-8 text (a byte-order mark allowed), or an error naming the file and line of the first bad byte.

    A folder, a FIFO or a device is refused by name (reading a FIFO would wait for a writer for good).
    """
    check_regular_file(file)
    data = file.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(f"{file}, line {line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def check_regular_file(file: Path) -> None:
    if file.is_dir():
        raise ValueError(f"{file} is a directory, not a file")
    if file.exists() and not file.is_file():
        raise ValueError(f"{file} is not a regular file (a FIFO, socket or device); give a file")


# The longest JSON line read: json.loads of a 50 MB line took 6.5 GB of memory, and no example of a
# task's data is near this (DialogSum's longest dialogue is ~10 kB).
MAX_JSON_LINE = 1 << 20


def read_json_lines(file: Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSON Lines file; a ValueError naming file and line otherwise.

    Lines are split on "\n" only: JSON strings may hold other Unicode line breaks.
    """
    rows = []
    for number, line in enumerate(read_text(file).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{file}, line {number}"
        if len(line) > MAX_JSON_LINE:
            raise ValueError(f"{where}: {len(line):,} characters, more than the {MAX_JSON_LINE:,} a line may hold")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
        except RecursionError:
            raise ValueError(f"{where}: JSON nested too deeply") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        rows.append((number, row))
    return rows
