"""Tasks by name: each registered task (``fedlpp.registry.TASKS``) names a loader that returns a `TaskData`.

Loaders take keyword arguments only (path, hf_id, num_train, num_eval, seed);
see `load_task` for their meaning. New tasks join with `register_task` (in process) or
through the ``fedlpp.tasks`` entry point (``fedlpp/registry.py``).
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Protocol

from fedlpp import registry
from fedlpp.data.schema import Example, TaskData

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


class _Loaders(MutableMapping[str, TaskLoader]):
    """The registered tasks (``fedlpp.registry.TASKS``) as name -> loader; a loader's module is imported when asked for."""

    def __getitem__(self, name: str) -> TaskLoader:
        if name not in registry.TASKS:
            raise KeyError(name)
        return registry.TASKS.get(name).load()

    def __setitem__(self, name: str, fn: TaskLoader) -> None:
        """Register ``fn`` under ``name``, or swap the loader of a registered task (its summary and traits kept)."""
        if name in registry.TASKS:
            registry.TASKS.replace(name, fn)
        else:
            registry.TASKS.register(name, f"{name} (registered in this process)", fn)

    def __delitem__(self, name: str) -> None:
        registry.TASKS.unregister(name)

    def __contains__(self, name: object) -> bool:
        return name in registry.TASKS

    def __iter__(self) -> Iterator[str]:
        return iter(registry.TASKS.names())

    def __len__(self) -> int:
        return len(registry.TASKS.names())


TASKS = _Loaders()


def register_task(name: str, fn: TaskLoader, summary: str = "", **traits: bool) -> None:
    """Add a loader under `name`; a name is registered once (no silent override)."""
    if not name:
        raise ValueError("a task name must be non-empty")
    registry.TASKS.register(name, summary or f"{name} (registered in this process)", fn, **traits)


def get_task_loader(name: str) -> TaskLoader:
    """The loader for `name`; the error lists the registered tasks."""
    if name not in registry.TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {sorted(registry.TASKS.names())}")
    return TASKS[name]


def tasks_with(trait: str) -> tuple[str, ...]:
    """The registered tasks that have ``trait`` (``eval_file``: they read data.eval_path; ``test_split``)."""
    return tuple(e.name for e in registry.TASKS.entries() if e.traits.get(trait))


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
        eval_path: A separate evaluation file, for the tasks that read one (trait eval_file).
        split: The evaluation split: "dev" (what runs use) or "test" (its test file or hub
            split, for the tasks that have one with references: trait test_split).
    """
    if path and hf_id:
        raise ValueError(f"task {name!r}: give path or hf_id, not both (got {path!r}, {hf_id!r})")
    if min(num_train, num_eval, seed) < 0:
        raise ValueError(f"task {name!r}: num_train, num_eval and seed must be >= 0, got {num_train}, {num_eval}, {seed}")
    loader = get_task_loader(name)
    extra: dict[str, str] = {}
    if eval_path:
        if name not in tasks_with("eval_file"):
            raise ValueError(
                f"task {name!r} takes its evaluation split from its own files; eval_path is for {', '.join(tasks_with('eval_file'))}"
            )
        extra["eval_path"] = eval_path
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: valid splits are {', '.join(SPLITS)}")
    if split == "test":
        if name not in tasks_with("test_split"):
            raise ValueError(
                f"task {name!r} has no test split with references here (tasks with one: "
                f"{', '.join(tasks_with('test_split'))}; GLUE's test labels are not public; jsonl: use data.eval_path)"
            )
        extra["split"] = split
    return loader(path=path, hf_id=hf_id, num_train=num_train, num_eval=num_eval, seed=seed, **extra)


SPLITS = ("dev", "test")
