"""What the ServerApp sends, shown before it goes: a Grid wrapper, and an audit folder for model owners.

``RecordingGrid`` passes every outgoing message to a callback (tests record them);
``AuditLog`` writes each one into a folder as sent (``fedlpp deploy run --audit DIR``), so a
model owner can check that no message carries full-precision adapter weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from fedlpp.engine.flower.messages import fields_of


class RecordingGrid:
    """A Grid that shows every message the ServerApp sends to ``on_message`` first (tests record them)."""

    def __init__(self, grid: Grid, on_message: Callable[[Message], None]) -> None:
        self._grid = grid
        self._on_message = on_message

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        for message in messages:
            self._on_message(message)
        return self._grid.push_messages(messages)


class AuditLog:
    """Writes every message the ServerApp sends into a folder, as sent: what a model owner can audit.

    Names start with ``prefix`` (the Flower run id) and a counter, so a resumed run adds to
    the folder and never overwrites; each file is written whole, then renamed into place.
    """

    def __init__(self, directory: Path, prefix: str = "run") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.prefix, self.count = directory, prefix, 0

    def __call__(self, message: Message) -> None:
        self.count += 1
        stem = f"{self.prefix}-{self.count:06d}-{message.metadata.message_type}-node{message.metadata.dst_node_id}"
        plain = {}
        for name, value in fields_of(message).items():
            if isinstance(value, bytes):
                self._write(f"{stem}.{name}.bin", value)
            else:
                plain[name] = value
        self._write(f"{stem}.json", json.dumps(plain).encode())

    def _write(self, name: str, data: bytes) -> None:
        target = self.directory / name
        if target.exists():
            raise FileExistsError(f"{target} exists: the audit folder already holds this run's messages")
        tmp = target.with_name(f".{name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
