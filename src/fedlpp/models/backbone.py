"""Load a frozen backbone and its tokenizer by short name, Hugging Face id or local path."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedlpp.models import shipped
from fedlpp.models.pooling import declared_pooling, use_mean_pooling

log = logging.getLogger(__name__)

KINDS = ("generation", "classification")
TINY_SEED = 1234  # tiny backbones are random but fixed, so a saved adapter always meets the same base


@dataclass
class Backbone:
    """A frozen base model, its tokenizer, and where it came from (for the saved adapter)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str  # short name, hub id or local path
    default_targets: tuple[str, ...]  # LoRA target modules for this family


def _ensure_pad(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token
    return tokenizer


def _tiny_llama(kind: str, num_labels: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    _require_kind("tiny-llama", kind, "generation")
    tokenizer = AutoTokenizer.from_pretrained(str(shipped.smollm2_tokenizer_dir()))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=0.1,  # wide enough that an adapter can move the logits (tests check learning)
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(config)
    return model, tokenizer


def _tiny_bert(kind: str, num_labels: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    _require_kind("tiny-bert", kind, "classification")
    tokenizer = AutoTokenizer.from_pretrained(str(shipped.minilm_dir()))
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        num_labels=num_labels,
    )
    with torch.random.fork_rng():
        torch.manual_seed(TINY_SEED)
        model = BertForSequenceClassification(config)
    return model, tokenizer


def _require_kind(name: str, kind: str, supported: str) -> None:
    if kind != supported:
        raise ValueError(f"model {name!r} is for {supported} tasks, but the task is {kind}")


def _pretrained(path: str, kind: str, num_labels: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if kind == "generation":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        # The classification head is new; its initial values come from the caller's seed.
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=torch.float32)
    return model, tokenizer


SHORT_NAMES: dict[str, Callable[[str, int], tuple[PreTrainedModel, PreTrainedTokenizerBase]]] = {
    "smollm2-135m": lambda kind, n: _pretrained(str(shipped.smollm2_dir()), kind, n),
    "minilm-l6": lambda kind, n: _pretrained(str(shipped.minilm_dir()), kind, n),
    "tiny-llama": _tiny_llama,
    "tiny-bert": _tiny_bert,
}

CHECKPOINT_DIRS: dict[str, Callable[[], Path]] = {"minilm-l6": shipped.minilm_dir}  # short names that may declare a pooling


def _resolved_pooling(name: str, pooling: str) -> str:
    if pooling != "auto":
        return pooling
    if name in CHECKPOINT_DIRS:
        return declared_pooling(CHECKPOINT_DIRS[name]())
    return "cls" if name in SHORT_NAMES else declared_pooling(name)


_TARGETS = {"llama": ("q_proj", "v_proj"), "bert": ("query", "value")}


def default_lora_targets(model: PreTrainedModel) -> tuple[str, ...]:
    family = getattr(model.config, "model_type", "")
    if family in _TARGETS:
        return _TARGETS[family]
    # Other families: the usual attention projection names, whichever the model has.
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    for candidates in (("q_proj", "v_proj"), ("query", "value"), ("c_attn",), ("qkv_proj",)):
        if set(candidates) <= names:
            return candidates
    raise ValueError(f"no default LoRA targets for model type {family!r}: set lora.target_modules")


def load_backbone(name: str, kind: str, num_labels: int = 0, pooling: str = "auto") -> Backbone:
    """A frozen float32 backbone in eval mode, by short name, hub id or local path.

    ``pooling`` (classifiers): "cls" keeps the model's own pooler, "mean" averages the token
    states, "auto" does what the checkpoint declares (``models.pooling``).
    """
    if kind not in KINDS:
        raise ValueError(f"task kind {kind!r}: valid kinds are {', '.join(KINDS)}")
    if name in SHORT_NAMES:
        model, tokenizer = SHORT_NAMES[name](kind, num_labels)
    else:
        if not Path(name).exists() and "/" not in name:
            raise ValueError(
                f"model.name={name!r} is neither a short name ({', '.join(SHORT_NAMES)}), "
                "a local path, nor a Hugging Face id (owner/name)"
            )
        model, tokenizer = _pretrained(name, kind, num_labels)
    if kind == "classification" and _resolved_pooling(name, pooling) == "mean":
        use_mean_pooling(model)
    model.requires_grad_(False)
    model.eval()
    _ensure_pad(tokenizer)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return Backbone(model, tokenizer, name, default_lora_targets(model))
