"""GSM8K (grade-school maths question -> worked answer ending in "#### N"), from local files or the hub.

Local: a folder with ``train.jsonl`` (``question``, ``answer``) and optionally ``test.jsonl``;
without it a seeded tenth of train is held out. Answers span lines, so decoding runs to EOS
(set ``eval.max_new_tokens`` to ~256 for whole worked answers); scored by exact match of the
final number (``evaluation.metrics.final_number``).
"""

from __future__ import annotations

from collections.abc import Sequence

from fedlpp.data.files import read_json_lines, require_dir
from fedlpp.data.hub import Row, get_split, load_hub_splits, split_hf_id
from fedlpp.data.sampling import EVAL_STREAM, TRAIN_STREAM, hold_out, seeded_subset
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
    return TaskData(name=NAME, kind=GENERATION, metrics=METRICS, multiline=True,
                    train=seeded_subset(train, num_train, seed, TRAIN_STREAM, "gsm8k train"),
                    eval=seeded_subset(eval_, num_eval, seed, EVAL_STREAM, "gsm8k eval"))


def _read(path) -> list[Example]:
    return [to_example(row, f"{path}, line {n}") for n, row in read_json_lines(path)]


def load_gsm8k_files(path: str, num_train: int, num_eval: int, seed: int) -> TaskData:
    folder = require_dir(path, NAME, f"{TRAIN_FILE} (question, answer per line)")
    if not (folder / TRAIN_FILE).is_file():
        raise FileNotFoundError(f"{folder / TRAIN_FILE}: file not found; task 'gsm8k' expects it")
    examples = _read(folder / TRAIN_FILE)
    if (folder / TEST_FILE).is_file():
        return _task(examples, _read(folder / TEST_FILE), num_train, num_eval, seed)
    train, eval_ = hold_out(examples, num_eval, seed, "gsm8k")
    return _task(train, eval_, num_train, 0, seed)


def load_gsm8k_hub(hf_id: str, num_train: int, num_eval: int, seed: int) -> TaskData:
    """From openai/gsm8k (config 'main' implied)."""
    repo, config = split_hf_id(hf_id)
    splits = load_hub_splits(repo, config or "main")
    train = [to_example(r, f"{hf_id} train row {i}") for i, r in enumerate(get_split(splits, ("train",), hf_id), 1)]
    eval_ = [to_example(r, f"{hf_id} test row {i}") for i, r in enumerate(get_split(splits, ("test",), hf_id), 1)]
    return _task(train, eval_, num_train, num_eval, seed)


def load_gsm8k(*, path: str, hf_id: str, num_train: int, num_eval: int, seed: int) -> TaskData:
    if path:
        return load_gsm8k_files(path, num_train, num_eval, seed)
    if hf_id:
        return load_gsm8k_hub(hf_id, num_train, num_eval, seed)
    raise ValueError("task 'gsm8k' needs path= (a folder holding train.jsonl) or hf_id= (e.g. 'openai/gsm8k')")
