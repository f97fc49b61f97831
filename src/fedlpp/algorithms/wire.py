"""Messages on the wire: plain bytes in a versioned safetensors envelope.

Every broadcast and every update is serialised here, and its ``len`` is what the byte
counters report (DESIGN 1, promise 4). safetensors is a documented, language-neutral
format, so the local engine and the Flower runtime can carry the same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

FORMAT = "fedlpp"
VERSION = "1"
# Bounds on what is decoded from a peer before any of it is trusted: a message's JSON header,
# its metadata text, and how deeply that metadata may nest (a broadcast's quant spec is one level).
MAX_HEADER_BYTES = 1 << 20
MAX_META_CHARS = 1 << 14
MAX_META_DEPTH = 2


class WireError(ValueError):
    """A message could not be decoded (wrong format, version or kind)."""


def encode(kind: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, object]) -> bytes:
    """Serialise tensors plus JSON-able metadata into one message of the given kind."""
    header = {"format": FORMAT, "version": VERSION, "kind": kind, "meta": json.dumps(meta, sort_keys=True)}
    return st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=header)


def decode(data: bytes, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Parse a message, checking its format, version and kind."""
    try:
        header = _header(data)  # bounded before anything else is parsed
        tensors = st_load(bytes(data))
    except Exception as e:  # noqa: BLE001 - untrusted bytes: whatever the parser raises means "not a message"
        raise WireError(f"not a fedlpp message: {e}") from None
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise WireError(f"unsupported message format {header.get('format')!r} version {header.get('version')!r}")
    if header.get("kind") != kind:
        raise WireError(f"expected a {kind!r} message, got {header.get('kind')!r}")
    return tensors, _metadata(header.get("meta", ""))


def _metadata(text: str) -> dict[str, object]:
    """The message's metadata: a JSON object of bounded size and depth, or a WireError."""
    if len(text) > MAX_META_CHARS:
        raise WireError(f"message metadata is {len(text)} characters, more than {MAX_META_CHARS}")
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nesting beyond what the parser can follow
        meta = None
    if not isinstance(meta, dict):
        raise WireError("message metadata is missing or not a JSON object")
    if _depth(meta) > MAX_META_DEPTH:
        raise WireError(f"message metadata nests deeper than {MAX_META_DEPTH} levels")
    return meta


def _depth(value: object) -> int:
    """How deeply ``value`` nests, counted without recursion and without looking past MAX_META_DEPTH + 1."""
    depth, level = 0, [value]
    while depth <= MAX_META_DEPTH:
        containers = [c for c in level if isinstance(c, (dict, list))]
        if not containers:
            break
        depth += 1
        level = [v for c in containers for v in (c.values() if isinstance(c, dict) else c)]
    return depth


def _header(data: bytes) -> dict[str, str]:
    # safetensors layout: 8-byte little-endian header length, then the JSON header.
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or n > len(data) - 8:
        raise ValueError("truncated header")
    if n > MAX_HEADER_BYTES:
        raise ValueError(f"header of {n} bytes, more than {MAX_HEADER_BYTES}")
    header = json.loads(bytes(data[8 : 8 + n]))
    return dict(header.get("__metadata__", {}))
