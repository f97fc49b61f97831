"""A Flower Grid whose nodes run fedlpp's ClientApp in this process: the apps' logic without Ray or sockets.

Each push runs the addressed node's ClientApp at once (as Flower would, with that node's
``node_config`` and its own ``context.state``, kept across messages) and keeps its reply
for the next pull. A node can be told to raise at training (an error reply, as Flower sends
when a ClientApp fails), to stay silent at training, or to vanish from a SecAgg step on.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping

from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedlpp.engine.flower import client_app
from fedlpp.engine.flower.messages import fields_of

CLIENT_APP_RAISED = 2  # Flower's error code for an exception in a ClientApp


class LoopbackGrid:
    def __init__(
        self,
        node_configs: Mapping[int, dict],
        raising: Iterable[int] = (),
        silent: Iterable[int] = (),
        vanish_at: Mapping[int, str | tuple[str, int]] | None = None,
        refused: Iterable[int] = (),
    ) -> None:
        self.node_configs = dict(node_configs)
        self.raising, self.silent = set(raising), set(silent)
        self.refused = set(refused)  # messages to these nodes are refused at push (no message id, as the SuperLink does)
        self.vanish_at = dict(vanish_at or {})  # node -> the SecAgg step (of any round, or (step, round)) from which it is gone
        self.states = {node: RecordDict() for node in node_configs}
        self.gone: set[int] = set()
        self.sent: list[Message] = []
        self._replies: dict[str, Message] = {}
        # Who "this process" is, as Flower's runtime sets it for a ServerApp before any Message is built.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1

    def get_node_ids(self) -> list[int]:
        return list(self.node_configs)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            if message.metadata.dst_node_id in self.refused:
                ids.append("")
                continue
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self.sent.append(message)
            reply = self._run(message)
            if reply is not None:
                self._replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def _run(self, message: Message) -> Message | None:
        node = message.metadata.dst_node_id
        if node in self.silent and message.metadata.message_type == "train":
            return None
        fields = fields_of(message) if "fedlpp" in message.content.config_records else {}
        step = fields.get("step")
        if node in self.gone or (step is not None and self.vanish_at.get(node) in (step, (step, fields.get("round")))):
            self.gone.add(node)
            return None
        context = Context(run_id=1, node_id=node, node_config=self.node_configs[node], state=self.states[node], run_config={})
        try:
            if node in self.raising and message.metadata.message_type == "train":
                raise RuntimeError(f"node {node} failed on purpose")
            return client_app.app(message, context)
        except Exception as e:  # noqa: BLE001 - what Flower turns a ClientApp's exception into
            return Message(Error(CLIENT_APP_RAISED, f"{type(e)}:<'{e}'>"), reply_to=message)


def simulated_nodes(num_clients: int) -> dict[int, dict]:
    """Node ids as Flower draws them (64-bit), in an order unlike the partitions' order."""
    return {2**63 + 7919 * (num_clients - k): {"partition-id": k, "num-partitions": num_clients} for k in range(num_clients)}
