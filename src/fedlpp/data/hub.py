"""Thin access to the Hugging Face hub through the optional `datasets` package.

`datasets` is imported only when a hub id is given, so that the project runs
offline without it. A loaded dataset is treated as a mapping from split name to
an iterable of row dicts, which is what both `datasets.DatasetDict` and a plain
dict of lists provide.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Row = Mapping[str, Any]
Splits = Mapping[str, Iterable[Row]]


def split_hf_id(hf_id: str) -> tuple[str, str | None]:
    """'repo' or 'repo:config' -> (repo, config or None)."""
    repo, _, config = hf_id.partition(":")
    return repo, (config or None)


def load_hub_splits(hf_id: str, config: str | None = None) -> Splits:
    """`datasets.load_dataset(repo, config)`, with a clear error when `datasets` is missing."""
    try:
        datasets = importlib.import_module("datasets")  # optional: imported on use only
    except ImportError as err:
        raise ImportError(
            f"loading {hf_id!r} from the Hugging Face hub needs the `datasets` package: "
            "pip install datasets (or pass a local `path` instead)"
        ) from err
    repo, id_config = split_hf_id(hf_id)
    loaded: Splits = datasets.load_dataset(repo, config or id_config)
    return loaded


def get_split(splits: Splits, names: Sequence[str], hf_id: str) -> list[Row]:
    """The first split of `names` that exists, as a list of rows."""
    for name in names:
        if name in splits:
            return list(splits[name])
    raise ValueError(f"{hf_id}: expected one of the splits {list(names)}, found {list(splits)}")


def pick_field(row: Row, candidates: Sequence[str], hf_id: str, meaning: str) -> str:
    """The first of `candidates` present in `row` (datasets name the same thing differently)."""
    for name in candidates:
        if name in row:
            return name
    raise ValueError(f"{hf_id}: no field for the {meaning}; expected one of {list(candidates)}, found {sorted(row)}")
