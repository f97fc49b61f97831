"""One registry per kind is the single source of names; a plugin registers through an entry point (docs/extending.md)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fedlpp import registry
from fedlpp.config import ConfigError, load_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def test_a_name_is_registered_once_and_an_unknown_one_lists_the_valid_ones():
    with pytest.raises(ValueError, match="algorithm 'fedlpp' is already registered"):
        registry.ALGORITHMS.register("fedlpp", "again")
    with pytest.raises(registry.UnknownName, match=r"algorithm.name: unknown algorithm 'nope'; valid choices are 'fedavg_lora'"):
        registry.ALGORITHMS.get("nope")
    with pytest.raises(ConfigError, match=r"data.partition: got 'nope'; valid choices are 'iid', 'dirichlet'"):
        load_config(None, ["data.partition=nope"])


def test_the_privacy_checks_follow_the_algorithms_trait_not_a_list():
    """A newly registered algorithm with a quantized broadcast gets FedLPP's model-privacy checks."""
    registry.ALGORITHMS.register("quantized_test", "a test algorithm", quantized_broadcast=True, trains="both", server_rule=None)
    try:
        with pytest.raises(ConfigError, match="quant.granularity"):
            load_config(None, ["algorithm.name=quantized_test", "quant.granularity=row", "lora.r=8"])
        load_config(None, ["algorithm.name=fedavg_lora", "quant.granularity=row", "lora.r=8"])  # not quantized: no check
    finally:
        registry.ALGORITHMS.unregister("quantized_test")


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def _install_plugin(site: Path) -> None:
    """The documented plugin as an installed distribution: its module and its entry points."""
    (module,) = _blocks("python")
    (toml,) = _blocks("toml")
    (site / "my_fedlpp_plugin.py").write_text(module, encoding="utf-8")
    info = site / "my_fedlpp_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-fedlpp-plugin\nVersion: 0.1\n", encoding="utf-8")
    groups = tomllib.loads(toml)["project"]["entry-points"]
    lines = [line for group, points in groups.items() for line in (f"[{group}]", *(f"{k} = {v}" for k, v in points.items()))]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.integration
def test_the_documented_plugin_is_listed_and_runs(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    _install_plugin(site)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    fedlpp = [sys.executable, "-m", "fedlpp.cli"]
    listed = subprocess.run([*fedlpp, "list"], env=env, capture_output=True, text=True, timeout=120, check=True).stdout
    assert "  greetings " in listed and "  fedlpp_rolora " in listed
    out = tmp_path / "run"
    overrides = ["data.task=greetings", "algorithm.name=fedlpp_rolora", "model.name=tiny-llama", "fl.num_clients=2"]
    overrides += ["fl.clients_per_round=2", "fl.rounds=2", "fl.local_steps=1", "train.batch_size=2", "eval.max_new_tokens=4"]
    done = subprocess.run([*fedlpp, "run", "--out", str(out), *overrides], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["task"], summary["algorithm"], summary["rounds"]) == ("greetings", "fedlpp_rolora", 2)
