"""On a CUDA GPU: tiny-llama runs in fp32, bf16, on a 4-bit base, with DP-SGD, and two Flower clients sharing one GPU.

Skipped, saying so, where torch sees no CUDA GPU (run them with ``pytest -m gpu tests/gpu`` on a GPU machine;
bench/gpu_check.sh does). Each run is compared with what the CPU gives or with what it must be: the
server's side (adapter, wire bytes, privacy accounting) is float32 on the CPU whatever the device.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from peft import PeftModel

from fedlpp import rundir
from fedlpp.config import load_config
from fedlpp.engine.local import run_experiment
from fedlpp.models.backbone import load_backbone

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch sees none")]

TINY = [
    "model.name=tiny-llama",
    "model.max_length=48",
    "data.num_train=80",
    "data.num_eval=3",
    "fl.num_clients=2",
    "fl.clients_per_round=2",
    "fl.rounds=2",
    "fl.local_steps=2",
    "train.batch_size=4",
    "train.lr=0.02",
    "eval.every=1",
    "eval.max_new_tokens=3",
    "seed=0",
]
# No quantized broadcast (a float difference cannot flip a 2-bit code), and SGD: Adam's first step moves each weight by
# about lr times the sign of its gradient, so a gradient near zero that rounds to another sign on the GPU would move
# one weight by 2 lr; SGD's step differs from the CPU's only as much as the gradients do.
FEDAVG = ["algorithm.name=fedavg_lora", "train.optimizer=sgd", "train.lr=0.5"]
CUDA_PEAK_CEILING = 2**28  # tiny-llama's step allocates a few MB on the GPU; a process's RSS (torch imported) is far above
NF4 = ["train.device=cuda", "model.quantize=nf4", "train.precision=bf16", "train.gradient_checkpointing=true"]
DP_SGD = ["privacy.mode=dp_sgd", "privacy.noise_multiplier=1.0", "train.batch_size=8"]


def tiny(*extra: str):
    return load_config(None, [*TINY, *extra])


def run(tmp_path_factory, name: str, *extra: str):
    out = tmp_path_factory.mktemp(name)
    summary = run_experiment(tiny(*extra), out, progress=False)
    return out, summary


def adapter(out) -> dict[str, torch.Tensor]:
    return rundir.load_checkpoint(out)[0]


def assert_finished(out, summary, rounds: int = 2) -> None:
    rows = rundir.read_metrics(out)
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    assert all(math.isfinite(r["global"]["loss"]) for r in rows), [r["global"]["loss"] for r in rows]
    assert json.loads((out / rundir.SUMMARY).read_text())["rounds"] == rounds == summary["rounds"]
    theta = adapter(out)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in theta.values())
    assert any(torch.count_nonzero(theta[n]) for n in theta if ".lora_B." in n), "the run trained something"


def assert_on_cuda(summary) -> None:
    """The run's clients ran on the GPU, and the peak it reports is the GPU's allocation, not the process's RSS."""
    assert summary["machine"]["device"] == "cuda:0"
    peak = summary["client_peak_memory_bytes"]
    assert 0 < peak < CUDA_PEAK_CEILING, f"{peak} bytes: not torch.cuda.max_memory_allocated of a tiny model's step"


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest ||a - b|| / ||a|| over the adapter's tensors (a round-off difference is ~1e-6)."""
    assert set(a) == set(b)
    return max(((a[n] - b[n]).norm() / a[n].norm()).item() for n in a if a[n].norm() > 0)


@pytest.fixture(scope="module")
def fedavg_cpu(tmp_path_factory):
    return run(tmp_path_factory, "fedavg-cpu", *FEDAVG, "train.device=cpu")


@pytest.fixture(scope="module")
def fedavg_cuda(tmp_path_factory):
    return run(tmp_path_factory, "fedavg-cuda", *FEDAVG, "train.device=cuda")


@pytest.fixture(scope="module")
def nf4_cuda(tmp_path_factory):
    return run(tmp_path_factory, "nf4-cuda", *NF4)


def test_a_cuda_run_sends_the_same_bytes_and_ends_near_the_cpu_runs_adapter(fedavg_cpu, fedavg_cuda):
    (cpu_out, cpu_summary), (cuda_out, cuda_summary) = fedavg_cpu, fedavg_cuda
    assert_finished(cuda_out, cuda_summary)
    assert_on_cuda(cuda_summary)
    assert cpu_summary["machine"]["device"] == "cpu"
    assert cuda_summary["bytes_per_client_per_round"] == cpu_summary["bytes_per_client_per_round"]
    worst = relative_difference(adapter(cpu_out), adapter(cuda_out))
    assert worst <= 1e-3, f"largest relative difference from the CPU run's adapter: {worst}"


def test_bf16_on_cuda(tmp_path_factory):
    out, summary = run(tmp_path_factory, "bf16-cuda", "train.device=cuda", "train.precision=bf16")
    assert_finished(out, summary)
    assert_on_cuda(summary)
    assert summary["machine"]["precision"] == "bf16"


def test_nf4_base_in_bf16_with_gradient_checkpointing_on_cuda(nf4_cuda):
    out, summary = nf4_cuda
    assert_finished(out, summary)
    assert_on_cuda(summary)
    assert summary["machine"] == {"device": "cuda:0", "precision": "bf16", "quantize": "nf4", "gradient_checkpointing": True}


def test_dp_sgd_in_bf16_on_cuda_spends_the_same_epsilon_as_on_the_cpu(tmp_path_factory):
    cpu_out, cpu_summary = run(tmp_path_factory, "dp-cpu", *DP_SGD, "train.device=cpu")
    out, summary = run(tmp_path_factory, "dp-cuda", *DP_SGD, "train.device=cuda", "train.precision=bf16")
    assert_finished(out, summary)
    assert_on_cuda(summary)
    assert summary["privacy"]["mode"] == "dp_sgd" and summary["privacy"]["epsilon"] > 0
    assert summary["privacy"]["epsilon"] == cpu_summary["privacy"]["epsilon"]
    assert [r["epsilon"] for r in rundir.read_metrics(out)] == [r["epsilon"] for r in rundir.read_metrics(cpu_out)]


def test_dp_sgd_on_cuda_ends_near_the_cpu_runs_adapter(tmp_path_factory):
    """The noise and the Poisson batches come from the CPU's generators, so only the per-example gradients' round-off
    differs: Opacus' hooks, the clip and the noise on the GPU give the CPU's adapter."""
    cpu_out, _ = run(tmp_path_factory, "dp-sgd-cpu", *DP_SGD, *FEDAVG, "train.device=cpu")
    out, summary = run(tmp_path_factory, "dp-sgd-cuda", *DP_SGD, *FEDAVG, "train.device=cuda")
    assert_finished(out, summary)
    assert_on_cuda(summary)
    worst = relative_difference(adapter(cpu_out), adapter(out))
    assert worst <= 1e-3, f"largest relative difference from the CPU run's adapter: {worst}"


def test_dp_sgd_on_a_4_bit_base_with_checkpointing_on_cuda(tmp_path_factory):
    out, summary = run(tmp_path_factory, "dp-nf4-cuda", *DP_SGD, *NF4)
    assert_finished(out, summary)
    assert_on_cuda(summary)
    assert summary["privacy"]["mode"] == "dp_sgd" and summary["privacy"]["epsilon"] > 0


def test_fp16_with_loss_scaling_on_cuda_ends_near_the_fp32_runs_adapter(fedavg_cuda, tmp_path_factory):
    out, summary = run(tmp_path_factory, "fp16-cuda", *FEDAVG, "train.device=cuda", "train.precision=fp16")
    assert_finished(out, summary)
    assert_on_cuda(summary)
    fp32_out, _ = fedavg_cuda
    worst = relative_difference(adapter(fp32_out), adapter(out))
    assert worst <= 0.02, f"largest relative difference from the fp32 run's adapter: {worst}"


def test_peak_memory_resets_in_a_process_where_nothing_has_started_cuda():
    """bench/scale.py's cell resets CUDA's peak before its model loads; CUDA starts lazily, and torch refuses to reset an
    allocator it has not started ("did you call init?"). The tests' own process has long started it."""
    code = (
        "import torch; from fedlpp.models.machine import Machine; machine = Machine('cuda:0'); "
        "machine.reset_peak_memory(); block = torch.ones(2**22, device='cuda:0'); print(machine.peak_memory()['bytes'])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) >= 16 * 2**20, "a 16 MiB block was allocated after the reset"


def test_the_adapter_of_a_cuda_nf4_run_loads_on_the_cpu_onto_the_fp32_base(nf4_cuda):
    out, _ = nf4_cuda
    checkpoint = adapter(out)
    base = load_backbone("tiny-llama", "generation").model
    model = PeftModel.from_pretrained(base, str(out / rundir.ADAPTER))
    loaded = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(checkpoint)
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in loaded.values())
    for kind in ("lora_A", "lora_B"):
        name = next(n for n in loaded if "layers.0.self_attn.q_proj" in n and kind in n)
        assert torch.equal(loaded[name], checkpoint[f"model.layers.0.self_attn.q_proj.{kind}.weight"]), name


def _private_network() -> list[str] | None:
    """A command prefix that runs a program in a network namespace of its own (only loopback), or None.

    As in tests/engine/test_flower_runtime.py: Ray listens on every interface it sees, so the tests start it only there.
    """
    probe = (
        subprocess.run(["unshare", "-rn", "ip", "link", "set", "lo", "up"], capture_output=True, timeout=30, check=False)
        if shutil.which("unshare") and shutil.which("ip")
        else None
    )
    return ["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"] if probe and probe.returncode == 0 else None


def test_two_simulated_clients_share_one_gpu(fedavg_cuda, tmp_path):
    """`fedlpp run --engine flower` (run_simulated) with flower.client_gpus=0.5: Ray places both clients' actors on the one GPU."""
    pytest.importorskip("ray", reason="ray is not installed here (bench/gpu_bundle.py leaves it out): no Flower simulation")
    prefix = _private_network()
    if prefix is None:
        pytest.skip("no private network namespace here (unshare -rn): Ray would listen beyond 127.0.0.1")
    out = tmp_path / "sim"
    overrides = [*TINY, *FEDAVG, "train.device=cuda", "flower.client_gpus=0.5"]
    done = subprocess.run(
        [*prefix, sys.executable, "-m", "fedlpp.cli", "run", "--engine", "flower", *overrides, "--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=90,  # well inside gpu_check.sh's pytest cap: a hung Ray fails this test, not the whole step
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    summary = json.loads((out / rundir.SUMMARY).read_text())
    assert_finished(out, summary)
    assert_on_cuda(summary)
    rows = rundir.read_metrics(out)
    assert all(r["clients"] == [0, 1] for r in rows)
    local_out, _ = fedavg_cuda
    worst = relative_difference(adapter(local_out), adapter(out))
    assert worst <= 1e-3, f"largest relative difference from the local engine's cuda run: {worst}"
