"""Task loaders (generated, local files, Hugging Face hub), prompt formats and partitioners."""

from fedlpp.data.formatting import (
    IGNORE_INDEX,
    collate,
    encode_for_classification,
    encode_for_generation,
    encode_prompts,
    length_chunks,
)
from fedlpp.data.partition import (
    partition,
    partition_dirichlet,
    partition_iid,
    partition_quantity_skew,
)
from fedlpp.data.tasks import TASKS, Example, TaskData, get_task_loader, load_task, register_task
from fedlpp.registry import PARTITIONERS

__all__ = [
    "IGNORE_INDEX",
    "PARTITIONERS",
    "TASKS",
    "Example",
    "TaskData",
    "collate",
    "encode_for_classification",
    "encode_for_generation",
    "encode_prompts",
    "get_task_loader",
    "length_chunks",
    "load_task",
    "partition",
    "partition_dirichlet",
    "partition_iid",
    "partition_quantity_skew",
    "register_task",
]
