"""What a newcomer types first: --help and --version answer at once, list names what exists, config show explains every key."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest

from fedlpp.cli import catalogue, main
from fedlpp.config import SECTIONS, ExperimentConfig, build_config, load_config, to_tree


def test_the_command_line_loads_without_torch():
    """--help must not wait for torch (seconds on a cold disk): the CLI module imports none of the heavy stack."""
    code = "import sys, fedlpp.cli; print(sorted(m for m in ('torch', 'numpy', 'transformers', 'safetensors', 'cryptography') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("fedlpp 0.")


def test_list_names_every_registered_model_task_and_algorithm(capsys):
    from fedlpp import registry
    from fedlpp.algorithms.spec import algorithm_names
    from fedlpp.data.tasks import TASKS

    models, tasks, algorithms = (catalogue.summaries(r) for r in (registry.MODELS, registry.TASKS, registry.ALGORITHMS))
    assert {"smollm2-135m", "minilm-l6", "tiny-llama", "tiny-bert"} == set(models)
    assert set(tasks) == set(TASKS)
    assert set(algorithms) == set(algorithm_names())
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in [*models, *tasks, *algorithms, "configs/e2e_fedlpp_w2.toml"]:
        assert f"  {name} " in out
    runs, sweeps = out.split("run configs (fedlpp run --config FILE):")[1].split("sweep files (fedlpp sweep FILE):")
    assert "configs/sst2_dp_sweep.toml" in sweeps and "configs/sst2_dp_sweep.toml" not in runs and "e2e_fedlpp_w2" in runs


def test_config_show_gives_every_key_its_value_and_reason_and_reads_back(capsys):
    assert (
        main(["config", "show", "--config", "configs/e2e_fedlpp_w2.toml", "fl.rounds=3", "lora.target_modules=q_proj,v_proj"])
        == 0
    )
    out = capsys.readouterr().out
    assert build_config(tomllib.loads(out)) == load_config(
        "configs/e2e_fedlpp_w2.toml", ["fl.rounds=3", "lora.target_modules=q_proj,v_proj"]
    )
    assert "rounds = 3  " in out and "# communication rounds" in out
    section, explained = "", set()
    for line in out.splitlines():
        if line.startswith("["):
            section = line.strip("[]") + "."
        elif " = " in line and "  # " in line:
            explained.add(section + line.split(" = ")[0])
    every_key = {f"{s}.{k}" for s, values in to_tree(ExperimentConfig()).items() if isinstance(values, dict) for k in values}
    assert every_key | {"seed"} <= explained


def test_every_config_key_has_a_reason_in_the_source():
    missing = [f"{s}.{k}" for s, cls in SECTIONS.items() for k, why in catalogue.field_reasons(cls).items() if not why]
    assert missing == []


def test_config_show_refuses_a_bad_value(capsys):
    assert main(["config", "show", "fl.rounds=x"]) == 2
    assert "fl.rounds: expected an integer, got 'x'" in capsys.readouterr().err


def test_overrides_may_follow_options(capsys):
    assert (
        main(
            [
                "config",
                "show",
                "--config",
                "configs/e2e_fedlpp_w2.toml",
                "fl.rounds=3",
                "--config",
                "configs/e2e_fedlpp_w2.toml",
                "seed=4",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "rounds = 3 " in out and "seed = 4 " in out
    assert main(["config", "show", "--fl.rounds", "5", "--data.num_eval=7"]) == 0  # the --option spelling of a key
    out = capsys.readouterr().out
    assert "rounds = 5 " in out and "num_eval = 7 " in out
    with pytest.raises(SystemExit):
        main(["list", "fl.rounds=3"])  # a command that takes no overrides
    assert "unrecognized arguments: fl.rounds=3" in capsys.readouterr().err
