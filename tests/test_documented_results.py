"""Two figures the documentation shows, pinned to the commands that produce them (a change that moves them fails here)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from fedlpp.config import load_config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def _documented_command(page: str, marker: str) -> list[str]:
    """The overrides of the `fedlpp run` command on ``page`` whose text contains ``marker`` (continuation lines joined)."""
    text = (ROOT / page).read_text(encoding="utf-8").replace("\\\n", " ")
    line = next(line for line in text.splitlines() if "fedlpp run" in line and marker in line)
    words = shlex.split(line.split("fedlpp run", 1)[1])
    return [w for w in words if "=" in w]


def test_the_dp_command_gives_the_statement_the_privacy_page_quotes(tmp_path):
    from fedlpp.engine.local import run_experiment

    overrides = _documented_command("docs/running.md", "privacy.mode=dp_sgd")
    summary = run_experiment(load_config(None, overrides), tmp_path / "dp", progress=False)
    quoted = re.search(r"^> (Each single training example.*?-DP:)", (ROOT / "docs/privacy.md").read_text(), flags=re.M)
    assert quoted is not None
    assert summary["privacy"]["statement"].startswith(quoted.group(1))  # "... protected by (1.16, 1e-05)-DP:"


def test_the_main_jobs_bytes_per_client_and_round_are_the_readmes():
    """The README's main-job table: bytes down and up per client per round, from the default configuration."""
    import torch

    from fedlpp.algorithms import round as rnd
    from fedlpp.engine.setup import algorithm_spec, build_model

    cfg = load_config(None, [])
    side = build_model(cfg, "generation", 0)
    adapter = {n: torch.zeros(s) for n, s in side.shapes.items()}
    down = len(rnd.make_broadcast(algorithm_spec(cfg), adapter, 0, 1))
    up = len(rnd.make_update(adapter, 1, 1))
    table = (ROOT / "README.md").read_text(encoding="utf-8")
    documented = {
        direction: re.search(rf"^{direction} \S+\s+([\d,.]+) KiB", table, flags=re.M).group(1)  # type: ignore[union-attr]
        for direction in ("down", "up")
    }
    assert (f"{down / 1024:,.1f}", f"{up / 1024:,.1f}") == (documented["down"], documented["up"])
