"""fedlpp's messages inside Flower's: one ConfigRecord of plain values and bytes per message.

The broadcast and the update are the same ``algorithms/wire.py`` bytes the local engine
moves, carried as a bytes value (Flower splits large messages into chunks itself); the
experiment config travels as its TOML text so that a client builds exactly the server's
model and recipe.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

RECORD = "fedlpp"
QUERY = "query"  # the server asks a node who it is (client id, number of examples)
TRAIN = "train"  # a broadcast in, an update out

Value = int | float | str | bytes | bool


class MessageError(ValueError):
    """A message lacks a field or holds a value of the wrong type."""


def content(**fields: Value) -> RecordDict:
    return RecordDict({RECORD: ConfigRecord(dict(fields))})


def fields_of(message: Message) -> dict[str, Any]:
    """The fedlpp fields of a message (a MessageError when it carries none)."""
    records = message.content.config_records
    if RECORD not in records:
        raise MessageError(f"the message carries no {RECORD!r} record")
    return dict(records[RECORD])


def require(fields: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = fields.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind in (int, float, (int, float)):
        raise MessageError(f"field {name!r}: expected {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return value
