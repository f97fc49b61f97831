"""GLUE SST-2 (binary sentiment), from local files or the hub.

Locally only train.tsv is usually at hand (GLUE's dev set is kept apart for
independent evaluation), so eval is a seeded held-out part of it, sized like
the GLUE dev set. A dev.tsv next to it is used as eval instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from fedlpp.data.files import read_table, require_dir
from fedlpp.data.hub import Row, get_split, load_hub_splits, pick_field, split_hf_id
from fedlpp.data.sampling import EVAL_STREAM, HOLDOUT_STREAM, TRAIN_STREAM, make_rng, seeded_subset
from fedlpp.data.schema import CLASSIFICATION, Example, TaskData

NAME = "sst2"
LABEL_NAMES = ("negative", "positive")
TRAIN_FILE = "train.tsv"
DEV_FILE = "dev.tsv"
COLUMNS = ("sentence", "label")
# Size of the GLUE SST-2 dev set; a held-out split takes at most a tenth of the
# file so that small files still leave most rows for training.
DEFAULT_NUM_EVAL = 872
MAX_HOLDOUT_FRACTION = 10
GLUE_REPOS = ("glue", "nyu-mll/glue")
HUB_TEXT_FIELDS = ("sentence", "text")
HUB_LABEL_FIELDS = ("label",)


def to_example(sentence: str, label: Any, where: str) -> Example:
    """One classification example; labels must be 0 or 1."""
    try:
        value = int(label)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: label {label!r} is not an integer") from None
    if value not in (0, 1):
        raise ValueError(f"{where}: label {value} is not 0 (negative) or 1 (positive)")
    return Example(prompt=sentence.strip(), target="", label=value, group=str(value))


def read_examples(file_rows: Iterable[tuple[str, Any]], where: str) -> list[Example]:
    return [to_example(text, label, f"{where} row {i}") for i, (text, label) in enumerate(file_rows, 1)]


def read_tsv(file: Path) -> list[Example]:
    # SST-2 sentences contain quote characters that are not CSV quoting.
    rows = read_table(file, COLUMNS, delimiter="\t", quote_none=True)
    return read_examples(((r["sentence"], r["label"]) for r in rows), str(file))


def hold_out(examples: Sequence[Example], num_eval: int, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, eval): a seeded held-out eval part; both keep the file order."""
    n = len(examples)
    k = num_eval or min(DEFAULT_NUM_EVAL, max(1, n // MAX_HOLDOUT_FRACTION))
    if n < 2 or k >= n:
        raise ValueError(f"sst2: cannot hold out {k} eval examples from {n} rows and keep some for training")
    order = make_rng(seed, HOLDOUT_STREAM).permutation(n)
    held = {int(i) for i in order[:k]}
    train = [e for i, e in enumerate(examples) if i not in held]
    eval_ = [e for i, e in enumerate(examples) if i in held]
    return train, eval_


def _task(train: Sequence[Example], eval_: Sequence[Example], num_train: int, num_eval: int, seed: int) -> TaskData:
    return TaskData(
        name=NAME,
        kind=CLASSIFICATION,
        train=seeded_subset(train, num_train, seed, TRAIN_STREAM, "sst2 train"),
        eval=seeded_subset(eval_, num_eval, seed, EVAL_STREAM, "sst2 eval"),
        num_labels=len(LABEL_NAMES),
        label_names=LABEL_NAMES,
    )


def load_sst2_files(path: str, num_train: int, num_eval: int, seed: int) -> TaskData:
    """From a folder holding train.tsv (and optionally dev.tsv)."""
    folder = require_dir(path, NAME, f"{TRAIN_FILE} (columns sentence<TAB>label)")
    examples = read_tsv(folder / TRAIN_FILE)
    if (folder / DEV_FILE).is_file():
        return _task(examples, read_tsv(folder / DEV_FILE), num_train, num_eval, seed)
    train, eval_ = hold_out(examples, num_eval, seed)
    # The held-out part already has the requested size.
    return _task(train, eval_, num_train, 0, seed)


def _hub_examples(rows: Sequence[Row], hf_id: str, split: str) -> list[Example]:
    if not rows:
        raise ValueError(f"{hf_id}: split {split!r} needed by task 'sst2' is empty")
    text = pick_field(rows[0], HUB_TEXT_FIELDS, hf_id, "sentence")
    label = pick_field(rows[0], HUB_LABEL_FIELDS, hf_id, "label")
    return read_examples(((r[text], r[label]) for r in rows), f"{hf_id} {split}")


def load_sst2_hub(hf_id: str, num_train: int, num_eval: int, seed: int) -> TaskData:
    """From stanfordnlp/sst2, or GLUE (config 'sst2' is implied for 'glue')."""
    repo, config = split_hf_id(hf_id)
    splits = load_hub_splits(repo, config or ("sst2" if repo in GLUE_REPOS else None))
    train = _hub_examples(get_split(splits, ("train",), hf_id), hf_id, "train")
    eval_ = _hub_examples(get_split(splits, ("validation", "dev"), hf_id), hf_id, "validation")
    return _task(train, eval_, num_train, num_eval, seed)


def load_sst2(*, path: str, hf_id: str, num_train: int, num_eval: int, seed: int) -> TaskData:
    """Task loader: local files when `path` is given, the hub when `hf_id` is."""
    if path:
        return load_sst2_files(path, num_train, num_eval, seed)
    if hf_id:
        return load_sst2_hub(hf_id, num_train, num_eval, seed)
    raise ValueError("task 'sst2' needs path= (a folder holding train.tsv) or hf_id= (e.g. 'stanfordnlp/sst2')")
