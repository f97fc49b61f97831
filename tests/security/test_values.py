"""Values that can only hang, overflow or report a meaningless epsilon are refused by name before anything runs."""

from __future__ import annotations

import json

import pytest

from fedlpp.config import ConfigError, ExperimentConfig, flat_tree, load_config, to_tree
from fedlpp.data.files import MAX_JSON_LINE, read_json_lines
from fedlpp.privacy.accounting import Accounting, AccountingError, epsilon


def _numeric_keys() -> list[tuple[str, object]]:
    values = flat_tree(to_tree(ExperimentConfig()))
    return [(key, value) for key, value in values.items() if isinstance(value, (int, float)) and not isinstance(value, bool)]


@pytest.mark.parametrize(("key", "default"), _numeric_keys(), ids=[k for k, _ in _numeric_keys()])
def test_every_numeric_key_has_an_upper_bound(key, default):
    huge = 10**19 if isinstance(default, int) else 1e300
    with pytest.raises(ConfigError, match="^" + key.replace(".", r"\.") + ": "):
        load_config(None, [f"{key}={huge}"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["eval.max_new_tokens=1000000000"], "eval.max_new_tokens: must be in [1, 4096]"),
        (["privacy.mode=dp_sgd", "privacy.epsilon=1e308"], "privacy.epsilon: must be in [0, 1000]"),
        (["privacy.mode=dp_sgd", "privacy.noise_multiplier=1", "fl.rounds=1000000000000"], "fl.rounds: must be in [1, 100000]"),
        (["privacy.mode=dp_sgd", "privacy.noise_multiplier=5", "privacy.delta=0.5"], "privacy.delta: must be in (0, 0.1)"),
        (["privacy.mode=dp_sgd", "privacy.noise_multiplier=1e-300"], "privacy.noise_multiplier: must be 0 (not set) or at least"),
        (["secagg.enabled=true", "fl.clients_per_round=3", "secagg.clip_range=1e-300"], "secagg.clip_range: must be in [1e-12"),
    ],
)
def test_values_that_could_only_hang_or_overflow_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError) as refused:
        load_config(None, overrides)
    assert str(refused.value).startswith(message)


def test_a_negative_or_nan_epsilon_is_never_returned():
    """delta = 0.5 (the config refuses it; here the accountant is called directly) makes RDP's epsilon negative."""
    with pytest.raises(AccountingError, match="no privacy guarantee"):
        epsilon([(5.0, 1.0, 1)], Accounting("rdp", "poisson", 0.5))
    assert epsilon([(1.0, 0.01, 100)], Accounting("rdp", "poisson", 1e-5)) > 0


def test_a_config_file_with_a_byte_order_mark_reads(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes("\ufeff[fl]\nrounds = 2\n".encode())
    assert load_config(path).fl.rounds == 2


def test_an_enormous_json_line_is_refused_naming_its_line(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps({"input": "a", "output": "b"}) + "\n" + json.dumps({"input": "x" * MAX_JSON_LINE}) + "\n")
    with pytest.raises(ValueError, match=r"big\.jsonl, line 2: 1,048,5\d\d characters, more than the 1,048,576"):
        read_json_lines(path)
