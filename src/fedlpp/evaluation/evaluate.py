"""Score one adapter on the held-out split: loss always, then accuracy or BLEU/ROUGE-L."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedlpp.data.formatting import collate
from fedlpp.data.schema import DEFAULT_GENERATION_METRICS
from fedlpp.evaluation.metrics import GENERATION_METRICS, accuracy
from fedlpp.models.lora import set_adapter
from fedlpp.models.machine import CPU, Machine, model_device
from fedlpp.models.objective import example_losses, forward_logits, losses_from_logits


@dataclass(frozen=True)
class EvalSet:
    """A held-out split, tokenised once."""

    kind: str  # generation | classification
    features: tuple[dict, ...]  # training-format features (loss; labels for classification)
    prompts: tuple[list[int], ...] = ()  # generation: prompt ids
    references: tuple[tuple[str, ...], ...] = ()  # generation: all references per prompt
    metrics: tuple[str, ...] = DEFAULT_GENERATION_METRICS  # generation: what the outputs are scored with
    multiline: bool = False  # generation: outputs span lines (stop at EOS only, not at the first newline)

    def __post_init__(self) -> None:
        unknown = [m for m in self.metrics if m not in GENERATION_METRICS]
        if self.kind == "generation" and unknown:
            raise ValueError(f"unknown generation metric {unknown[0]!r}; known: {', '.join(GENERATION_METRICS)}")


@dataclass(frozen=True)
class Decoding:
    batch_size: int
    max_new_tokens: int
    num_beams: int = 1  # 1: greedy
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    @classmethod
    def of(cls, eval_cfg: Any) -> Decoding:
        """The decoding an ``EvalConfig`` asks for."""
        return cls(
            eval_cfg.batch_size,
            eval_cfg.max_new_tokens,
            eval_cfg.num_beams,
            eval_cfg.length_penalty,
            eval_cfg.no_repeat_ngram_size,
        )

    def generate_kwargs(self) -> dict[str, Any]:
        """What ``model.generate`` takes for it (batched, KV cache on, each sequence stopped at its own end)."""
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": False, "num_beams": self.num_beams}
        if self.num_beams > 1:
            kwargs.update(length_penalty=self.length_penalty, early_stopping=True)
        if self.no_repeat_ngram_size:
            kwargs["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        return kwargs


OnBatch = Callable[[int], None]  # called with the number of examples a batch held


def evaluation_work(evalset: EvalSet) -> int:
    """Examples ``evaluate_adapter`` reports through ``on_batch``: the loss pass, then generation if any."""
    return len(evalset.features) + len(evalset.prompts)


def evaluation_unit(evalset: EvalSet) -> str:
    """What a bar of ``evaluation_work`` counts, for its label: each record once per pass."""
    records = len(evalset.features)
    return f"{records} records: loss, then generation" if evalset.prompts else f"{records} records"


def _batches(items: Sequence, size: int) -> list[Sequence]:
    return [items[i : i + size] for i in range(0, len(items), size)]


@torch.no_grad()
def mean_loss(
    model: nn.Module, evalset: EvalSet, pad_id: int, batch_size: int, on_batch: OnBatch | None = None, machine: Machine = CPU
) -> tuple[float, list[int]]:
    """Mean per-example loss, and for classifiers the predicted labels."""
    total, count, predictions = 0.0, 0, []
    for chunk in _batches(evalset.features, batch_size):
        batch = collate(chunk, pad_id)
        with machine.autocast():
            if evalset.kind == "classification":
                logits, labels = forward_logits(model, batch, evalset.kind)
                losses = losses_from_logits(logits, labels, evalset.kind)
                predictions += logits.argmax(-1).tolist()
            else:
                losses = example_losses(model, batch, evalset.kind)
        total += float(losses.sum())
        count += len(chunk)
        if on_batch is not None:
            on_batch(len(chunk))
    return total / max(count, 1), predictions


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, multiline: bool = False) -> list[int]:
    """EOS, plus the newline token unless outputs span lines: one-line outputs are cut at the first line (DESIGN 6)."""
    ids = [tokenizer.eos_token_id]
    newline = tokenizer.encode("\n", add_special_tokens=False)
    if len(newline) == 1 and not multiline:
        ids.append(newline[0])
    return [i for i in ids if i is not None]


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[int]],
    decoding: Decoding,
    on_batch: OnBatch | None = None,
    multiline: bool = False,
    machine: Machine = CPU,
) -> list[str]:
    """Batched greedy decoding; returns each continuation stripped (its first line unless ``multiline``)."""
    outputs: list[str] = []
    stops = stop_token_ids(tokenizer, multiline)
    device = model_device(model)
    for chunk in _batches(prompts, decoding.batch_size):
        batch = collate([{"input_ids": p} for p in chunk], tokenizer.pad_token_id, padding_side="left")
        with machine.autocast():
            generated = model.generate(  # type: ignore[operator]  # a peft / transformers model
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id,
                **decoding.generate_kwargs(),
            )
        new_tokens = generated[:, batch["input_ids"].shape[1] :]
        for row in tokenizer.batch_decode(new_tokens, skip_special_tokens=True):
            outputs.append(row.strip() if multiline else row.strip().split("\n", 1)[0].strip())
        if on_batch is not None:
            on_batch(len(chunk))
    return outputs


@dataclass(frozen=True)
class Scored:
    metrics: dict[str, float]
    outputs: list[str]  # generation: the decoded texts; classification: the predicted class ids as text


def score_adapter(
    model: nn.Module,
    adapter: Mapping[str, torch.Tensor],
    evalset: EvalSet,
    tokenizer: PreTrainedTokenizerBase,
    decoding: Decoding,
    on_batch: OnBatch | None = None,
    machine: Machine = CPU,
) -> Scored:
    """Metrics of backbone + ``adapter`` on ``evalset`` and what it produced; ``on_batch(n)`` after each
    batch of n examples (``evaluation_work`` of them in all: the loss pass, then generation). ``machine``:
    the model's precision (its forward passes run under its autocast)."""
    set_adapter(model, adapter)
    model.eval()
    loss, predictions = mean_loss(model, evalset, tokenizer.pad_token_id, decoding.batch_size, on_batch, machine)
    if evalset.kind == "classification":
        labels = [int(f["label"]) for f in evalset.features]
        return Scored({"loss": loss, "accuracy": accuracy(predictions, labels)}, [str(p) for p in predictions])
    hypotheses = generate(model, tokenizer, evalset.prompts, decoding, on_batch, evalset.multiline, machine)
    metrics = {m: GENERATION_METRICS[m](hypotheses, evalset.references) for m in evalset.metrics}
    return Scored({"loss": loss, **metrics}, hypotheses)


def evaluate_adapter(
    model: nn.Module,
    adapter: Mapping[str, torch.Tensor],
    evalset: EvalSet,
    tokenizer: PreTrainedTokenizerBase,
    decoding: Decoding,
    on_batch: OnBatch | None = None,
    machine: Machine = CPU,
) -> dict[str, float]:
    """The metrics of ``score_adapter``."""
    return score_adapter(model, adapter, evalset, tokenizer, decoding, on_batch, machine).metrics
