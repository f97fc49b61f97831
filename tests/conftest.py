"""Shared fixtures: tests never touch the network."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from fedlpp.models.machine import import_bitsandbytes

import_bitsandbytes()  # first, without the Hub: a test that uses peft or bitsandbytes directly must not try it either
