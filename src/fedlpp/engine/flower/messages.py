"""fedlpp's messages inside Flower's: a ConfigRecord of plain values and an ArrayRecord of byte strings.

``exchange`` sends a batch of messages and matches each reply to the message it answers.
The broadcast and the update are the same ``algorithms/wire.py`` bytes the local engine
moves, each carried unchanged as the data of one uint8 ``Array`` (Flower splits an Array
into 5 MiB content-addressed chunks; bytes inside a ConfigRecord would travel as one object
and cost ~17x more to build for a 30 MB adapter); byte strings under 4 KiB (SecAgg's keys
and shares) stay in the ConfigRecord. The experiment config travels as its TOML
text so that a client builds exactly the server's model and recipe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedlpp.engine.flower.polls import WaitedPoll
from fedlpp.engine.transport import MessageError, require

__all__ = ["QUERY", "TRAIN", "MessageError", "content", "exchange", "fields_of", "require"]

log = logging.getLogger(__name__)

RECORD = "fedlpp"  # the ConfigRecord of plain fields
BLOBS = "fedlpp.bytes"  # the ArrayRecord of byte-string fields
BYTES_STYPE = "fedlpp.bytes"  # an Array whose data is a byte string as it is (no numpy header)
SMALL_BYTES = 4096  # shorter byte strings ride in the ConfigRecord
REPLY_POLL = WaitedPoll(0.02, 0.5)  # look for replies every twentieth of the time waited so far, 0.02 s to 0.5 s: each
# look is a request to the SuperLink, which a fixed short poll would keep busy through a long round (Grid.send_and_receive
# looks every 3 s)
POLL_S = 0.2  # how often to look for nodes at start-up
QUERY = "query"  # the server asks a node who it is (client id, number of examples)
TRAIN = "train"  # a broadcast in, an update out

Value = int | float | str | bytes | bool


def content(**fields: Value) -> RecordDict:
    """A message's content: byte strings of SMALL_BYTES or more as Arrays of an ArrayRecord, the rest in a ConfigRecord.

    Every record, Array and chunk is one more object each hop fetches with a request of its
    own: a key advertisement or a share list (bytes to a few KiB) is cheaper inline.
    """
    blobs = {
        name: Array(dtype="uint8", shape=(len(v),), stype=BYTES_STYPE, data=bytes(v))
        for name, v in fields.items()
        if isinstance(v, bytes) and len(v) >= SMALL_BYTES
    }
    plain: dict[str, Any] = {name: v for name, v in fields.items() if name not in blobs}
    records: dict[str, Any] = {RECORD: ConfigRecord(plain)}
    if blobs:
        records[BLOBS] = ArrayRecord(blobs)
    return RecordDict(records)


def fields_of(message: Message) -> dict[str, Any]:
    """The fedlpp fields of a message (a MessageError when it carries none, or an Array that is not a byte string)."""
    configs = message.content.config_records
    if RECORD not in configs:
        raise MessageError(f"the message carries no {RECORD!r} record")
    fields = dict(configs[RECORD])
    for name, array in message.content.array_records.get(BLOBS, {}).items():
        if name in fields:
            raise MessageError(f"field {name!r} is in both records")
        if array.stype != BYTES_STYPE or array.dtype != "uint8":
            raise MessageError(f"field {name!r}: expected a byte string, got an Array of {array.dtype} ({array.stype})")
        fields[name] = array.data
    return fields


def exchange(grid: Grid, messages: Mapping[int, Message], timeout: float) -> dict[int, Message]:
    """Send ``{key: message}``; the replies that came within ``timeout`` seconds, by the same keys.

    Replies are matched by the message they answer: the error reply for a node that died
    comes from the SuperLink, not from the node. The first reply to a message counts; another
    one is refused and logged (it must not replace what was already received).
    """
    pushed = list(grid.push_messages(messages.values()))
    key_of = {m.metadata.message_id: key for key, m in messages.items()}
    waiting, replies = {i for i in pushed if i}, {}  # a message the SuperLink refused has no id: no reply to wait for
    start = time.monotonic()  # from the moment every message is out
    while waiting:
        for reply in grid.pull_messages(waiting):
            answered = reply.metadata.reply_to_message_id
            if answered not in key_of or key_of[answered] in replies:
                log.warning("a second reply to message %s (for %s) is refused; the first counts", answered, key_of.get(answered))
                continue
            waiting.discard(answered)
            replies[key_of[answered]] = reply
        waited = time.monotonic() - start
        if not waiting or waited >= timeout:
            break
        time.sleep(REPLY_POLL.after(waited))
    return replies
