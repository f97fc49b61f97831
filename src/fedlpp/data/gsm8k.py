"""GSM8K (grade-school maths question -> worked answer ending in "#### N"), from local files or the hub.

Local: a folder with ``train.jsonl`` (``question``, ``answer``); the dev split is a seeded tenth
of train held out, the test split ``test.jsonl`` (``fedlpp eval --split test``). Answers span lines, so decoding runs to EOS
(set ``eval.max_new_tokens`` to ~256 for whole worked answers); scored by exact match of the
final number (``evaluation.metrics.final_number``).
"""

from __future__ import annotations

from collections.abc import Sequence

from fedlpp.data.files import read_json_lines, require_dir
from fedlpp.data.hub import Row, get_split, load_hub_splits, split_hf_id
from fedlpp.data.sampling import hold_out, sized_task
from fedlpp.data.schema import GENERATION, Example, TaskData

NAME = "gsm8k"
PROMPT = "Question: {question}\nAnswer:"
TRAIN_FILE, TEST_FILE = "train.jsonl", "test.jsonl"
METRICS = ("exact_match",)


def to_example(row: Row, where: str) -> Example:
    question, answer = row.get("question"), row.get("answer")
    if not isinstance(question, str) or not isinstance(answer, str) or "####" not in answer:
        raise ValueError(f"{where}: expected a 'question' and an 'answer' ending in '#### N'")
    answer = answer.strip()
    return Example(prompt=PROMPT.format(question=question.strip()), target=answer, references=(answer,))


def _task(train: Sequence[Example], eval_: Sequence[Example], num_train: int, num_eval: int, seed: int) -> TaskData:
    return sized_task(NAME, GENERATION, train, eval_, num_train, num_eval, seed, metrics=METRICS, multiline=True)


def _read(path) -> list[Example]:
    return [to_example(row, f"{path}, line {n}") for n, row in read_json_lines(path)]


def load_gsm8k_files(path: str, num_train: int, num_eval: int, seed: int, split: str = "dev") -> TaskData:
    folder = require_dir(path, NAME, f"{TRAIN_FILE} (question, answer per line)")
    for file in (TRAIN_FILE, *((TEST_FILE,) if split == "test" else ())):
        if not (folder / file).is_file():
            raise FileNotFoundError(f"{folder / file}: file not found; task 'gsm8k' expects it")
    return _split(_read(folder / TRAIN_FILE), _read(folder / TEST_FILE) if split == "test" else None, num_train, num_eval, seed)


def _split(examples: list[Example], test: list[Example] | None, num_train: int, num_eval: int, seed: int) -> TaskData:
    """Train minus the held-out dev tenth; evaluation on that tenth, or on ``test`` when given."""
    train, dev = hold_out(examples, num_eval if test is None else 0, seed, "gsm8k")
    if test is not None:
        return _task(train, test, num_train, num_eval, seed)
    return _task(train, dev, num_train, 0, seed)


def load_gsm8k_hub(hf_id: str, num_train: int, num_eval: int, seed: int, split: str = "dev") -> TaskData:
    """From openai/gsm8k (config 'main' implied): dev held out of train, test its test split."""
    repo, config = split_hf_id(hf_id)
    splits = load_hub_splits(repo, config or "main")
    train = [to_example(r, f"{hf_id} train row {i}") for i, r in enumerate(get_split(splits, ("train",), hf_id), 1)]
    test = (
        [to_example(r, f"{hf_id} test row {i}") for i, r in enumerate(get_split(splits, ("test",), hf_id), 1)]
        if split == "test"
        else None
    )
    return _split(train, test, num_train, num_eval, seed)


def load_gsm8k(*, path: str, hf_id: str, num_train: int, num_eval: int, seed: int, split: str = "dev") -> TaskData:
    if path:
        return load_gsm8k_files(path, num_train, num_eval, seed, split)
    if hf_id:
        return load_gsm8k_hub(hf_id, num_train, num_eval, seed, split)
    raise ValueError("task 'gsm8k' needs path= (a folder holding train.jsonl) or hf_id= (e.g. 'openai/gsm8k')")
