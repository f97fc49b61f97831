"""DialogSum (dialogue -> summary), from local files or the hub.

Local: a folder with ``dialogsum.train.jsonl`` and ``dialogsum.dev.jsonl`` (``dialogue``,
``summary`` — or ``summary1``..``summary3`` as in its test file — and ``topic``). The topic is
the partitioner's group (``data.partition=dirichlet`` gives clients different topics). Scored
with ROUGE-1/2/L F. Dialogues are long: raise ``model.max_length`` (~512).
"""

from __future__ import annotations

from collections.abc import Sequence

from fedlpp.data.files import read_json_lines, require_dir
from fedlpp.data.hub import Row, get_split, load_hub_splits
from fedlpp.data.sampling import sized_task
from fedlpp.data.schema import GENERATION, Example, TaskData

NAME = "dialogsum"
PROMPT = "Summarize the dialogue.\n{dialogue}\nSummary:"
TRAIN_FILE, DEV_FILE, TEST_FILE = "dialogsum.train.jsonl", "dialogsum.dev.jsonl", "dialogsum.test.jsonl"
METRICS = ("rouge_1", "rouge_2", "rouge_l")
SUMMARY_FIELDS = ("summary", "summary1", "summary2", "summary3")


def to_example(row: Row, where: str) -> Example:
    dialogue, topic = row.get("dialogue"), row.get("topic", "")
    summaries = [row[f].strip() for f in SUMMARY_FIELDS if isinstance(row.get(f), str) and row[f].strip()]
    if not isinstance(dialogue, str) or not dialogue.strip() or not summaries or not isinstance(topic, str):
        raise ValueError(f"{where}: expected a 'dialogue', a 'summary' (or summary1..3) and a 'topic' string")
    return Example(
        prompt=PROMPT.format(dialogue=dialogue.strip()),
        target=summaries[0],
        group=topic.strip(),
        references=tuple(summaries),
        attributes=(("topic", topic.strip()),),
    )


def _task(train: Sequence[Example], eval_: Sequence[Example], num_train: int, num_eval: int, seed: int) -> TaskData:
    return sized_task(NAME, GENERATION, train, eval_, num_train, num_eval, seed, metrics=METRICS)


def _read(path) -> list[Example]:
    return [to_example(row, f"{path}, line {n}") for n, row in read_json_lines(path)]


def load_dialogsum_files(path: str, num_train: int, num_eval: int, seed: int, split: str = "dev") -> TaskData:
    folder = require_dir(path, NAME, f"{TRAIN_FILE} and {DEV_FILE}")
    held = TEST_FILE if split == "test" else DEV_FILE
    for file in (TRAIN_FILE, held):
        if not (folder / file).is_file():
            raise FileNotFoundError(f"{folder / file}: file not found; task 'dialogsum' expects {TRAIN_FILE} and {held}")
    return _task(_read(folder / TRAIN_FILE), _read(folder / held), num_train, num_eval, seed)


def load_dialogsum_hub(hf_id: str, num_train: int, num_eval: int, seed: int, split: str = "dev") -> TaskData:
    """From knkarthick/dialogsum (train, and validation or test)."""
    splits = load_hub_splits(hf_id)
    names = ("test",) if split == "test" else ("validation", "dev")
    train = [to_example(r, f"{hf_id} train row {i}") for i, r in enumerate(get_split(splits, ("train",), hf_id), 1)]
    eval_ = [to_example(r, f"{hf_id} {names[0]} row {i}") for i, r in enumerate(get_split(splits, names, hf_id), 1)]
    return _task(train, eval_, num_train, num_eval, seed)


def load_dialogsum(*, path: str, hf_id: str, num_train: int, num_eval: int, seed: int, split: str = "dev") -> TaskData:
    if path:
        return load_dialogsum_files(path, num_train, num_eval, seed, split)
    if hf_id:
        return load_dialogsum_hub(hf_id, num_train, num_eval, seed, split)
    raise ValueError(
        "task 'dialogsum' needs path= (a folder holding dialogsum.train.jsonl and .dev.jsonl) "
        "or hf_id= (e.g. 'knkarthick/dialogsum')"
    )
