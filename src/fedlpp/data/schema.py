"""The plain records every task loader produces and every consumer reads."""

from __future__ import annotations

from dataclasses import dataclass

GENERATION = "generation"
CLASSIFICATION = "classification"
TASK_KINDS = (GENERATION, CLASSIFICATION)
DEFAULT_GENERATION_METRICS = ("bleu", "rouge_l")


@dataclass(frozen=True)
class Example:
    """One input/output pair.

    Attributes:
        prompt: Text the model conditions on (classification: the sentence).
        target: Completion text without the leading space, newline or EOS that
            `formatting` adds; "" for classification.
        label: Class id (classification only).
        group: Attribute the Dirichlet partitioner splits on (the label as a
            string for classification, an attribute value for generation).
        references: All references for this input; filled for generation eval
            examples (multi-reference BLEU), empty for training rows.
        pair: The second text of a sentence-pair classification (RTE's
            hypothesis); "" for single-text tasks.
        attributes: Named natural keys of the input (an E2E MR's attributes,
            DialogSum's topic, DART's source, a JSONL line's extra string fields):
            what ``data.key`` picks for a by-key or Dirichlet partition.
    """

    prompt: str
    target: str
    label: int | None = None
    group: str = ""
    references: tuple[str, ...] = ()
    pair: str = ""
    attributes: tuple[tuple[str, str], ...] = ()

    def attribute(self, key: str) -> str | None:
        """The value of a named attribute, None when the example has none of that name."""
        return next((v for k, v in self.attributes if k == key), None)


@dataclass(frozen=True)
class TaskData:
    """A task's train and eval examples.

    Generation eval holds ONE example per distinct input carrying all of its
    references, because the E2E scorer scores one output per MR. ``metrics`` names
    what generation is scored with (``evaluation.metrics``; empty: BLEU and ROUGE-L);
    ``multiline`` outputs span lines, so decoding stops only at EOS, not at the
    first newline.
    """

    name: str
    kind: str
    train: tuple[Example, ...]
    eval: tuple[Example, ...]
    num_labels: int = 0
    label_names: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    multiline: bool = False

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The task metrics besides the loss (classification: accuracy)."""
        if self.kind == CLASSIFICATION:
            return ("accuracy",)
        return self.metrics or DEFAULT_GENERATION_METRICS

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"TaskData.kind must be one of {TASK_KINDS}, got {self.kind!r}")
        if self.kind == CLASSIFICATION and self.num_labels < 2:
            raise ValueError(f"classification task {self.name!r} needs num_labels >= 2")
        if self.label_names and len(self.label_names) != self.num_labels:
            raise ValueError(f"task {self.name!r}: {len(self.label_names)} label_names for {self.num_labels} labels")
