"""The Flower apps: the same run as the local engine, failures per client, model privacy on the wire.

The apps run here over ``LoopbackGrid`` (their logic, in process); Flower's simulation
runtime (Ray) and a real deployment run the same apps in tests/engine/test_flower_runtime.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flower_harness import LoopbackGrid, simulated_nodes
from flwr.app import ConfigRecord, Message

from fedlpp import rundir
from fedlpp.algorithms import round as rnd
from fedlpp.algorithms import wire
from fedlpp.config import ConfigError, load_config
from fedlpp.data.examples_file import ExamplesFileError, read_examples, write_examples
from fedlpp.engine.flower.messages import BLOBS, RECORD, SMALL_BYTES, content, fields_of
from fedlpp.engine.flower.roster import FlowerRunError, assign_clients
from fedlpp.engine.flower.server_app import check_deployable_privacy, serve_on_grid
from fedlpp.engine.local import run_experiment
from fedlpp.engine.setup import build_run, client_partitions, load_task_data, round_clients

pytestmark = pytest.mark.integration

TINY = [
    "model.name=tiny-llama",
    "model.max_length=48",
    "data.num_train=120",
    "data.num_eval=3",
    "fl.num_clients=4",
    "fl.clients_per_round=2",
    "fl.local_steps=3",
    "train.batch_size=4",
    "train.lr=0.02",
    "eval.every=1",
    "eval.max_new_tokens=3",
    "seed=0",
    "flower.connect_timeout=2",
]
EQUIVALENT = ("fedavg_lora", "fedlpp", "fedlpp_ffa")


def tiny(*extra: str, rounds: int = 2):
    return load_config(None, [*TINY, f"fl.rounds={rounds}", *extra])


def adapter(directory) -> dict[str, torch.Tensor]:
    return rundir.load_checkpoint(directory)[0]


def theta_needles(theta: dict[str, torch.Tensor]) -> list[bytes]:
    """The float32 bytes of 4 consecutive values from every non-zero tensor, at its start and its middle."""
    needles = []
    for t in theta.values():
        flat = t.reshape(-1)
        if torch.count_nonzero(flat) and flat.numel() >= 8:
            needles += [flat[:4].numpy().tobytes(), flat[flat.numel() // 2 :][:4].numpy().tobytes()]
    assert needles, "theta has values to look for"
    return needles


def run_build_initial(cfg) -> dict[str, torch.Tensor]:
    return build_run(cfg).server.initial_adapter()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Each algorithm run by the local engine and by the Flower apps, same seed."""
    out = {}
    for name in EQUIVALENT:
        local, flower = tmp_path_factory.mktemp(f"{name}-local"), tmp_path_factory.mktemp(f"{name}-flower")
        run_experiment(tiny(f"algorithm.name={name}"), local, progress=False)
        grid = LoopbackGrid(simulated_nodes(4))
        serve_on_grid(grid, tiny(f"algorithm.name={name}"), flower)
        out[name] = (local, flower, grid)
    return out


@pytest.mark.parametrize("name", EQUIVALENT)
def test_the_flower_apps_end_with_the_local_engines_adapter(pairs, name):
    local, flower, _ = pairs[name]
    a, b = adapter(local), adapter(flower)
    assert any(torch.count_nonzero(a[n]) for n in a if ".lora_B." in n), "the run trained something"
    assert set(a) == set(b) and all(torch.allclose(a[n], b[n], atol=1e-5, rtol=0) for n in a)
    rows_a, rows_b = rundir.read_metrics(local), rundir.read_metrics(flower)
    for key in ("round", "clients", "bytes_down", "bytes_up"):
        assert [r[key] for r in rows_a] == [r[key] for r in rows_b], key
    assert [r["global"]["loss"] for r in rows_a] == pytest.approx([r["global"]["loss"] for r in rows_b], abs=1e-4)


@pytest.mark.parametrize("name", EQUIVALENT)
def test_the_run_directory_contract_is_the_same(pairs, name):
    local, flower, _ = pairs[name]
    assert sorted(p.name for p in local.iterdir()) == sorted(p.name for p in flower.iterdir())
    summary = json.loads((flower / rundir.SUMMARY).read_text())
    assert summary["rounds"] == 2 and summary["algorithm"] == name
    assert set(summary) == set(json.loads((local / rundir.SUMMARY).read_text()))
    assert load_config(flower / rundir.CONFIG) == tiny(f"algorithm.name={name}")


@pytest.mark.parametrize("name", ["fedlpp", "fedlpp_ffa"])
def test_no_message_the_server_app_sends_holds_a_full_precision_adapter_tensor(pairs, name, tmp_path):
    _, _, grid = pairs[name]
    run_experiment(tiny(f"algorithm.name={name}", rounds=1), tmp_path / "r1", progress=False)
    needles = theta_needles(adapter(tmp_path / "r1"))  # theta_1 (round 2's) and theta_0 (round 1's, built alike)
    needles += theta_needles(run_build_initial(tiny(f"algorithm.name={name}")))
    broadcasts = 0
    for message in grid.sent:
        fields = fields_of(message)
        raw = b"".join(v if isinstance(v, bytes) else str(v).encode() for v in fields.values())
        assert not any(needle in raw for needle in needles), "theta's float32 values are in a message"
        if "payload" in fields:
            tensors, _ = wire.decode(fields["payload"], rnd.BROADCAST)
            assert {k: t.dtype for k, t in tensors.items()} == {"codes": torch.uint8, "scales": torch.float16}
            broadcasts += 1
    assert broadcasts == 2 * 2  # two rounds, two clients each


def test_broadcasts_travel_as_arrays_flower_chunks_holding_the_wire_bytes_unchanged(pairs):
    big, small = bytes(range(256)) * 64, b"key"  # 16 KiB: an Array; 3 bytes: inline
    message = Message(content(payload=big, verify_key=small, round=3), dst_node_id=1, message_type="train")
    array = message.content.array_records[BLOBS]["payload"]
    assert (array.dtype, array.shape, array.data) == ("uint8", (len(big),), big), "the bytes as they are, no header"
    assert dict(message.content.config_records[RECORD]) == {"verify_key": small, "round": 3}
    assert fields_of(message) == {"payload": big, "verify_key": small, "round": 3}
    _, _, grid = pairs["fedlpp"]
    for sent in (m for m in grid.sent if m.metadata.message_type == "train"):  # what the ServerApp sent, decoded back
        payload = fields_of(sent)["payload"]
        assert ("payload" in sent.content.array_records.get(BLOBS, {})) == (len(payload) >= SMALL_BYTES)
        assert set(wire.decode(payload, rnd.BROADCAST)[0]) == {"codes", "scales"}


def test_a_client_that_fails_or_stays_silent_is_listed_and_the_round_goes_on(tmp_path):
    nodes = simulated_nodes(4)
    node_of = {cfg["partition-id"]: node for node, cfg in nodes.items()}
    cfg = tiny("algorithm.name=fedavg_lora", "fl.clients_per_round=4", "flower.round_timeout=1", rounds=1)
    grid = LoopbackGrid(nodes, raising=[node_of[1]], silent=[node_of[3]])
    serve_on_grid(grid, cfg, tmp_path / "run")
    row = rundir.read_metrics(tmp_path / "run")[0]
    assert set(row["failed"]) == {"1", "3"}
    assert "failed on purpose" in row["failed"]["1"] and "no reply within" in row["failed"]["3"]
    # The round used the two others: the adapter moved, as their mean.
    trained = adapter(tmp_path / "run")
    assert any(torch.count_nonzero(trained[n]) for n in trained if ".lora_B." in n)


def test_a_fedlpp_round_left_with_one_update_keeps_the_adapter(tmp_path):
    nodes = simulated_nodes(4)
    node_of = {cfg["partition-id"]: node for node, cfg in nodes.items()}
    cfg = tiny("algorithm.name=fedlpp", rounds=1)
    sampled = round_clients(cfg, 1)
    serve_on_grid(LoopbackGrid(nodes, raising=[node_of[sampled[0]]]), cfg, tmp_path / "run")
    row = rundir.read_metrics(tmp_path / "run")[0]
    assert list(row["failed"]) == [str(sampled[0])] and "rejected" not in row  # the other one's update was valid
    final = adapter(tmp_path / "run")
    assert all(torch.count_nonzero(final[n]) == 0 for n in final if ".lora_B." in n)


def test_a_message_the_superlink_refuses_is_not_waited_for(monkeypatch):
    from flwr.app import Message

    from fedlpp.engine.flower import messages

    nodes = simulated_nodes(2)
    grid = LoopbackGrid(nodes, refused=list(nodes))
    monkeypatch.setattr(messages.time, "sleep", lambda s: pytest.fail("exchange waited for a message that was never queued"))
    asks = {n: Message(messages.content(config=""), dst_node_id=n, message_type="query") for n in nodes}
    assert messages.exchange(grid, asks, timeout=3600) == {}


def test_more_nodes_than_clients_is_refused(tmp_path):
    with pytest.raises(FlowerRunError, match="5 nodes are connected but fl.num_clients=4"):
        serve_on_grid(LoopbackGrid(simulated_nodes(5)), tiny(), tmp_path / "r")


def test_a_deployed_node_refuses_dp_whose_noise_the_server_could_know(tmp_path):
    cfg = tiny("privacy.mode=dp_sgd", "privacy.noise_multiplier=1.0", "algorithm.name=ffa_lora", rounds=1)
    nodes = {}
    for k, part in enumerate(client_partitions(cfg, load_task_data(cfg))):
        write_examples(tmp_path / f"client-{k}.jsonl", part)
        nodes[10 + k] = {"data-path": str(tmp_path / f"client-{k}.jsonl"), "client-id": k}
    with pytest.raises(FlowerRunError, match="cannot take part.*privacy.secure_noise"):
        serve_on_grid(LoopbackGrid(nodes), cfg, tmp_path / "run")  # at start-up, before any round
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_too_few_nodes_is_a_clear_error_naming_how_many_connected(tmp_path):
    with pytest.raises(FlowerRunError, match="only 3 of the 4 expected nodes"):
        serve_on_grid(
            LoopbackGrid(dict(list(simulated_nodes(4).items())[:3])), tiny("flower.connect_timeout=0.5"), tmp_path / "r"
        )
    assert not (tmp_path / "r").exists()


def test_a_node_without_data_cannot_take_part(tmp_path):
    nodes = simulated_nodes(4)
    nodes[next(iter(nodes))] = {}
    with pytest.raises(FlowerRunError, match="data-path"):
        serve_on_grid(LoopbackGrid(nodes), tiny(), tmp_path / "r")


def test_nodes_reading_their_own_files_give_the_simulated_run(pairs, tmp_path):
    """A deployment's nodes: each its own JSONL file (two name their client id, two are given one)."""
    cfg = tiny("algorithm.name=fedlpp")
    parts = client_partitions(cfg, load_task_data(cfg))
    nodes = {}
    for k, part in enumerate(parts):
        write_examples(tmp_path / f"client-{k}.jsonl", part)
        nodes[1000 + k] = {"data-path": str(tmp_path / f"client-{k}.jsonl"), **({"client-id": k} if k >= 2 else {})}
    serve_on_grid(LoopbackGrid(nodes), cfg, tmp_path / "run")
    a, b = adapter(pairs["fedlpp"][0]), adapter(tmp_path / "run")
    assert all(torch.allclose(a[n], b[n], atol=1e-5, rtol=0) for n in a)


def test_resume_on_the_flower_apps_continues_the_run(pairs, tmp_path):
    out = tmp_path / "run"
    serve_on_grid(LoopbackGrid(simulated_nodes(4)), tiny("algorithm.name=fedlpp", rounds=1), out)
    serve_on_grid(LoopbackGrid(simulated_nodes(4)), tiny("algorithm.name=fedlpp"), out, resume=True)
    a, b = adapter(pairs["fedlpp"][0]), adapter(out)
    assert all(torch.allclose(a[n], b[n], atol=1e-5, rtol=0) for n in a)
    assert [r["round"] for r in rundir.read_metrics(out)] == [1, 2]


SECURE = ("secagg.enabled=true", "fl.clients_per_round=3", "flower.round_timeout=1")


@pytest.mark.parametrize("name", ["fedavg_lora", "fedlpp", "rolora"])
def test_secure_aggregation_over_flower_messages_equals_the_local_engines_secure_run(tmp_path, name):
    cfg = tiny(f"algorithm.name={name}", *SECURE)
    run_experiment(cfg, tmp_path / "local", progress=False)
    grid = LoopbackGrid(simulated_nodes(4))
    serve_on_grid(grid, cfg, tmp_path / "flower")
    a, b = adapter(tmp_path / "local"), adapter(tmp_path / "flower")
    assert any(torch.count_nonzero(a[n]) for n in a if ".lora_B." in n)
    assert all(torch.allclose(a[n], b[n], atol=1e-5, rtol=0) for n in a)
    rows = rundir.read_metrics(tmp_path / "flower")
    assert [sorted(r["secagg_survivors"]) for r in rows] == [r["clients"] for r in rows]
    assert not any("upload" in fields_of(m) for m in grid.sent)
    steps = {fields_of(m).get("step") for m in grid.sent}
    assert steps == {None, "share_keys", "masked_input", "sign_survivors", "unmask"}
    assert all(not grid.states[n].config_records.get("fedlpp.secagg.session") for n in grid.states), "sessions are forgotten"
    assert all(m.metadata.ttl == 1 for m in grid.sent), "no message outlives the round it belongs to"
    replay_refused(grid)


def replay_refused(grid: LoopbackGrid) -> None:
    """A node refuses the same broadcast again, as its own round or relabelled as a later one."""
    from flwr.app import Context, Message

    from fedlpp.engine.flower import client_app
    from fedlpp.engine.flower.messages import MessageError, content

    old = next(m for m in grid.sent if m.metadata.message_type == "train" and fields_of(m)["round"] == 1)
    node = old.metadata.dst_node_id
    for round_, reason in ((1, "already took part"), (5, "says round 5 but its broadcast is for round 1")):
        fields = {**fields_of(old), "round": round_}
        again = Message(content(**fields), dst_node_id=node, message_type="train")
        again.metadata.__dict__["_message_id"] = "replayed"
        with pytest.raises(MessageError, match=reason):
            client_app.app(again, Context(1, node, grid.node_configs[node], grid.states[node], {}))


@pytest.mark.parametrize("step", ["share_keys", "masked_input"])
def test_a_node_that_vanishes_before_its_masked_input_is_recovered_exactly(tmp_path, step):
    """Its masks come off with the others' shares: the sum is exactly the survivors' (= a round it simply missed)."""
    nodes = simulated_nodes(4)
    node_of = {cfg["partition-id"]: node for node, cfg in nodes.items()}
    plain = ("algorithm.name=fedavg_lora", "fl.clients_per_round=4", "flower.round_timeout=1")
    cfg = tiny(*plain, "secagg.enabled=true", rounds=1)  # 4 clients: each one's shares have 3 holders, 2 needed
    clients, victim = [0, 1, 2, 3], 1
    serve_on_grid(LoopbackGrid(nodes, vanish_at={node_of[victim]: step}), cfg, tmp_path / "secure")
    serve_on_grid(LoopbackGrid(nodes, raising=[node_of[victim]]), tiny(*plain, rounds=1), tmp_path / "plain")
    row = rundir.read_metrics(tmp_path / "secure")[0]
    assert sorted(row["secagg_survivors"]) == sorted(set(clients) - {victim})
    assert f"secagg {step}" in row["failed"][str(victim)]
    a, b = adapter(tmp_path / "plain"), adapter(tmp_path / "secure")
    assert any(torch.count_nonzero(a[n]) for n in a if ".lora_B." in n)
    assert all(torch.allclose(a[n], b[n], atol=1e-5, rtol=0) for n in a)


@pytest.mark.parametrize("step", ["sign_survivors", "unmask"])
def test_a_node_that_vanishes_after_its_masked_input_still_counts_in_the_sum(tmp_path, step):
    """Its input arrived: the others' shares of its self mask unmask it, and the sum is the full round's."""
    nodes = simulated_nodes(4)
    node_of = {cfg["partition-id"]: node for node, cfg in nodes.items()}
    cfg = tiny("algorithm.name=fedavg_lora", "fl.clients_per_round=4", "flower.round_timeout=1", "secagg.enabled=true", rounds=1)
    serve_on_grid(LoopbackGrid(nodes, vanish_at={node_of[2]: step}), cfg, tmp_path / "secure")
    serve_on_grid(LoopbackGrid(nodes), tiny("algorithm.name=fedavg_lora", "fl.clients_per_round=4", rounds=1), tmp_path / "plain")
    row = rundir.read_metrics(tmp_path / "secure")[0]
    assert sorted(row["secagg_survivors"]) == [0, 1, 2, 3] and f"secagg {step}" in row["failed"]["2"]
    a, b = adapter(tmp_path / "plain"), adapter(tmp_path / "secure")
    assert all(torch.allclose(a[n], b[n], atol=1e-5, rtol=0) for n in a)


def test_a_node_refuses_a_second_secure_session_for_a_round_it_joined():
    """Two sums over different clients for one round would reveal an input by subtraction."""
    from flwr.app import RecordDict

    from fedlpp.engine.flower import secure
    from fedlpp.engine.flower.messages import MessageError
    from fedlpp.engine.setup import secure_encoding

    cfg = tiny(*SECURE)
    state, encoding = RecordDict(), secure_encoding(cfg, [10, 10, 10, 10])
    registry = secure.registry_text({0: secure.verify_key(state)})
    fields = {"registry": registry, "round": 3}
    assert "message" in secure.start_session(state, cfg, encoding, fields, 0, np.zeros(5))
    state[secure.JOINED] = ConfigRecord({"round": 3})  # as after its masked input
    with pytest.raises(MessageError, match="already took part"):
        secure.start_session(state, cfg, encoding, fields, 0, np.zeros(5))


def test_a_node_keeps_its_secure_input_with_its_dtype_between_steps():
    """A small field's input is field elements (uint16 up to 16 bits): stored and restored as they are, never read
    back as float64; a stored dtype the node does not know is refused by name."""
    from flwr.app import RecordDict

    from fedlpp.engine.flower import secure
    from fedlpp.engine.flower.messages import MessageError
    from fedlpp.engine.setup import secure_encoding

    cfg = tiny(*SECURE, "secagg.modulus_bits=16")
    state, encoding = RecordDict(), secure_encoding(cfg, [10, 10, 10, 10])
    fields = {"registry": secure.registry_text({0: secure.verify_key(state)}), "round": 3}
    elements = np.array([65535, 1, 7], dtype=np.uint16)
    secure.start_session(state, cfg, encoding, fields, 0, elements)
    record = state.config_records[secure.SESSION]
    restored = np.frombuffer(record["input"], dtype=secure._stored_dtype(record["input_dtype"]))
    assert restored.dtype == np.uint16 and restored.tolist() == [65535, 1, 7]
    for name in ("<f4", "not a dtype"):
        with pytest.raises(MessageError, match="stored SecAgg input has dtype"):
            secure._stored_dtype(name)


def test_below_the_threshold_a_secure_round_aborts_loudly_and_keeps_the_adapter(tmp_path):
    nodes = simulated_nodes(4)
    grid = LoopbackGrid(nodes, vanish_at=dict.fromkeys(list(nodes)[:2], "masked_input"))
    serve_on_grid(grid, tiny("algorithm.name=fedavg_lora", *SECURE, rounds=1), tmp_path / "run")
    row = rundir.read_metrics(tmp_path / "run")[0]
    assert "secagg_abort" in row and row["secagg_survivors"] == []
    final = adapter(tmp_path / "run")
    assert all(torch.count_nonzero(final[n]) == 0 for n in final if ".lora_B." in n), "the void round kept B at zero"


def test_client_ids_are_distinct_and_unassigned_nodes_get_the_free_ones():
    roster = assign_clients({50: (-1, 7), 10: (2, 5), 30: (-1, 9), 20: (0, 4)}, 4)
    assert roster.node_of == {2: 10, 0: 20, 1: 30, 3: 50} and roster.sizes == [4, 9, 5, 7]
    with pytest.raises(FlowerRunError, match="distinct"):
        assign_clients({1: (0, 3), 2: (0, 3)}, 2)
    with pytest.raises(FlowerRunError, match=r"in \[0, 2\)"):
        assign_clients({1: (5, 3), 2: (-1, 3)}, 2)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"input": "a", "output": "b"}\n{"input": ', "line 2: not valid JSON"),
        ('["a", "b"]\n', "line 1: expected a JSON object"),
        ('{"output": "b"}\n', 'line 1: expected {"input", "output"}'),
        ('{"input": "a"}\n', "line 1: 'output' must be a non-empty string"),
        ('{"text": "a", "label": "x"}\n', "line 1: 'label' must be the example's class id"),
        ("\n\n", "holds no examples"),
    ],
)
def test_a_malformed_data_file_is_refused_naming_file_and_line(tmp_path, text, message):
    path = tmp_path / "mine.jsonl"
    path.write_text(text)
    with pytest.raises(ExamplesFileError, match=message) as info:
        read_examples(path)
    assert str(path) in str(info.value)
    with pytest.raises(ExamplesFileError, match="no such data file"):
        read_examples(tmp_path / "absent.jsonl")


@pytest.mark.parametrize(
    "privacy",
    [
        ("privacy.mode=dp_sgd", "privacy.noise_multiplier=1.0", "algorithm.name=ffa_lora"),
        ("privacy.mode=client_dp", "privacy.noise_multiplier=1.0", "privacy.clip_norm=0.5", "algorithm.name=fedavg_lora"),
    ],
)
def test_dp_runs_on_the_flower_apps_as_on_the_local_engine(tmp_path, privacy):
    """The same noise (seeded research mode), the same ledger: epsilon rows and the adapter agree."""
    cfg = tiny(*privacy)
    run_experiment(cfg, tmp_path / "local", progress=False)
    serve_on_grid(LoopbackGrid(simulated_nodes(4)), cfg, tmp_path / "flower")
    rows_a, rows_b = rundir.read_metrics(tmp_path / "local"), rundir.read_metrics(tmp_path / "flower")
    assert [r["epsilon"] for r in rows_a] == [r["epsilon"] for r in rows_b] and rows_b[-1]["epsilon"] > 0
    assert [r.get("epsilon_per_client") for r in rows_a] == [r.get("epsilon_per_client") for r in rows_b]
    a, b = adapter(tmp_path / "local"), adapter(tmp_path / "flower")
    assert all(torch.allclose(a[n], b[n], atol=1e-5, rtol=0) for n in a)
    summary = json.loads((tmp_path / "flower" / rundir.SUMMARY).read_text())
    assert summary["privacy"]["epsilon"] == rows_a[-1]["epsilon"]


def test_the_deployed_server_app_reads_its_run_config_and_extends_a_resumed_run(pairs, tmp_path):
    from flwr.app import Context, RecordDict

    from fedlpp.config import write_toml
    from fedlpp.engine.flower import server_app

    write_toml(tiny("algorithm.name=fedlpp", rounds=1), tmp_path / "e.toml")
    out, audit = tmp_path / "run", tmp_path / "audit"

    runs = iter(range(1, 100))  # Flower gives every run its own id

    def deployed(**run_config):
        settings = {
            "config": str(tmp_path / "e.toml"),
            "out": str(out),
            "resume": False,
            "overrides": "",
            "audit": str(audit),
            **run_config,
        }
        server_app.main(LoopbackGrid(simulated_nodes(4)), Context(next(runs), 0, {}, RecordDict(), settings))

    deployed()
    deployed(resume=True, overrides="fl.rounds=2")
    a, b = adapter(pairs["fedlpp"][0]), adapter(out)
    assert all(torch.allclose(a[n], b[n], atol=1e-5, rtol=0) for n in a)
    assert len(list(audit.glob("*.payload.bin"))) == 4 and len(list(audit.glob("*-query-*.json"))) == 8  # both runs kept
    with pytest.raises(ConfigError, match="algorithm.name: cannot change when resuming"):
        deployed(resume=True, overrides="fl.rounds=3 algorithm.name=fedavg_lora")
    with pytest.raises(ConfigError, match="privacy.secure_noise"):
        deployed(out=str(tmp_path / "dp"), overrides="privacy.mode=dp_sgd privacy.noise_multiplier=1")


def test_client_level_dp_noise_shares_under_secagg_over_flower_give_the_plain_private_mean(tmp_path):
    """Each client adds its share of the (here tiny) noise before masking; the server only sees the noised sum."""
    common = (
        "privacy.mode=client_dp",
        "privacy.noise_multiplier=1e-9",
        "privacy.clip_norm=0.05",
        "fl.clients_per_round=3",
        "flower.round_timeout=1",
    )
    run_experiment(tiny(*common, rounds=1), tmp_path / "plain", progress=False)
    serve_on_grid(LoopbackGrid(simulated_nodes(4)), tiny(*common, "secagg.enabled=true", rounds=1), tmp_path / "secure")
    a, b = adapter(tmp_path / "plain"), adapter(tmp_path / "secure")
    assert any(torch.count_nonzero(a[n]) for n in a if ".lora_B." in n)
    assert all(torch.allclose(a[n], b[n], atol=1e-5, rtol=0) for n in a)
    assert rundir.read_metrics(tmp_path / "plain")[0]["epsilon"] == rundir.read_metrics(tmp_path / "secure")[0]["epsilon"]


@pytest.mark.parametrize(
    ("overrides", "refused"),
    [
        (["privacy.mode=dp_sgd", "privacy.noise_multiplier=1"], True),
        (["privacy.mode=client_dp", "privacy.noise_multiplier=1"], True),
        (["privacy.mode=client_dp", "privacy.noise_multiplier=1", "secagg.enabled=true"], True),
        (["privacy.mode=client_dp", "privacy.noise_multiplier=1", "secagg.enabled=true", "secagg.modulus_bits=16"], False),
        (["privacy.mode=dp_sgd", "privacy.noise_multiplier=1", "privacy.secure_noise=true"], False),
    ],
)
def test_a_deployment_needs_secure_noise_except_for_distributed_dp(overrides, refused):
    """Distributed DP's noise shares always come from each node's OS CSPRNG: privacy.secure_noise adds nothing there."""
    cfg = load_config(None, ["fl.num_clients=4", "fl.clients_per_round=4", *overrides])
    if refused:
        with pytest.raises(ConfigError, match="privacy.secure_noise: a deployment needs true"):
            check_deployable_privacy(cfg)
    else:
        check_deployable_privacy(cfg)
