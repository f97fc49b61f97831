"""End-to-end runs of the local engine on tiny models (a few rounds each)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from fedlpp import rundir
from fedlpp.algorithms import round as rnd
from fedlpp.algorithms import wire
from fedlpp.algorithms.spec import get_algorithm
from fedlpp.config import load_config
from fedlpp.engine.local import run_experiment
from fedlpp.models.backbone import load_backbone
from fedlpp.models.lora import is_lora_a
from fedlpp.provenance import code_version
from fedlpp.quant import QuantSpec

pytestmark = pytest.mark.integration

TINY = [
    "model.name=tiny-llama",
    "model.max_length=64",
    "data.num_train=240",
    "data.num_eval=6",
    "fl.num_clients=4",
    "fl.clients_per_round=2",
    "fl.local_steps=4",
    "train.batch_size=4",
    "train.lr=0.02",
    "eval.every=1",
    "eval.max_new_tokens=4",
    "eval.batch_size=8",
    "seed=0",
]


def tiny(*extra: str, rounds: int = 3):
    return load_config(None, [*TINY, f"fl.rounds={rounds}", *extra])


class Recorder:
    """Every message the server sends to a client, as bytes."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, bytes]] = []

    def __call__(self, client: int, payload: bytes) -> None:
        self.sent.append((client, payload))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, dict, Recorder]]:
    out = {}
    for name in ("fedavg_lora", "fedlpp", "ffa_lora", "fedlpp_ffa"):
        directory = tmp_path_factory.mktemp(name)
        recorder = Recorder()
        summary = run_experiment(tiny(f"algorithm.name={name}"), directory, progress=False, on_send=recorder)
        out[name] = (directory, summary, recorder)
    return out


ALGORITHMS = ("fedavg_lora", "fedlpp", "ffa_lora", "fedlpp_ffa")


@pytest.mark.parametrize("name", ALGORITHMS)
def test_loss_falls_and_both_models_are_evaluated(runs, name):
    directory, summary, _ = runs[name]
    rows = rundir.read_metrics(directory)
    assert [r["round"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert {"round", "bytes_down", "bytes_up", "wall_s", "global", "proxy"} <= set(row)
        assert set(row["global"]) == set(row["proxy"]) == {"loss", "bleu", "rouge_l"}
        assert row["bytes_down"] > 0 and row["bytes_up"] > 0
    losses = [r["global"]["loss"] for r in rows]
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0], losses
    assert summary["global"] == rows[-1]["global"]


@pytest.mark.parametrize("name", ALGORITHMS)
def test_run_directory_contract(runs, name):
    directory, _summary, _ = runs[name]
    assert load_config(directory / rundir.CONFIG).algorithm.name == name
    summary = json.loads((directory / rundir.SUMMARY).read_text())
    assert summary["rounds"] == 3 and summary["code"] == code_version()
    ckpt, last = rundir.load_checkpoint(directory)
    assert last == 3
    # The saved peft adapter loads on the base model and carries the checkpointed weights.
    base = load_backbone("tiny-llama", "generation").model
    model = PeftModel.from_pretrained(base, str(directory / rundir.ADAPTER))
    saved = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    some = next(n for n in saved if "layers.0.self_attn.q_proj" in n)
    assert torch.equal(saved[some].detach(), ckpt["model.layers.0.self_attn.q_proj.lora_B.weight"])


def test_quantized_proxy_differs_from_global_only_for_fedlpp(runs):
    assert runs["fedavg_lora"][1]["proxy"] == runs["fedavg_lora"][1]["global"]
    assert runs["ffa_lora"][1]["proxy"] == runs["ffa_lora"][1]["global"]
    assert runs["fedlpp"][1]["proxy"]["loss"] != runs["fedlpp"][1]["global"]["loss"]


@pytest.mark.parametrize("name", ["fedlpp", "fedlpp_ffa"])
def test_no_full_precision_adapter_tensor_is_ever_sent(runs, name):
    """Model privacy (DESIGN 1.2): every server->client message carries only codes, scales, seed."""
    directory, _, recorder = runs[name]
    ckpt, _ = rundir.load_checkpoint(directory)
    assert len(recorder.sent) == 3 * 2
    for _, payload in recorder.sent:
        tensors, meta = wire.decode(payload, rnd.BROADCAST)
        assert {n: t.dtype for n, t in tensors.items()} == {"codes": torch.uint8, "scales": torch.float16}
        # Codes are packed 2-bit: a quarter of a byte per adapter value sent, nothing more.
        sent_layout = rnd.broadcast_layout(get_algorithm(name, QuantSpec(2)), {k: v.shape for k, v in ckpt.items()})
        assert tensors["codes"].numel() == sum(math.prod(s) for _, s in sent_layout) // 4
        # One float16 scale per 64 values (block granularity), not one per handful of values.
        assert tensors["scales"].numel() == sum(-(-math.prod(s) // 64) for _, s in sent_layout)
        assert set(meta) <= {"algorithm", "round", "layout", "quant", "a_seed"}


def test_ffa_keeps_a_bit_identical_across_rounds_and_clients(runs):
    directory, _, recorder = runs["ffa_lora"]
    shapes = {n: tuple(t.shape) for n, t in rundir.load_checkpoint(directory)[0].items()}
    starts = [rnd.read_broadcast(p, shapes)[0] for _, p in recorder.sent]
    final, _ = rundir.load_checkpoint(directory)
    a_names = [n for n in shapes if is_lora_a(n)]
    assert a_names
    for start in starts:
        for n in a_names:
            assert torch.equal(start[n], final[n])
    assert {c for c, _ in recorder.sent} != {recorder.sent[0][0]}, "several clients took part"


def test_fedlpp_sends_far_fewer_bytes_down(runs):
    fedavg = runs["fedavg_lora"][1]["bytes_per_client_per_round"]["down"]
    fedlpp = runs["fedlpp"][1]["bytes_per_client_per_round"]["down"]
    ffa = runs["ffa_lora"][1]["bytes_per_client_per_round"]
    assert fedlpp < 0.25 * fedavg
    assert ffa["up"] < 0.75 * runs["fedavg_lora"][1]["bytes_per_client_per_round"]["up"]


def _final_adapter(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / rundir.CHECKPOINT))


def test_resume_after_a_kill_gives_the_same_result(runs, tmp_path):
    reference, _, _ = runs["fedlpp"]
    killed = tmp_path / "killed"
    run_experiment(tiny("algorithm.name=fedlpp", rounds=2), killed, progress=False)
    # A kill after round 2: the config still says 3 rounds, the summary is not written yet.
    rundir.save_config(killed, tiny("algorithm.name=fedlpp"))
    (killed / rundir.SUMMARY).unlink()
    with (killed / rundir.METRICS).open("a") as f:
        f.write('{"round": 3, "partial')  # a row cut short by the kill
    run_experiment(tiny("algorithm.name=fedlpp"), killed, resume=True, progress=False)
    a, b = _final_adapter(reference), _final_adapter(killed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert [r["round"] for r in rundir.read_metrics(killed)] == [1, 2, 3]


def test_extending_a_finished_run_equals_a_longer_run(tmp_path):
    short = tmp_path / "short"
    run_experiment(tiny("algorithm.name=fedavg_lora", "eval.every=10", rounds=2), short, progress=False)
    run_experiment(tiny("algorithm.name=fedavg_lora", "eval.every=10", rounds=3), short, resume=True, progress=False)
    full = tmp_path / "full"
    run_experiment(tiny("algorithm.name=fedavg_lora", "eval.every=10", rounds=3), full, progress=False)
    a, b = _final_adapter(short), _final_adapter(full)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert json.loads((short / rundir.SUMMARY).read_text())["global"] == json.loads((full / rundir.SUMMARY).read_text())["global"]


def test_a_run_directory_is_never_overwritten(runs):
    directory = runs["fedavg_lora"][0]
    with pytest.raises(rundir.RunDirError, match="already holds a run"):
        run_experiment(tiny(), directory, progress=False)


def test_classification_run_on_tiny_bert(tmp_path):
    data = tmp_path / "sst2"
    data.mkdir()
    rows = ["sentence\tlabel"] + [f"a truly {w} film\t1" for w in ("great", "lovely", "superb", "fine")] * 15
    rows += [f"a truly {w} film\t0" for w in ("awful", "boring", "dreadful", "bad")] * 15
    (data / "train.tsv").write_text("\n".join(rows) + "\n")
    cfg = load_config(
        None,
        [
            "model.name=tiny-bert",
            "data.task=sst2",
            f"data.path={data}",
            "data.num_eval=16",
            "algorithm.name=fedlpp_ffa",
            "fl.rounds=3",
            "fl.num_clients=3",
            "fl.clients_per_round=2",
            "fl.local_steps=5",
            "train.batch_size=8",
            "eval.every=1",
            "train.lr=0.1",  # frozen A: FFA-LoRA needs a larger learning rate (FFA-LoRA paper, 2.3)
        ],
    )
    summary = run_experiment(cfg, tmp_path / "run", progress=False)
    rows_out = rundir.read_metrics(tmp_path / "run")
    assert set(summary["global"]) == {"loss", "accuracy"}
    assert rows_out[-1]["global"]["loss"] < rows_out[0]["global"]["loss"]


def _full_and_killed_then_resumed(
    tmp_path: Path, overrides: tuple[str, ...], recorder: Recorder | None = None
) -> tuple[Path, Path]:
    """Three rounds in one go, and the same run stopped after round 2 (no summary) then resumed to round 3."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_experiment(tiny(*overrides), full, progress=False, on_send=recorder)
    run_experiment(tiny(*overrides, rounds=2), killed, progress=False)
    rundir.save_config(killed, tiny(*overrides))
    (killed / rundir.SUMMARY).unlink()
    run_experiment(tiny(*overrides), killed, resume=True, progress=False)
    return full, killed


def test_server_momentum_resumes_exactly_and_never_leaves_the_server(tmp_path):
    momentum = ("algorithm.name=fedlpp", "algorithm.server_optimizer=momentum", "algorithm.server_momentum=0.5", "eval.every=10")
    recorder = Recorder()
    full, killed = _full_and_killed_then_resumed(tmp_path, momentum, recorder)
    a, b = _final_adapter(full), _final_adapter(killed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    adapter, _ = rundir.load_checkpoint(full)
    state = rundir.load_server_state(full)
    assert set(state) == {f"velocity.{n}" for n in adapter}  # kept beside the adapter, not in it
    plain, plain_sent = tmp_path / "plain", Recorder()
    run_experiment(tiny("algorithm.name=fedlpp", "eval.every=10"), plain, progress=False, on_send=plain_sent)
    assert not all(torch.equal(adapter[n], rundir.load_checkpoint(plain)[0][n]) for n in adapter)  # momentum moved it
    # The same messages, byte for byte in size, as without momentum: no velocity travels; the first round's are equal.
    assert [len(p) for _, p in recorder.sent] == [len(p) for _, p in plain_sent.sent]
    (first, meta), (plain_first, plain_meta) = (wire.decode(r.sent[0][1], rnd.BROADCAST) for r in (recorder, plain_sent))
    assert meta == plain_meta and all(torch.equal(first[n], plain_first[n]) for n in first)


@pytest.mark.parametrize("optimizer", ["adam", "yogi"])
def test_adaptive_server_optimizers_resume_exactly_with_their_moments_on_the_server(tmp_path, optimizer):
    adaptive = (
        "algorithm.name=fedlpp",
        f"algorithm.server_optimizer={optimizer}",
        "algorithm.server_opt_lr=0.005",
        "eval.every=10",
    )
    full, killed = _full_and_killed_then_resumed(tmp_path, adaptive)
    a, b = _final_adapter(full), _final_adapter(killed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    adapter, _ = rundir.load_checkpoint(full)
    assert set(rundir.load_server_state(full)) == {f"{part}.{n}" for part in ("m", "v") for n in adapter}


def test_fedprox_runs_and_keeps_the_clients_nearer_their_start(tmp_path):
    plain = run_experiment(tiny("eval.every=10", rounds=1), tmp_path / "plain", progress=False)
    prox = run_experiment(tiny("eval.every=10", "train.proximal_mu=5.0", rounds=1), tmp_path / "prox", progress=False)
    start = initial_adapter_of(tmp_path / "plain")
    moved = {
        k: sum(float((rundir.load_checkpoint(tmp_path / k)[0][n] - start[n]).norm()) for n in start) for k in ("plain", "prox")
    }
    assert moved["prox"] < moved["plain"]
    assert prox["rounds"] == plain["rounds"] == 1


def initial_adapter_of(out: Path) -> dict[str, torch.Tensor]:
    from fedlpp.engine.setup import build_run

    return build_run(rundir.resumed_config(out, [])).server.initial_adapter()
