"""How a round's messages travel between the server and its clients — and nothing else.

A transport carries the broadcast to the round's clients and their replies back
(``train``), and, when an aggregation step needs more exchanges after training (SecAgg's
protocol), one further message per client (``ask``). It knows no algorithm, privacy or
secure aggregation: what the messages hold is the business of the steps composed at setup
(``engine/aggregation.py`` on the server, the client recipe on the clients). Three
transports: the local engine's in-process calls (``engine/local.py``), Flower's simulation
and a deployment (``engine/flower/server_app.py``).

A reply is a dict of plain fields (ints, floats, strings, byte strings), the same whether
it crossed a network or not; a client that fails, times out or answers with an error is in
``failed`` with the reason, and the round goes on with the others.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fedlpp.progress import Bar

Fields = dict[str, Any]  # a message's content: plain values and byte strings


class MessageError(ValueError):
    """A message lacks a field or holds a value of the wrong type."""


def require(fields: Mapping[str, Any], name: str, kind: type) -> Any:
    """The field's value, which must be of ``kind`` (a bool is not an int here)."""
    value = fields.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise MessageError(f"field {name!r}: expected {kind.__name__}, got {type(value).__name__}")
    return value


@dataclass
class Replies:
    """What came back from the clients a transport addressed."""

    answers: dict[int, Fields] = field(default_factory=dict)  # client -> the fields of its reply
    failed: dict[int, str] = field(default_factory=dict)  # client -> why no usable reply came

    def refuse(self, client: int, reason: str) -> None:
        """A reply a step cannot use: the client counts as failed."""
        self.answers.pop(client, None)
        self.failed[client] = reason


class Transport(Protocol):
    """Moves a round's messages; every engine has one."""

    def train(self, payload: bytes, clients: Sequence[int], round_: int, fields: Mapping[str, Any], bar: Bar | None) -> Replies:
        """The broadcast ``payload`` and ``fields`` to each client; their training replies (upload, loss, peak memory)."""
        ...

    def ask(self, action: str, round_: int, messages: Mapping[int, Fields]) -> Replies:
        """One more message to each client, after training (``action`` names the step that answers it)."""
        ...
