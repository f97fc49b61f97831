"""A node enforces the privacy it requires: a round that asks for less is refused by that node, named in the server's
failure record, and the run goes on without it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fedlpp import rundir
from fedlpp.config import load_config
from fedlpp.data.examples_file import write_examples
from fedlpp.engine.flower.node_policy import NodePolicy
from fedlpp.engine.flower.server_app import serve_on_grid
from fedlpp.engine.setup import client_partitions, load_task_data
from fedlpp.engine.transport import MessageError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))  # the in-process Flower grid the engine tests use
from flower_harness import LoopbackGrid

TINY = [
    "model.name=tiny-llama",
    "model.max_length=48",
    "data.num_train=120",
    "data.num_eval=3",
    "fl.num_clients=3",
    "fl.clients_per_round=3",
    "fl.local_steps=2",
    "train.batch_size=4",
    "eval.every=1",
    "eval.max_new_tokens=3",
    "fl.rounds=1",
    "seed=0",
    "flower.connect_timeout=2",
    "algorithm.name=ffa_lora",
    "privacy.mode=dp_sgd",
    "privacy.noise_multiplier=1.0",
    "privacy.secure_noise=true",
]


@pytest.mark.integration
def test_a_node_that_requires_more_noise_refuses_the_round_and_the_others_train(tmp_path):
    cfg = load_config(None, TINY)
    nodes = {}
    for k, part in enumerate(client_partitions(cfg, load_task_data(cfg))):
        write_examples(tmp_path / f"client-{k}.jsonl", part)
        nodes[10 + k] = {"data-path": str(tmp_path / f"client-{k}.jsonl"), "client-id": k}
    nodes[12]["min-noise-multiplier"] = 2.0
    serve_on_grid(LoopbackGrid(nodes), cfg, tmp_path / "run")
    (row,) = rundir.read_metrics(tmp_path / "run")
    assert list(row["failed"]) == ["2"]
    assert "below this node's minimum min-noise-multiplier=2" in row["failed"]["2"]
    assert "void" not in row  # clients 0 and 1 trained and were combined


@pytest.mark.parametrize(
    ("policy", "overrides", "message"),
    [
        ({"require-secagg": True}, [], "requires secure aggregation (require-secagg) and the round has none"),
        (
            {"min-noise-multiplier": 1.0},
            [],
            "requires DP noise it adds itself (min-noise-multiplier=1): the round asks for privacy.mode=none",
        ),
        (
            {"min-noise-multiplier": 1.0},
            ["privacy.mode=client_dp", "privacy.noise_multiplier=1", "fl.clients_per_round=3"],
            "privacy.mode=client_dp without secure aggregation",
        ),
        ({"max-clip-norm": 0.5}, ["privacy.mode=dp_sgd", "privacy.noise_multiplier=1"], "clip norm 1, above this node's maximum"),
    ],
)
def test_each_requirement_refuses_the_round_that_asks_for_less(policy, overrides, message):
    cfg = load_config(None, ["algorithm.name=ffa_lora", *overrides])
    with pytest.raises(MessageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        NodePolicy.of(policy).check(cfg, cfg.privacy.noise_multiplier)


def test_a_node_policy_that_asks_for_no_more_accepts_and_bad_values_are_named():
    cfg = load_config(None, ["algorithm.name=ffa_lora", "privacy.mode=dp_sgd", "privacy.noise_multiplier=2"])
    NodePolicy.of({"min-noise-multiplier": 1.5, "max-clip-norm": 1.0}).check(cfg, 2.0)
    with pytest.raises(MessageError, match="node config min-noise-multiplier: expected a non-negative number"):
        NodePolicy.of({"min-noise-multiplier": "lots"})


def test_deploy_supernode_writes_the_requirements_into_the_node_config(tmp_path):
    from fedlpp.engine.flower import deploy

    (tmp_path / "ca.crt").write_text("x")
    (tmp_path / "node").write_text("x")
    write_examples(tmp_path / "data.jsonl", load_task_data(load_config(None, ["data.num_train=4"])).train[:4])
    args = deploy.supernode_args(
        "127.0.0.1:1",
        tmp_path / "ca.crt",
        tmp_path / "node",
        tmp_path / "data.jsonl",
        0,
        "127.0.0.1",
        9,
        5.0,
        {"min-noise-multiplier": 1.5, "max-clip-norm": 0.0, "require-secagg": True},
    )
    node_config = args[args.index("--node-config") + 1]
    assert "min-noise-multiplier=1.5" in node_config and "require-secagg=true" in node_config
    assert "max-clip-norm" not in node_config  # 0: no requirement


def test_a_second_reply_to_one_message_is_refused_and_the_first_counts(caplog):
    from types import SimpleNamespace

    from fedlpp.engine.flower.messages import exchange

    sent = {7: SimpleNamespace(metadata=SimpleNamespace(message_id="m1"))}
    first, second = (SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id="m1"), n=n) for n in (1, 2))
    grid = SimpleNamespace(push_messages=lambda messages: ["m1"], pull_messages=lambda waiting: [first, second])
    replies = exchange(grid, sent, timeout=1.0)  # type: ignore[arg-type]
    assert replies == {7: first}
    assert "a second reply to message m1 (for 7) is refused" in caplog.text


def test_a_node_adding_a_client_level_noise_share_needs_the_round_to_have_the_clients_the_share_is_sized_for():
    dp = ["algorithm.name=fedavg_lora", "privacy.mode=client_dp", "privacy.noise_multiplier=1", "secagg.enabled=true"]
    every = ["fl.num_clients=10", "fl.clients_per_round=10", "secagg.clip_range=10", "secagg.min_survivors=1"]
    cfg = load_config(None, [*dp, *every])
    policy = NodePolicy.of({"min-noise-multiplier": 1.0})
    policy.check(cfg, 1.0, participants=10)
    with pytest.raises(MessageError, match="sized for fl.clients_per_round=10 clients but the round's registry lists 3"):
        policy.check(cfg, 1.0, participants=3)


@pytest.mark.parametrize("field", [[], ["secagg.modulus_bits=16"]])
def test_a_node_counts_only_the_noise_shares_a_sum_is_sure_to_hold(field):
    """At threshold 0.6 of 9 neighbours a sum may hold 7 of 10 shares (the server's top-up is not the node's noise):
    sigma 1 then carries 1 x sqrt(7/10) = 0.84; a node that requires 1 refuses, unless every share must count."""
    dp = ["algorithm.name=fedavg_lora", "privacy.mode=client_dp", "privacy.noise_multiplier=1", "secagg.enabled=true"]
    k = ["fl.num_clients=10", "fl.clients_per_round=10", "secagg.clip_range=10", *field]
    policy = NodePolicy.of({"min-noise-multiplier": 1.0})
    with pytest.raises(MessageError, match="as few as 7 of its 10 noise shares .* would then be 0.8367"):
        policy.check(load_config(None, [*dp, *k]), 1.0, participants=10)
    policy.check(load_config(None, [*dp, *k]), 1.2, participants=10)  # 1.2 x sqrt(0.7) = 1.004
    policy.check(load_config(None, [*dp, *k, "secagg.min_survivors=1"]), 1.0, participants=10)


@pytest.mark.integration
def test_a_node_with_its_own_epsilon_budget_trains_until_the_round_that_would_pass_it(tmp_path):
    from fedlpp.privacy.accounting import Accounting, add_steps, epsilon
    from fedlpp.privacy.dp_sgd import sampling_rate

    cfg = load_config(None, [*TINY, "fl.rounds=3", "eval.every=5"])
    nodes = {}
    parts = client_partitions(cfg, load_task_data(cfg))
    for k, part in enumerate(parts):
        write_examples(tmp_path / f"client-{k}.jsonl", part)
        nodes[10 + k] = {"data-path": str(tmp_path / f"client-{k}.jsonl"), "client-id": k}
    rate = sampling_rate(cfg.train.batch_size, len(parts[2]))
    one_round = add_steps([], 1.0, rate, cfg.fl.local_steps)
    two_rounds = add_steps(one_round, 1.0, rate, cfg.fl.local_steps)
    accounting = Accounting("rdp", "poisson", 1e-5)
    budget = (epsilon(one_round, accounting) + epsilon(two_rounds, accounting)) / 2  # room for one round, not two
    nodes[12]["max-epsilon"] = budget
    serve_on_grid(LoopbackGrid(nodes), cfg, tmp_path / "run")
    rows = rundir.read_metrics(tmp_path / "run")
    assert "failed" not in rows[0]  # every client takes part in every round here (3 of 3)
    for row in rows[1:]:
        assert list(row["failed"]) == ["2"] and f"above its max-epsilon={budget:g}" in row["failed"]["2"]
