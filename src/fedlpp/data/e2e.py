"""E2E NLG (restaurant meaning representation -> text), from local files or the hub.

Train keeps one example per (MR, reference) row. Eval keeps one example per
distinct MR carrying all of its references, because the official E2E scorer
scores one system output per MR against every reference (Dušek et al. 2020).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from fedlpp.data.files import read_table, require_dir
from fedlpp.data.hub import Row, get_split, load_hub_splits, pick_field
from fedlpp.data.sampling import EVAL_STREAM, TRAIN_STREAM, seeded_subset
from fedlpp.data.schema import GENERATION, Example, TaskData

NAME = "e2e"
PROMPT = "Describe the restaurant.\nData: {mr}\nText:"
TRAIN_FILE = "trainset.csv"
DEV_FILE = "devset.csv"
TEST_FILE = "testset_w_refs.csv"  # the challenge's test set with references
COLUMNS = ("mr", "ref")
# Field names used by the hub copies: GEM/e2e_nlg, tuetschek/e2e_nlg and e2e_nlg.
HUB_MR_FIELDS = ("meaning_representation", "mr")
HUB_REF_FIELDS = ("target", "human_reference", "ref")
HUB_REFS_FIELD = "references"
HUB_TRAIN_SPLITS = ("train",)
HUB_EVAL_SPLITS = ("validation", "dev", "devset")
HUB_TEST_SPLITS = ("test", "testset")

_EAT_TYPE = re.compile(r"eatType\[([^\]]*)\]")
_ATTRIBUTE = re.compile(r"(\w+)\[([^\]]*)\]")


def eat_type(mr: str) -> str:
    """The eatType value of an MR ('' if absent): the Dirichlet partitioner's group."""
    match = _EAT_TYPE.search(mr)
    return match.group(1).strip() if match else ""


def attributes(mr: str) -> tuple[tuple[str, str], ...]:
    """The MR's attribute-value pairs, e.g. (("name", "The Eagle"), ("eatType", "coffee shop"), ...)."""
    return tuple((k, v.strip()) for k, v in _ATTRIBUTE.findall(mr))


def train_example(mr: str, ref: str) -> Example:
    mr = mr.strip()
    return Example(prompt=PROMPT.format(mr=mr), target=ref.strip(), group=eat_type(mr), attributes=attributes(mr))


def group_references(pairs: Iterable[tuple[str, str]]) -> tuple[Example, ...]:
    """One example per distinct MR (order of first appearance) with all its references.

    Repeated references are kept, as the official scorer keeps them (the dev set
    has 151 exact duplicates; they weigh into CIDEr and METEOR).
    """
    refs_by_mr: dict[str, list[str]] = {}
    for mr, ref in pairs:
        refs_by_mr.setdefault(mr.strip(), []).append(ref.strip())
    return tuple(
        Example(
            prompt=PROMPT.format(mr=mr),
            target=refs[0],
            group=eat_type(mr),
            references=tuple(refs),
            attributes=attributes(mr),
        )
        for mr, refs in refs_by_mr.items()
    )


def _task(train: Sequence[Example], eval_: Sequence[Example], num_train: int, num_eval: int, seed: int) -> TaskData:
    return TaskData(
        name=NAME,
        kind=GENERATION,
        train=seeded_subset(train, num_train, seed, TRAIN_STREAM, "e2e train"),
        eval=seeded_subset(eval_, num_eval, seed, EVAL_STREAM, "e2e eval (distinct MRs)"),
    )


def load_e2e_files(path: str, num_train: int, num_eval: int, seed: int, split: str = "dev") -> TaskData:
    """From a folder holding the challenge's trainset.csv and devset.csv (testset_w_refs.csv for split="test")."""
    folder = require_dir(path, NAME, f"{TRAIN_FILE} and {DEV_FILE} (columns mr,ref)")
    train_rows = read_table(folder / TRAIN_FILE, COLUMNS)
    dev_rows = read_table(folder / (TEST_FILE if split == "test" else DEV_FILE), COLUMNS)
    train = [train_example(row["mr"], row["ref"]) for row in train_rows]
    eval_ = group_references((row["mr"], row["ref"]) for row in dev_rows)
    return _task(train, eval_, num_train, num_eval, seed)


def _hub_fields(rows: Sequence[Row], hf_id: str) -> tuple[str, str]:
    """Names of the MR and reference fields in this hub copy."""
    if not rows:
        raise ValueError(f"{hf_id}: a split needed by task 'e2e' is empty")
    return (
        pick_field(rows[0], HUB_MR_FIELDS, hf_id, "meaning representation"),
        pick_field(rows[0], HUB_REF_FIELDS, hf_id, "reference text"),
    )


def _hub_train_pairs(rows: Sequence[Row], hf_id: str) -> list[tuple[str, str]]:
    """(mr, ref) per row: each row's own reference is one training example."""
    mr_field, ref_field = _hub_fields(rows, hf_id)
    return [(row[mr_field], row[ref_field]) for row in rows]


def _hub_eval_pairs(rows: Sequence[Row], hf_id: str) -> list[tuple[str, str]]:
    """(mr, ref) pairs for grouping. Where rows carry a `references` list (GEM),
    it already holds all of the MR's references: take it once per MR."""
    mr_field, ref_field = _hub_fields(rows, hf_id)
    pairs: list[tuple[str, str]] = []
    listed: set[str] = set()
    for row in rows:
        mr, refs = row[mr_field], row.get(HUB_REFS_FIELD)
        if not refs:
            pairs.append((mr, row[ref_field]))
        elif mr not in listed:
            listed.add(mr)
            pairs.extend((mr, ref) for ref in refs)
    return pairs


def load_e2e_hub(hf_id: str, num_train: int, num_eval: int, seed: int, split: str = "dev") -> TaskData:
    """From a hub copy such as GEM/e2e_nlg or tuetschek/e2e_nlg."""
    splits = load_hub_splits(hf_id)
    train_pairs = _hub_train_pairs(get_split(splits, HUB_TRAIN_SPLITS, hf_id), hf_id)
    eval_pairs = _hub_eval_pairs(get_split(splits, HUB_TEST_SPLITS if split == "test" else HUB_EVAL_SPLITS, hf_id), hf_id)
    train = [train_example(mr, ref) for mr, ref in train_pairs]
    return _task(train, group_references(eval_pairs), num_train, num_eval, seed)


def load_e2e(*, path: str, hf_id: str, num_train: int, num_eval: int, seed: int, split: str = "dev") -> TaskData:
    """Task loader: local files when `path` is given, the hub when `hf_id` is."""
    if path:
        return load_e2e_files(path, num_train, num_eval, seed, split)
    if hf_id:
        return load_e2e_hub(hf_id, num_train, num_eval, seed, split)
    raise ValueError("task 'e2e' needs path= (a folder holding trainset.csv and devset.csv) or hf_id= (e.g. 'GEM/e2e_nlg')")
