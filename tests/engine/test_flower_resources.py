"""Each virtual client's Ray resources on the simulation runtime (flower.client_cpus, flower.client_gpus).

Ray is never started here: ``run_simulation`` is replaced by a stand-in that records what it was given.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import tomli_w
import torch

from fedlpp.config import ConfigError, load_config, to_tree
from fedlpp.engine.flower import client_app, simulation
from fedlpp.engine.flower.simulation import backend_config, run_simulated


def flower(*overrides: str):
    return load_config(None, ["model.name=tiny-llama", *overrides])


@pytest.fixture
def given(monkeypatch):
    """What run_simulated hands to Flower's run_simulation (which then ends without running anything)."""
    seen: dict = {}

    def fake_run_simulation(*args, **kwargs):
        seen.update(kwargs)

    monkeypatch.setattr(simulation, "run_simulation", fake_run_simulation)
    return seen


def test_the_defaults_are_one_cpu_and_no_gpu_per_client():
    cfg = flower()
    assert (cfg.flower.client_cpus, cfg.flower.client_gpus) == (1.0, 0.0)
    config = backend_config(3)  # num_cpus, positionally, as before
    assert config["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert config["init_args"]["num_cpus"] == 3
    assert "num_gpus" not in config["init_args"], "no GPUs asked for: Ray's own detection is left alone"


def test_backend_config_follows_the_clients_resources():
    config = backend_config(4, client_cpus=2.0, client_gpus=0.5, num_gpus=1)
    assert config["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.5}
    assert config["init_args"]["num_cpus"] == 4 and config["init_args"]["num_gpus"] == 1


def test_ray_is_given_the_gpus_torch_sees_when_clients_ask_for_some():
    assert backend_config(2, client_gpus=0.5)["init_args"]["num_gpus"] == torch.cuda.device_count()


def test_run_simulated_passes_the_configs_resources_to_flower(given, tmp_path):
    with pytest.raises(RuntimeError, match="ended without finishing"):
        run_simulated(flower("flower.client_cpus=0.5", "fl.num_clients=3"), tmp_path / "run", progress=False, num_cpus=2)
    assert given["num_supernodes"] == 3
    assert given["backend_config"]["client_resources"] == {"num_cpus": 0.5, "num_gpus": 0.0}
    assert given["backend_config"]["init_args"]["num_cpus"] == 2


def torch_sees_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_run_simulated_gives_ray_the_gpus_torch_sees(given, tmp_path, monkeypatch):
    torch_sees_gpus(monkeypatch, 1)
    with pytest.raises(RuntimeError, match="ended without finishing"):
        run_simulated(flower("flower.client_gpus=0.5"), tmp_path / "run", progress=False)
    assert given["backend_config"]["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.5}
    assert given["backend_config"]["init_args"]["num_gpus"] == 1


def test_more_gpus_per_client_than_torch_sees_is_refused_before_ray_starts(given, tmp_path, monkeypatch):
    torch_sees_gpus(monkeypatch, 1)
    with pytest.raises(ConfigError, match="flower.client_gpus: 2 GPUs per virtual client, but torch sees only 1"):
        run_simulated(flower("flower.client_gpus=2"), tmp_path / "run", progress=False)
    assert given == {}, "Flower was never called"


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a CUDA GPU here: nothing to refuse")
def test_gpus_per_client_without_cuda_are_refused_before_ray_starts(given, tmp_path):
    with pytest.raises(ConfigError, match="flower.client_gpus: .* torch sees no CUDA GPU"):
        run_simulated(flower("flower.client_gpus=0.5"), tmp_path / "run", progress=False)
    assert given == {}, "Flower was never called"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "overrides",
    [
        ["flower.client_gpus=1"],
        ["flower.client_gpus=2"],
        ["flower.client_gpus=0.25"],
        ["flower.client_cpus=0.5"],
        ["flower.client_cpus=4"],
    ],
)
def test_valid_resources_are_accepted(overrides):
    flower(*overrides)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("flower.client_cpus=0", "flower.client_cpus: must be a finite number of CPUs > 0, got 0.0"),
        ("flower.client_cpus=-1", "flower.client_cpus: must be a finite number of CPUs > 0, got -1.0"),
        ("flower.client_cpus=inf", "flower.client_cpus: must be a finite number"),
        ("flower.client_gpus=-0.5", "flower.client_gpus: must be a finite number of GPUs >= 0, got -0.5"),
        ("flower.client_gpus=nan", "flower.client_gpus: must be a finite number"),
        ("flower.client_gpus=1.5", "flower.client_gpus: got 1.5; Ray shares a GPU only by a fraction <= 1"),
        ("flower.client_gpus=x", "flower.client_gpus: expected a number, got 'x'"),
    ],
)
def test_invalid_resources_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError) as caught:
        flower(override)
    assert message in str(caught.value)


def test_clients_on_a_gpu_that_ray_does_not_count_are_refused(given, tmp_path, monkeypatch):
    torch_sees_gpus(monkeypatch, 2)
    with pytest.raises(ConfigError, match="flower.client_gpus: train.device='cuda' puts every virtual client on cuda:0"):
        run_simulated(flower("train.device=cuda"), tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match="inside a Ray actor the GPU Ray gave it is cuda:0"):
        run_simulated(flower("flower.client_gpus=0.5", "train.device=cuda:1"), tmp_path / "run", progress=False)
    assert given == {}, "Flower was never called"


def test_the_default_device_runs_the_clients_on_the_cpu_where_ray_gives_them_no_gpu(given, tmp_path, monkeypatch, caplog):
    """train.device=auto on a machine with GPUs: with flower.client_gpus=0 the default config still runs (it was
    refused), the log says how to put the clients on GPUs, and each simulated client applies the config on the CPU."""
    torch_sees_gpus(monkeypatch, 1)
    with pytest.raises(RuntimeError, match="ended without finishing"), caplog.at_level("WARNING"):
        run_simulated(flower(), tmp_path / "run", progress=False)
    assert given["backend_config"]["client_resources"]["num_gpus"] == 0.0
    assert "the virtual clients run on the CPU" in caplog.text and "flower.client_gpus" in caplog.text
    assert "fp16" not in caplog.text


def test_fp16_clients_put_on_the_cpu_by_ray_are_warned_about(given, tmp_path, monkeypatch, caplog):
    """The clients' own fp16 warning stays in their Ray actors (log_to_driver is off): the driver says it."""
    torch_sees_gpus(monkeypatch, 1)
    with pytest.raises(RuntimeError, match="ended without finishing"), caplog.at_level("WARNING"):
        run_simulated(flower("train.precision=fp16"), tmp_path / "run", progress=False)
    assert "the virtual clients run on the CPU" in caplog.text
    assert "train.precision=fp16 on the CPU is many times slower than fp32" in caplog.text


def node_applies(overrides: list[str], node_config: dict) -> str:
    """The train.device a node applies to the config the server sends it."""
    sent = {"config": tomli_w.dumps(to_tree(flower(*overrides)))}
    return client_app.config_of(sent, node_config).train.device


def test_a_simulated_client_without_a_gpu_applies_the_config_on_the_cpu():
    simulated, deployed = {client_app.PARTITION_ID: 0}, {client_app.DATA_PATH: "data.jsonl"}
    assert node_applies([], simulated) == "cpu", "Ray gave it no GPU"
    assert node_applies(["flower.client_gpus=0.5"], simulated) == "auto", "Ray gave it one: cuda:0 inside its actor"
    assert node_applies([], deployed) == "auto", "a deployed node picks its own machine's device"
    assert node_applies(["train.device=cpu"], simulated) == "cpu"


def test_importing_the_flower_engine_announces_nothing_on_a_console_at_info():
    """Flower's state store imports alembic, which logs each of its plugins at INFO: seven lines in every run."""
    code = (
        "import logging; logging.basicConfig(level=logging.INFO); import fedlpp.engine.flower; "
        "import flwr.supercore.state.alembic.utils"  # Flower's state store: what imports alembic's plugins
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "alembic" not in done.stderr


@pytest.mark.parametrize(("given_gpus", "visible"), [([], ""), (["0"], "0")])
def test_ray_shows_a_simulated_client_only_the_gpus_it_gave_it(monkeypatch, given_gpus, visible):
    """With flower.client_gpus=0 an actor must see no GPU: torch or bitsandbytes in it would otherwise open a CUDA
    context on GPU 0, outside what Ray counts. Ray's own step that sets an actor's CUDA_VISIBLE_DEVICES, under the
    setting the simulation module makes."""
    import ray
    from ray._private import accelerators
    from ray._private import utils as ray_utils
    from ray._private.accelerators import NvidiaGPUAcceleratorManager

    assert os.environ[simulation.RAY_HIDES_GPUS[0]] == simulation.RAY_HIDES_GPUS[1]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # the machine's GPUs, as the driver sees them

    class Context:
        def get_accelerator_ids(self):
            return {"GPU": given_gpus}

    monkeypatch.setattr(ray, "get_runtime_context", Context)
    monkeypatch.setattr(accelerators, "get_accelerator_manager_for_resource", lambda name: NvidiaGPUAcceleratorManager)
    ray_utils.set_visible_accelerator_ids()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == visible
