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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from fedlpp.config import ExperimentConfig
from fedlpp.engine.flower import client_app
from fedlpp.engine.flower.audit import RecordingGrid
from fedlpp.engine.flower.server_app import serve_on_grid

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"  # Ray's node address (some of Ray's processes still listen on all interfaces: README)
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # no GPUs asked for: Ray leaves the device variables alone


def quiet_flower() -> None:
    """Flower's own console handler shows its warnings; its debug records stay out of ours."""
    logging.getLogger("flwr").propagate = False
    logging.getLogger("alembic").setLevel(logging.WARNING)  # Flower's in-memory state announces its schema plugins
    logging.getLogger("flwr").addFilter(lambda record: "run_simulation` function is deprecated" not in record.getMessage())


def backend_config(num_cpus: int | None = None) -> dict[str, Any]:
    """One CPU per virtual client; as many Ray actors as cores (each runs torch with one thread)."""
    cpus = num_cpus or os.cpu_count() or 1
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "include_dashboard": False, "_node_ip_address": LOOPBACK, "log_to_driver": False},
    }


def run_simulated(
    cfg: ExperimentConfig,
    out: Path,
    resume: bool = False,
    progress: bool = True,
    on_message: Callable[[Message], None] | None = None,
    num_cpus: int | None = None,
) -> dict[str, Any]:
    """Run (or continue) an experiment into ``out`` on Flower's simulation runtime; its summary."""
    quiet_flower()
    result: dict[str, Any] = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        seen = RecordingGrid(grid, on_message) if on_message is not None else grid
        result["summary"] = serve_on_grid(seen, cfg, out, resume, progress)  # type: ignore[arg-type]

    run_simulation(server, client_app.app, num_supernodes=cfg.fl.num_clients, backend_name="ray",
                   backend_config=backend_config(num_cpus))  # type: ignore[arg-type]
    if "summary" not in result:
        raise RuntimeError("the Flower simulation ended without finishing the run (see the log above)")
    return result["summary"]
