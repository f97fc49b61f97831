"""fedlpp's messages inside Flower's: one ConfigRecord of plain values and bytes per message.

``exchange`` sends a batch of messages and matches each reply to the message it answers.
The broadcast and the update are the same ``algorithms/wire.py`` bytes the local engine
moves, carried as a bytes value (Flower splits large messages into chunks itself); the
experiment config travels as its TOML text so that a client builds exactly the server's
model and recipe.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

RECORD = "fedlpp"
POLL_S = 0.2  # how often to look for replies (Grid.send_and_receive waits 3 s between looks)
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


def require(fields: Mapping[str, Any], name: str, kind: type) -> Any:
    """The field's value, which must be of ``kind`` (a bool is not an int here)."""
    value = fields.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise MessageError(f"field {name!r}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def exchange(grid: Grid, messages: Mapping[int, Message], timeout: float) -> dict[int, Message]:
    """Send ``{key: message}``; the replies that came within ``timeout`` seconds, by the same keys.

    Replies are matched by the message they answer: the error reply for a node that died
    comes from the SuperLink, not from the node.
    """
    pushed = list(grid.push_messages(messages.values()))
    key_of = {m.metadata.message_id: key for key, m in messages.items()}
    waiting, replies = {i for i in pushed if i}, {}  # a message the SuperLink refused has no id: no reply to wait for
    deadline = time.monotonic() + timeout  # from the moment every message is out
    while waiting:
        for reply in grid.pull_messages(waiting):
            waiting.discard(reply.metadata.reply_to_message_id)
            replies[key_of[reply.metadata.reply_to_message_id]] = reply
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(POLL_S)
    return replies
