"""The task registry: a name maps to a loader that returns a `TaskData`.

Loaders take keyword arguments only (path, hf_id, num_train, num_eval, seed);
see `load_task` for their meaning. New tasks join with `register_task`.
"""

from __future__ import annotations

from typing import Protocol

from fedlpp.data.dart import load_dart
from fedlpp.data.dialogsum import load_dialogsum
from fedlpp.data.e2e import load_e2e
from fedlpp.data.gsm8k import load_gsm8k
from fedlpp.data.jsonl import load_jsonl
from fedlpp.data.rte import load_rte
from fedlpp.data.schema import Example, TaskData
from fedlpp.data.sst2 import load_sst2
from fedlpp.data.weather import load_weather

__all__ = [
    "TASKS",
    "Example",
    "TaskData",
    "TaskLoader",
    "get_task_loader",
    "load_task",
    "register_task",
]


class TaskLoader(Protocol):
    """Builds a task from local files (`path`), the hub (`hf_id`) or nothing."""

    def __call__(self, *, path: str, hf_id: str, num_train: int, num_eval: int, seed: int) -> TaskData: ...


TASKS: dict[str, TaskLoader] = {}


def register_task(name: str, fn: TaskLoader) -> None:
    """Add a loader under `name`; a name is registered once (no silent override)."""
    if not name:
        raise ValueError("a task name must be non-empty")
    if name in TASKS:
        raise ValueError(f"task {name!r} is already registered")
    TASKS[name] = fn


def get_task_loader(name: str) -> TaskLoader:
    """The loader for `name`; the error lists the registered tasks."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; valid tasks: {sorted(TASKS)}") from None


def load_task(
    name: str,
    *,
    path: str = "",
    hf_id: str = "",
    num_train: int = 0,
    num_eval: int = 0,
    seed: int = 0,
    eval_path: str = "",
    split: str = "dev",
) -> TaskData:
    """Load task `name`.

    Args:
        name: A registered task ("weather", "e2e", "sst2", ...).
        path: Folder holding the task's files (file-based tasks).
        hf_id: Hugging Face hub id, optionally "repo:config" (needs `datasets`).
        num_train: Train examples; 0 = all (or the task's default). Otherwise a
            seeded random subset, kept in file order.
        num_eval: Eval examples (distinct inputs for generation); 0 = all/default.
        seed: Drives every random choice; the same seed gives the same data.
        eval_path: A separate evaluation file, for the tasks that read one (EVAL_FILE_TASKS).
        split: The evaluation split: "dev" (what runs use) or "test" (its test file or hub
            split, for the tasks that have one with references: TEST_SPLIT_TASKS).
    """
    if path and hf_id:
        raise ValueError(f"task {name!r}: give path or hf_id, not both (got {path!r}, {hf_id!r})")
    if min(num_train, num_eval, seed) < 0:
        raise ValueError(f"task {name!r}: num_train, num_eval and seed must be >= 0, got {num_train}, {num_eval}, {seed}")
    loader = get_task_loader(name)
    extra: dict[str, str] = {}
    if eval_path:
        if name not in EVAL_FILE_TASKS:
            raise ValueError(
                f"task {name!r} takes its evaluation split from its own files; eval_path is for {', '.join(EVAL_FILE_TASKS)}"
            )
        extra["eval_path"] = eval_path
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: valid splits are {', '.join(SPLITS)}")
    if split == "test":
        if name not in TEST_SPLIT_TASKS:
            raise ValueError(
                f"task {name!r} has no test split with references here (tasks with one: "
                f"{', '.join(TEST_SPLIT_TASKS)}; GLUE's test labels are not public; jsonl: use data.eval_path)"
            )
        extra["split"] = split
    return loader(path=path, hf_id=hf_id, num_train=num_train, num_eval=num_eval, seed=seed, **extra)


register_task("weather", load_weather)
register_task("e2e", load_e2e)
register_task("sst2", load_sst2)
register_task("rte", load_rte)
register_task("dart", load_dart)
register_task("dialogsum", load_dialogsum)
register_task("gsm8k", load_gsm8k)
register_task("jsonl", load_jsonl)
EVAL_FILE_TASKS = ("jsonl",)  # loaders that also take eval_path=
TEST_SPLIT_TASKS = ("e2e", "dart", "dialogsum", "gsm8k")  # loaders that also take split="test"
SPLITS = ("dev", "test")
