"""``fedlpp run --engine flower``: the run on Flower's simulation runtime (Ray backend).

The ServerApp runs in this process (Flower runs it in a thread) and drives the same server
loop as a deployment; ``fl.num_clients`` virtual SuperNodes run the ClientApp in Ray
actors, each answering for its ``partition-id``. With the same seed a deterministic
config ends with the local engine's adapter (up to float rounding: the actors run torch
with one thread each).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from fedlpp.config import ConfigError, ExperimentConfig
from fedlpp.engine.flower import client_app
from fedlpp.engine.flower.audit import RecordingGrid
from fedlpp.engine.flower.server_app import serve_on_grid
from fedlpp.provenance import code_version

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"  # Ray's node address (some of Ray's processes still listen on all interfaces: README)
# Ray sets each actor's CUDA_VISIBLE_DEVICES to the GPUs it gave it: with flower.client_gpus > 0 `cuda:0` inside an
# actor is its GPU (two actors at 0.5 get the same one); with 0 the actor sees none (empty), so nothing in it (torch,
# bitsandbytes' import) opens a CUDA context on a GPU Ray does not count. Ray says it will stop doing the latter; set here.
RAY_HIDES_GPUS = ("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "1")
os.environ.setdefault(*RAY_HIDES_GPUS)


def quiet_flower() -> None:
    """Flower's own console handler shows its warnings; its debug records stay out of ours."""
    logging.getLogger("flwr").propagate = False
    logging.getLogger("flwr").addFilter(lambda record: "run_simulation` function is deprecated" not in record.getMessage())
    warnings.filterwarnings(
        "ignore", message="Tip: In future versions of Ray, Ray will no longer override", category=FutureWarning
    )


def backend_config(
    num_cpus: int | None = None, client_cpus: float = 1.0, client_gpus: float = 0.0, num_gpus: int | None = None
) -> dict[str, Any]:
    """Each virtual client's Ray resources (``flower.client_cpus``, ``flower.client_gpus``) and Ray's own.

    Ray is given ``num_cpus`` CPUs (default: the cores; each actor runs torch with one thread) and, when the
    clients ask for GPUs, ``num_gpus`` (default: the GPUs torch sees); it runs as many actors as fit.
    """
    init_args: dict[str, Any] = {
        "num_cpus": num_cpus or os.cpu_count() or 1,
        "include_dashboard": False,
        "_node_ip_address": LOOPBACK,
        "log_to_driver": False,
    }
    if client_gpus > 0:
        if num_gpus is None:
            import torch

            num_gpus = torch.cuda.device_count()
        init_args["num_gpus"] = num_gpus
    return {"client_resources": {"num_cpus": client_cpus, "num_gpus": float(client_gpus)}, "init_args": init_args}


def cuda_gpus_for(client_gpus: float) -> int | None:
    """The GPUs Ray may hand out (None: the clients ask for none); refused before Ray starts if torch sees too few."""
    if client_gpus <= 0:
        return None
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            f"flower.client_gpus: {client_gpus:g} GPU(s) per virtual client were asked for but torch sees no "
            f"CUDA GPU (this torch is {torch.__version__}); use flower.client_gpus=0"
        )
    count = torch.cuda.device_count()
    if client_gpus > count:
        raise ConfigError(
            f"flower.client_gpus: {client_gpus:g} GPUs per virtual client, but torch sees only {count}: "
            "Ray could never place a client"
        )
    return count


def warn_of_clients_on_the_cpu(cfg: ExperimentConfig) -> None:
    """``train.device=auto`` on a machine with GPUs and flower.client_gpus=0: Ray gives the clients no GPU, so each runs
    on the CPU (``client_app.config_of``); the run goes on, and the log says how to put them on GPUs."""
    from fedlpp.models.machine import Machine, fp16_on_cpu, resolve_device

    if client_app.simulated_clients_on_the_cpu(cfg) and resolve_device("auto").startswith("cuda"):
        slow = fp16_on_cpu(Machine("cpu", cfg.train.precision))  # the clients' own warning stays in their actors
        log.warning(
            "train.device=auto: the virtual clients run on the CPU, since flower.client_gpus=0 gives them no GPU; "
            "set flower.client_gpus (0.5: two clients share a GPU) to train them on GPUs%s",
            " (train.precision=fp16 on the CPU is many times slower than fp32)" if slow else "",
        )


def check_client_device(cfg: ExperimentConfig) -> None:
    """Virtual clients on a GPU only through Ray's GPU accounting, where each actor's own GPU is cuda:0."""
    from fedlpp.models.machine import resolve_device

    device = resolve_device(cfg.train.device)
    if cfg.train.device != "auto" and device.startswith("cuda") and cfg.flower.client_gpus == 0:
        raise ConfigError(
            f"flower.client_gpus: train.device={cfg.train.device!r} puts every virtual client on {device}, "
            "but Ray would not count them and would start one per core there; set flower.client_gpus "
            "(0.5: two clients share a GPU) or train.device=cpu"
        )
    if device.startswith("cuda:") and device != "cuda:0" and cfg.flower.client_gpus > 0:
        raise ConfigError(
            f"train.device: {cfg.train.device!r}, but inside a Ray actor the GPU Ray gave it is cuda:0; "
            "use train.device=cuda (or auto) with flower.client_gpus"
        )


def run_simulated(
    cfg: ExperimentConfig,
    out: Path,
    resume: bool = False,
    progress: bool = True,
    on_message: Callable[[Message], None] | None = None,
    num_cpus: int | None = None,
) -> dict[str, Any]:
    """Run (or continue) an experiment into ``out`` on Flower's simulation runtime; its summary."""
    code_version()  # the commit this process starts with, which summary.json records
    num_gpus = cuda_gpus_for(cfg.flower.client_gpus)  # before Ray starts
    check_client_device(cfg)
    warn_of_clients_on_the_cpu(cfg)
    quiet_flower()
    result: dict[str, Any] = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        seen = RecordingGrid(grid, on_message) if on_message is not None else grid
        result["summary"] = serve_on_grid(seen, cfg, out, resume, progress)  # type: ignore[arg-type]

    if progress:  # Ray takes seconds to start before the first round shows
        print(
            f"starting Flower's simulation runtime (Ray) for {cfg.fl.num_clients} virtual clients ...",
            file=sys.stderr,
            flush=True,
        )
    run_simulation(
        server,
        client_app.app,
        num_supernodes=cfg.fl.num_clients,
        backend_name="ray",
        backend_config=backend_config(num_cpus, cfg.flower.client_cpus, cfg.flower.client_gpus, num_gpus),
    )
    if "summary" not in result:
        raise RuntimeError("the Flower simulation ended without finishing the run (see the log above)")
    return result["summary"]
