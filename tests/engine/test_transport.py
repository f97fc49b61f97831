"""The transport moves messages and the aggregation decides what a reply is worth: refusals fail one client, not the round."""

from __future__ import annotations

import logging

import torch

from fedlpp import registry
from fedlpp.algorithms import round as rnd
from fedlpp.algorithms.spec import get_algorithm
from fedlpp.data.tasks import TASKS
from fedlpp.engine.aggregation import PlainAggregation
from fedlpp.engine.local import LocalClient, LocalTransport, PlainUpload
from fedlpp.engine.transport import Replies
from fedlpp.quant import QuantSpec

ADAPTER = {"m.lora_A.weight": torch.zeros(2, 4), "m.lora_B.weight": torch.zeros(4, 2)}


def test_a_local_client_that_refuses_a_step_fails_alone_as_a_node_would(caplog):
    clients = [LocalClient(None, None, PlainUpload()) for _ in range(2)]  # type: ignore[arg-type]
    transport = LocalTransport(None, clients)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING):
        replies = transport.ask("secagg", 3, {0: {"step": "unmask"}, 1: {"step": "unmask"}})
    assert replies.answers == {}
    assert replies.failed == dict.fromkeys((0, 1), "error reply: this client has no step after training")
    assert "round 3: client 1 failed" in caplog.text


def test_the_plain_pipeline_refuses_a_reply_without_an_update_and_combines_the_others(caplog):
    spec = get_algorithm("fedavg_lora", QuantSpec(bits=2))
    pipeline = PlainAggregation(spec, lambda round_: rnd.WeightedMean({0: 10, 1: 10}))
    delta = {n: torch.ones_like(t) for n, t in ADAPTER.items()}
    replies = Replies({0: {"upload": rnd.make_update(delta, 10, 1)}, 1: {"loss": 0.5}})
    with caplog.at_level(logging.WARNING):
        proposal = pipeline.combine(ADAPTER, replies, 1, transport=None)  # type: ignore[arg-type]
    assert replies.failed == {1: "field 'upload': expected bytes, got NoneType"} and list(replies.answers) == [0]
    assert all(torch.equal(proposal.adapter[n], ADAPTER[n] + 1) for n in ADAPTER)  # client 0's delta alone
    assert proposal.row == {"bytes_up": len(replies.answers[0]["upload"])}
    assert "round 1: client 1 failed" in caplog.text


def test_swapping_a_tasks_loader_keeps_its_traits_and_place(monkeypatch):
    names = registry.TASKS.names()
    monkeypatch.setitem(TASKS, "e2e", lambda **kwargs: None)
    assert registry.TASKS.names() == names
    assert registry.TASKS.get("e2e").traits["test_split"] and "e2e" in TASKS and "nope" not in TASKS
