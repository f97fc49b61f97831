"""Who takes part: wait for the expected nodes, ask each its client id and size, assign the free ids.

Round-1 sampling would otherwise race the nodes' registration (DESIGN 4); Flower's node ids
are 64-bit and say nothing about which client a node is, so each node is asked.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.serverapp import Grid

from fedlpp.algorithms.round import MAX_NUM_EXAMPLES
from fedlpp.engine.flower.messages import POLL_S, QUERY, content, exchange, fields_of, require

UNASSIGNED = -1  # a node without a client id: it gets one of the free ids


class FlowerRunError(RuntimeError):
    """The federation cannot run as configured (too few nodes, duplicate client ids, ...)."""


@dataclass(frozen=True)
class Roster:
    """Which node holds which client, and each client's number of examples (public counts)."""

    node_of: dict[int, int]  # client id -> Flower node id
    sizes: list[int]  # by client id
    verify_keys: dict[int, bytes] = field(default_factory=dict)  # client id -> SecAgg verify key (secagg.enabled)


def wait_for_nodes(grid: Grid, expected: int, timeout: float) -> list[int]:
    """The connected node ids once ``expected`` have registered; a clear error after ``timeout`` seconds.

    More nodes than expected is refused too: which ones to leave out would be arbitrary,
    and each node's size would still enter the public counts.
    """
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) > expected:
            raise FlowerRunError(
                f"{len(nodes)} nodes are connected but fl.num_clients={expected}: stop or unregister "
                "the extra nodes (flwr supernode list/unregister), or raise fl.num_clients"
            )
        if len(nodes) == expected:
            return nodes
        if time.monotonic() > deadline:
            raise FlowerRunError(
                f"only {len(nodes)} of the {expected} expected nodes (fl.num_clients) connected "
                f"within flower.connect_timeout={timeout:g} s"
            )
        time.sleep(POLL_S)


def query_nodes(
    grid: Grid, nodes: Sequence[int], config_text: str, timeout: float, secure: bool = False, kind: str = "", num_labels: int = 0
) -> Roster:
    """Ask every node who it is; nodes without a client id get the free ids in node-id order.

    With ``secure`` every node must also announce its SecAgg verify key. The query names the
    task's kind and number of labels, so that a warm node can build its model right after
    answering, before the first round.
    """
    asks = {
        n: Message(content(config=config_text, kind=kind, num_labels=num_labels), dst_node_id=n, message_type=QUERY, ttl=timeout)
        for n in nodes
    }
    answers: dict[int, tuple[int, int]] = {}
    keys: dict[int, bytes] = {}
    for node, reply in exchange(grid, asks, timeout).items():
        if reply.has_error():
            raise FlowerRunError(f"node {node} cannot take part: {reply.error.reason}")
        fields = fields_of(reply)
        answers[node] = (require(fields, "client_id", int), require(fields, "num_examples", int))
        if not 0 < answers[node][1] <= MAX_NUM_EXAMPLES:
            raise FlowerRunError(f"node {node} declares {answers[node][1]} examples; expected 1 to {MAX_NUM_EXAMPLES}")
        if secure:
            keys[node] = require(fields, "verify_key", bytes)
    missing = sorted(set(nodes) - set(answers))
    if missing:
        raise FlowerRunError(f"nodes {missing} did not answer within {timeout:g} s")
    roster = assign_clients(answers, len(nodes))
    return Roster(roster.node_of, roster.sizes, {c: keys[n] for c, n in roster.node_of.items() if n in keys})


def assign_clients(answers: Mapping[int, tuple[int, int]], num_clients: int) -> Roster:
    """Client ids from the nodes' answers {node: (client id or -1, examples)}; each id in [0, N) once."""
    node_of: dict[int, int] = {}
    for node, (client, _) in sorted(answers.items()):
        if client == UNASSIGNED:
            continue
        if not 0 <= client < num_clients or client in node_of:
            raise FlowerRunError(f"node {node} says it is client {client}: ids must be distinct and in [0, {num_clients})")
        node_of[client] = node
    free = iter(c for c in range(num_clients) if c not in node_of)
    for node, (client, _) in sorted(answers.items()):
        if client == UNASSIGNED:
            node_of[next(free)] = node
    sizes = [answers[node_of[c]][1] for c in range(num_clients)]
    return Roster(node_of, sizes)
