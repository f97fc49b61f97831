"""Values that can only fail are refused before anything runs, naming the key (issue 12)."""

from __future__ import annotations

import dataclasses
import re

import pytest

from fedlpp.cli import main
from fedlpp.config import ConfigError, ExperimentConfig, load_config


def _float_keys() -> list[str]:
    cfg = ExperimentConfig()
    return [
        f"{s.name}.{f.name}"
        for s in dataclasses.fields(cfg)
        if dataclasses.is_dataclass(getattr(cfg, s.name))
        for f in dataclasses.fields(getattr(cfg, s.name))
        if isinstance(getattr(getattr(cfg, s.name), f.name), float)
    ]


@pytest.mark.parametrize("key", _float_keys())
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_every_float_key_refuses_what_is_not_a_finite_number(key, value):
    with pytest.raises(ConfigError, match="^" + re.escape(key) + ": "):
        load_config(None, [f"{key}={value}"])


def test_the_float_keys_are_all_found():
    assert {"train.lr", "lora.alpha", "algorithm.server_lr", "privacy.epsilon", "privacy.noise_multiplier"} <= set(_float_keys())


def test_a_learning_rate_no_optimizer_step_can_survive_is_refused():
    with pytest.raises(ConfigError, match=r"train\.lr: must be in \(0, 1\]"):
        load_config(None, ["train.lr=5"])


@pytest.mark.parametrize("override", ["privacy.epsilon=inf", "privacy.noise_multiplier=inf", "algorithm.server_lr=inf"])
def test_a_refused_value_writes_nothing(override, tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "run",
        "model.name=tiny-llama",
        "algorithm.name=ffa_lora",
        "fl.num_clients=3",
        "fl.clients_per_round=3",
        "privacy.mode=dp_sgd",
        override,
        "--out",
        str(out),
    ]
    if "privacy" not in override:
        args.remove("privacy.mode=dp_sgd")
    assert main(args) != 0
    assert override.split("=")[0] in capsys.readouterr().err
    assert not out.exists()


def test_a_secagg_range_its_fixed_point_cannot_use_is_refused_before_anything_runs(tmp_path, capsys):
    """Every client's input carries its weight (its examples): a range that cannot encode it aborts every round."""
    out = tmp_path / "run"
    args = [
        "run",
        "model.name=tiny-llama",
        "data.num_train=120",
        "fl.num_clients=4",
        "fl.clients_per_round=3",
        "secagg.enabled=true",
        "secagg.clip_range=1e-7",
        "secagg.scale_bits=20",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "secagg.clip_range" in err and "weight of 30" in err  # 120 examples over 4 clients
    assert not out.exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("lora.alpha=1e30", r"lora\.alpha: must be in \(0, 4096\]"),
        ("algorithm.server_lr=1e6", r"algorithm\.server_lr: must be in \(0, 10\]"),
    ],
)
def test_finite_values_that_can_only_diverge_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
