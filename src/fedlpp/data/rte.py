"""GLUE RTE (premise, hypothesis -> entailment / not_entailment), from local files or the hub.

Local: a folder with GLUE's ``train.tsv`` (``index sentence1 sentence2 label``) and
optionally ``dev.tsv``; without it a seeded tenth of train is held out. Labels follow GLUE:
0 entailment, 1 not_entailment. The pair goes to the tokenizer as a pair.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from fedlpp.data.files import read_table, require_dir
from fedlpp.data.hub import Row, get_split, load_hub_splits, pick_field, split_hf_id
from fedlpp.data.sampling import hold_out, sized_task
from fedlpp.data.schema import CLASSIFICATION, Example, TaskData

NAME = "rte"
LABEL_NAMES = ("entailment", "not_entailment")
TRAIN_FILE, DEV_FILE = "train.tsv", "dev.tsv"
COLUMNS = ("sentence1", "sentence2", "label")
GLUE_REPOS = ("glue", "nyu-mll/glue")


def to_example(premise: str, hypothesis: str, label: object, where: str) -> Example:
    """One pair; the label is a GLUE name or its id."""
    value = LABEL_NAMES.index(label) if label in LABEL_NAMES else label
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if value not in (0, 1):
        raise ValueError(f"{where}: label {label!r} is not entailment (0) or not_entailment (1)")
    return Example(prompt=premise.strip(), pair=hypothesis.strip(), target="", label=int(value), group=str(value))


def _examples(rows: Iterable[tuple[str, str, object]], where: str) -> list[Example]:
    return [to_example(p, h, label, f"{where} row {i}") for i, (p, h, label) in enumerate(rows, 1)]


def _task(train: Sequence[Example], eval_: Sequence[Example], num_train: int, num_eval: int, seed: int) -> TaskData:
    return sized_task(NAME, CLASSIFICATION, train, eval_, num_train, num_eval, seed, num_labels=2, label_names=LABEL_NAMES)


def _read_tsv(path) -> list[Example]:
    rows = read_table(path, COLUMNS, delimiter="\t", quote_none=True)  # sentences hold quote characters
    return _examples(((r["sentence1"], r["sentence2"], r["label"]) for r in rows), str(path))


def load_rte_files(path: str, num_train: int, num_eval: int, seed: int) -> TaskData:
    folder = require_dir(path, NAME, f"{TRAIN_FILE} (columns index, sentence1, sentence2, label)")
    examples = _read_tsv(folder / TRAIN_FILE)
    if (folder / DEV_FILE).is_file():
        return _task(examples, _read_tsv(folder / DEV_FILE), num_train, num_eval, seed)
    train, eval_ = hold_out(examples, num_eval, seed, "rte")
    return _task(train, eval_, num_train, 0, seed)


def _hub_examples(rows: Sequence[Row], hf_id: str, split: str) -> list[Example]:
    if not rows:
        raise ValueError(f"{hf_id}: split {split!r} needed by task 'rte' is empty")
    fields = [pick_field(rows[0], (name,), hf_id, name) for name in COLUMNS]
    return _examples(((r[fields[0]], r[fields[1]], r[fields[2]]) for r in rows), f"{hf_id} {split}")


def load_rte_hub(hf_id: str, num_train: int, num_eval: int, seed: int) -> TaskData:
    """From GLUE (config 'rte' is implied for 'glue' and 'nyu-mll/glue')."""
    repo, config = split_hf_id(hf_id)
    splits = load_hub_splits(repo, config or ("rte" if repo in GLUE_REPOS else None))
    train = _hub_examples(get_split(splits, ("train",), hf_id), hf_id, "train")
    eval_ = _hub_examples(get_split(splits, ("validation", "dev"), hf_id), hf_id, "validation")
    return _task(train, eval_, num_train, num_eval, seed)


def load_rte(*, path: str, hf_id: str, num_train: int, num_eval: int, seed: int) -> TaskData:
    if path:
        return load_rte_files(path, num_train, num_eval, seed)
    if hf_id:
        return load_rte_hub(hf_id, num_train, num_eval, seed)
    raise ValueError("task 'rte' needs path= (a folder holding GLUE's train.tsv) or hf_id= (e.g. 'nyu-mll/glue')")
