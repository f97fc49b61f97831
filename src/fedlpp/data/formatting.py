"""Turning examples into token ids and padded batches.

Generation follows the causal-LM recipe of DESIGN §6: input = prompt tokens +
tokens of " {target}\\n" + EOS, with the loss on the completion only. Prompt
and completion are tokenised separately and concatenated, so the boundary
between them is exact and `encode_prompts` yields the very same prompt tokens
the model was trained on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from fedlpp.data.schema import Example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # torch.nn.CrossEntropyLoss's default ignore_index
PADDING_SIDES = ("left", "right")
CHUNK = 64  # examples per forward pass when a training step runs a large batch in length-sorted chunks


def eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The end-of-sequence id; BERT-style tokenizers have only [SEP], which plays that role."""
    for token_id in (tokenizer.eos_token_id, tokenizer.sep_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError(f"{type(tokenizer).__name__} has neither an eos nor a sep token")


def bos_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """[bos] if the tokenizer prepends BOS when adding special tokens, else [].

    Asked of the tokenizer rather than assumed: Llama adds BOS, SmolLM2/GPT-2 do not.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [int(bos)] if with_special[:1] == [bos] else []


def _tokenize(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]) -> tuple[list[list[int]], int]:
    """Prompt ids with BOS where the tokenizer wants it, and the BOS length (0 or 1)."""
    bos = bos_prefix(tokenizer)
    prompts = []
    for ids in _tokenize(tokenizer, [e.prompt for e in examples]):
        # A prompt whose text already starts with the BOS token keeps just that one.
        prompts.append(ids if bos and ids[:1] == bos else bos + ids)
    return prompts, len(bos)


def _fit_prompt(ids: list[int], max_length: int, head: int) -> list[int]:
    """The prompt if it leaves room for a completion token; else BOS + its last tokens."""
    if len(ids) < max_length:
        return ids
    keep = max_length - 1  # one position stays for the completion
    if ids[:head] and keep > head:
        return ids[:head] + ids[len(ids) - (keep - head) :]
    return ids[len(ids) - keep :]


def _check_max_length(max_length: int) -> None:
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (a prompt token and a completion token), got {max_length}")


def encode_prompts(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_length: int) -> list[list[int]]:
    """Prompt-only ids for generation at eval time (the prompt part of `encode_for_generation`)."""
    _check_max_length(max_length)
    prompts, head = _prompt_ids(tokenizer, examples)
    return [_fit_prompt(ids, max_length, head) for ids in prompts]


def encode_for_generation(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_length: int
) -> list[dict[str, list[int]]]:
    """input_ids = prompt + " {target}\\n" + EOS; labels = -100 on the prompt, the ids after.

    Over max_length the END of the completion is cut; a prompt that alone fills
    max_length keeps its last tokens so that one completion token remains.
    """
    _check_max_length(max_length)
    prompts, head = _prompt_ids(tokenizer, examples)
    eos = eos_id(tokenizer)
    completions = _tokenize(tokenizer, [f" {e.target}\n" for e in examples])
    features = []
    for prompt, completion in zip(prompts, completions, strict=True):
        prompt = _fit_prompt(prompt, max_length, head)
        completion = ([*completion, eos])[: max_length - len(prompt)]
        features.append({"input_ids": prompt + completion, "labels": [IGNORE_INDEX] * len(prompt) + completion})
    return features


def encode_for_classification(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_length: int
) -> list[dict[str, list[int] | int]]:
    """input_ids with the tokenizer's special tokens (e.g. [CLS] ... [SEP]), truncated; label."""
    missing = [i for i, e in enumerate(examples) if e.label is None]
    if missing:
        raise ValueError(f"classification examples need a label; examples {missing[:5]} have none")
    if not examples:
        return []
    texts = [e.prompt for e in examples]
    if any(e.pair for e in examples):  # sentence pairs (RTE): the tokenizer's own pair format, e.g. [CLS] a [SEP] b [SEP]
        encoded = tokenizer(texts, [e.pair for e in examples], truncation=True, max_length=max_length)
    else:
        encoded = tokenizer(texts, truncation=True, max_length=max_length)
    return [
        {"input_ids": list(ids), "label": int(e.label)}  # type: ignore[arg-type]
        for ids, e in zip(encoded["input_ids"], examples, strict=True)
    ]


def _pad(rows: Sequence[Sequence[int]], width: int, value: int, side: str) -> torch.Tensor:
    padded = [[value] * (width - len(r)) + list(r) if side == "left" else list(r) + [value] * (width - len(r)) for r in rows]
    return torch.tensor(padded, dtype=torch.long)


def collate(features: Sequence[dict[str, Any]], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a batch: input_ids with pad_id, labels with -100, attention_mask 1 on real tokens.

    Returns input_ids, attention_mask [B, T]; labels [B, T] for token labels or
    [B] for a scalar "label". Left padding is what batched generation needs.
    """
    if not features:
        raise ValueError("collate needs at least one feature")
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    ids = [f["input_ids"] for f in features]
    width = max(len(r) for r in ids)
    batch = {
        "input_ids": _pad(ids, width, pad_id, padding_side),
        "attention_mask": _pad([[1] * len(r) for r in ids], width, 0, padding_side),
    }
    if "labels" in features[0] and "label" in features[0]:
        raise ValueError("a feature has both token 'labels' and a class 'label'")
    if "labels" in features[0]:
        batch["labels"] = _pad([f["labels"] for f in features], width, IGNORE_INDEX, padding_side)
    elif "label" in features[0]:
        batch["labels"] = torch.tensor([int(f["label"]) for f in features], dtype=torch.long)
    return batch


def length_chunks(batch: Mapping[str, torch.Tensor], size: int = CHUNK) -> list[dict[str, torch.Tensor]]:
    """A right-padded batch as chunks of at most ``size`` examples, sorted by length, each cut to its own longest.

    Padding is most of a large batch's cost when lengths vary (SST-2: median 10 tokens, the
    longest 32+): chunks of similar length waste little. Per-example results do not depend
    on how a batch is chunked; a batch of at most ``size`` examples comes back whole.
    """
    mask = batch["attention_mask"]
    if len(mask) <= size:
        return [dict(batch)]
    lengths = mask.sum(1)
    if not bool((mask == (torch.arange(mask.shape[1]) < lengths[:, None])).all()):
        raise ValueError("length_chunks needs a right-padded batch (collate's padding_side='right')")
    chunks = []
    for rows in torch.argsort(lengths, stable=True).split(size):
        width = int(lengths[rows].max())
        chunks.append({k: v[rows, :width] if v.dim() == 2 else v[rows] for k, v in batch.items()})
    return chunks
