"""Token encodings (loss on the completion only) and batch collation."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from fedlpp.data import (
    IGNORE_INDEX,
    Example,
    collate,
    encode_for_classification,
    encode_for_generation,
    encode_prompts,
)
from fedlpp.data.formatting import bos_prefix, eos_id, length_chunks

EXAMPLES = (
    Example(
        prompt="Describe the restaurant.\nData: name[Café Rouge], priceRange[£20-25]\nText:",
        target="Café Rouge is a pub with prices of £20-25.",
    ),
    Example(
        prompt="Write the weather report.\nData: city[Oslo], sky[cloudy], temp[12]\nText:",
        target="Oslo will be cloudy, with a high of 12 degrees.",
    ),
)


def _prompt_len(feature: dict[str, list[int]]) -> int:
    return sum(1 for label in feature["labels"] if label == IGNORE_INDEX)


def test_labels_mask_exactly_the_prompt(causal_tokenizer: PreTrainedTokenizerBase) -> None:
    features = encode_for_generation(causal_tokenizer, EXAMPLES, max_length=256)
    prompts = encode_prompts(causal_tokenizer, EXAMPLES, max_length=256)
    for feature, prompt, example in zip(features, prompts, EXAMPLES, strict=True):
        n = len(prompt)
        assert feature["input_ids"][:n] == prompt
        assert feature["labels"][:n] == [IGNORE_INDEX] * n
        assert feature["labels"][n:] == feature["input_ids"][n:]
        assert IGNORE_INDEX not in feature["labels"][n:]
        expected = causal_tokenizer(f" {example.target}\n", add_special_tokens=False)["input_ids"]
        assert feature["input_ids"][n:] == [*expected, eos_id(causal_tokenizer)]


def test_completion_decodes_to_space_target_newline_eos(
    causal_tokenizer: PreTrainedTokenizerBase,
) -> None:
    assert causal_tokenizer.eos_token == "<|im_end|>"
    for feature, example in zip(encode_for_generation(causal_tokenizer, EXAMPLES, 256), EXAMPLES, strict=True):
        completion = feature["input_ids"][_prompt_len(feature) :]
        assert causal_tokenizer.decode(completion) == f" {example.target}\n{causal_tokenizer.eos_token}"
        prompt = feature["input_ids"][: _prompt_len(feature)]
        assert causal_tokenizer.decode(prompt, skip_special_tokens=True) == example.prompt


def test_bos_is_added_once_only_when_the_tokenizer_adds_it(
    causal_tokenizer: PreTrainedTokenizerBase,
) -> None:
    plain = causal_tokenizer(EXAMPLES[0].prompt, add_special_tokens=False)["input_ids"]
    # SmolLM2 (and BERT, which has no BOS) do not prepend one: the prompt is the plain ids.
    assert encode_prompts(causal_tokenizer, EXAMPLES[:1], 256)[0] == plain
    # A tokenizer that has a BOS token but does not add it (GPT-2 style) gets none either.
    assert encode_prompts(_BosTokenizer(causal_tokenizer, adds_bos=False), EXAMPLES[:1], 256)[0] == plain  # type: ignore[arg-type]
    # One that does prepend BOS (as Llama's does) gets exactly one.
    with_bos = _BosTokenizer(causal_tokenizer, adds_bos=True)
    assert encode_prompts(with_bos, EXAMPLES[:1], 256)[0] == [with_bos.bos_token_id, *plain]  # type: ignore[arg-type]
    features = encode_for_generation(with_bos, EXAMPLES[:1], 256)  # type: ignore[arg-type]
    assert features[0]["input_ids"][:2] == [with_bos.bos_token_id, plain[0]]
    assert features[0]["input_ids"][-1] == with_bos.eos_token_id


class _BosTokenizer:
    """Wraps a tokenizer; with adds_bos, add_special_tokens=True prepends a BOS id."""

    bos_token_id = 7
    eos_token_id = 8
    sep_token_id = None

    def __init__(self, inner: PreTrainedTokenizerBase, adds_bos: bool) -> None:
        self.inner = inner
        self.adds_bos = adds_bos

    def __call__(self, texts: str | list[str], add_special_tokens: bool = True) -> dict[str, list]:
        ids = self.inner(texts, add_special_tokens=False)["input_ids"]
        if add_special_tokens and self.adds_bos:
            ids = [self.bos_token_id, *ids] if isinstance(texts, str) else [[self.bos_token_id, *i] for i in ids]
        return {"input_ids": ids}


def test_truncation_cuts_the_end_of_the_completion(
    causal_tokenizer: PreTrainedTokenizerBase,
) -> None:
    full = encode_for_generation(causal_tokenizer, EXAMPLES, 256)
    prompt_lens = [_prompt_len(f) for f in full]
    max_length = max(prompt_lens) + 3
    cut = encode_for_generation(causal_tokenizer, EXAMPLES, max_length)
    for short, long, n in zip(cut, full, prompt_lens, strict=True):
        assert len(short["input_ids"]) == max_length
        assert short["input_ids"] == long["input_ids"][:max_length]
        assert _prompt_len(short) == n


def test_overlong_prompt_keeps_its_last_tokens_and_one_completion_token(
    causal_tokenizer: PreTrainedTokenizerBase,
) -> None:
    full = encode_for_generation(causal_tokenizer, EXAMPLES[:1], 256)[0]
    n = _prompt_len(full)
    max_length = n // 2
    cut = encode_for_generation(causal_tokenizer, EXAMPLES[:1], max_length)[0]
    assert len(cut["input_ids"]) == max_length
    assert _prompt_len(cut) == max_length - 1
    head = len(bos_prefix(causal_tokenizer))
    assert cut["input_ids"][head : max_length - 1] == full["input_ids"][n - (max_length - 1 - head) : n]
    assert cut["labels"][-1] == full["input_ids"][n]
    prompt = encode_prompts(causal_tokenizer, EXAMPLES[:1], max_length)[0]
    assert prompt == cut["input_ids"][:-1]
    with pytest.raises(ValueError, match="max_length must be >= 2"):
        encode_for_generation(causal_tokenizer, EXAMPLES, 1)


def test_classification_keeps_special_tokens_and_truncates(
    bert_tokenizer: PreTrainedTokenizerBase,
) -> None:
    examples = [
        Example(prompt="a gripping , funny film", target="", label=1, group="1"),
        Example(prompt="dull " * 50, target="", label=0, group="0"),
    ]
    features = encode_for_classification(bert_tokenizer, examples, max_length=16)
    assert [f["label"] for f in features] == [1, 0]
    first = features[0]["input_ids"]
    assert isinstance(first, list)
    assert first[0] == bert_tokenizer.cls_token_id and first[-1] == bert_tokenizer.sep_token_id
    assert bert_tokenizer.decode(first[1:-1]) == "a gripping, funny film"
    second = features[1]["input_ids"]
    assert isinstance(second, list)
    assert len(second) == 16 and second[-1] == bert_tokenizer.sep_token_id
    with pytest.raises(ValueError, match="need a label"):
        encode_for_classification(bert_tokenizer, [Example(prompt="x", target="")], 16)


def test_collate_right_padding() -> None:
    features = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [9], "labels": [9]}]
    batch = collate(features, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [9, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_left_padding_for_generation() -> None:
    batch = collate([{"input_ids": [1, 2]}, {"input_ids": [3, 4, 5, 6]}], pad_id=99, padding_side="left")
    assert batch["input_ids"].tolist() == [[99, 99, 1, 2], [3, 4, 5, 6]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert "labels" not in batch


def test_collate_scalar_label_becomes_labels_vector() -> None:
    batch = collate([{"input_ids": [101, 7, 102], "label": 1}, {"input_ids": [101, 102], "label": 0}], pad_id=0)
    assert batch["labels"].tolist() == [1, 0]
    assert batch["labels"].shape == (2,)
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_collate_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="padding_side"):
        collate([{"input_ids": [1]}], pad_id=0, padding_side="middle")
    with pytest.raises(ValueError, match="at least one"):
        collate([], pad_id=0)


def test_encoded_generation_batch_round_trip(causal_tokenizer: PreTrainedTokenizerBase) -> None:
    features = encode_for_generation(causal_tokenizer, EXAMPLES, 256)
    batch = collate(features, pad_id=eos_id(causal_tokenizer))
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    assert lengths == [len(f["input_ids"]) for f in features]
    assert (batch["labels"] != IGNORE_INDEX).sum().item() == sum(len(f["input_ids"]) - _prompt_len(f) for f in features)


def test_length_chunks_sort_by_length_and_cut_each_chunk_to_its_longest():
    rows = [{"input_ids": list(range(1, n + 1)), "label": n % 2} for n in (5, 1, 9, 3, 7, 2, 8)]
    batch = collate(rows, pad_id=0)
    chunks = length_chunks(batch, 3)
    assert [c["attention_mask"].sum(1).tolist() for c in chunks] == [[1, 2, 3], [5, 7, 8], [9]]
    assert [c["input_ids"].shape[1] for c in chunks] == [3, 8, 9]  # no column of padding only
    assert sorted(c["labels"].tolist() for c in chunks) == sorted([[1, 0, 1], [1, 1, 0], [1]])
    assert length_chunks(batch, 7)[0]["input_ids"].shape == (7, 9)  # small enough: whole
    with pytest.raises(ValueError, match="right-padded"):
        length_chunks(collate(rows, pad_id=0, padding_side="left"), 3)
