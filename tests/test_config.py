from pathlib import Path

import pytest

from fedlpp.config import ConfigError, ExperimentConfig, build_config, changed_keys, load_config, read_toml, to_tree, write_toml

SMOKE = "model.name=tiny-llama algorithm.name=fedlpp quant.bits=2 fl.rounds=2 fl.num_clients=4 fl.clients_per_round=2 seed=0"


def test_smoke_overrides_from_the_issue_parse_to_typed_fields():
    cfg = load_config(None, SMOKE.split())
    assert cfg.model.name == "tiny-llama"
    assert cfg.quant.bits == 2 and isinstance(cfg.quant.bits, int)
    assert (cfg.fl.rounds, cfg.fl.num_clients, cfg.fl.clients_per_round, cfg.seed) == (2, 4, 2, 0)


def test_toml_file_then_overrides(tmp_path: Path):
    path = tmp_path / "exp.toml"
    path.write_text('seed = 3\n[fl]\nrounds = 7\n[lora]\ntarget_modules = ["q_proj"]\n[train]\nlr = 0.01\n')
    cfg = load_config(path, ["fl.rounds=9"])
    assert cfg.seed == 3 and cfg.fl.rounds == 9 and cfg.train.lr == 0.01
    assert cfg.lora.target_modules == ("q_proj",)


@pytest.mark.parametrize(
    "override, fragment",
    [
        (["fl.roundz=2"], "fl.roundz: unknown key; valid keys in [fl] are clients_per_round, local_steps, num_clients, rounds"),
        (
            ["algorithm.name=fedprox"],
            "algorithm.name: got 'fedprox'; valid choices are 'fedavg_lora', 'fedlpp', 'ffa_lora', 'fedlpp_ffa', 'rolora'",
        ),
        (["quant.bits=5"], "quant.bits: got 5; valid choices are 1, 2, 3, 4, 8"),
        (["quant.granularity=channel"], "quant.granularity: got 'channel'"),
        (["fl.rounds=two"], "fl.rounds: expected an integer, got 'two'"),
        (["train.lr=fast"], "train.lr: expected a number"),
        (["nosuch.key=1"], "nosuch: unknown section or key"),
        (["fl.clients_per_round=5"], "fl.clients_per_round: must be in [1, fl.num_clients=4]"),
        (["fl.rounds"], "overrides look like section.key=value"),
        (["data.partition=skewed"], "data.partition: got 'skewed'; valid choices are 'iid', 'dirichlet', 'quantity_skew'"),
        (["quant.block_size=8"], "quant.block_size: must be >= 16"),
        (["quant.granularity=row"], "quant.granularity: 'row' gives each lora_B row its own scale over only lora.r=8"),
        (["fl.clients_per_round=1"], "fl.clients_per_round: must be >= 2 with algorithm.server_rule='mean'"),
        (["train.optimizer=adam"], "train.optimizer: got 'adam'; valid choices are 'adamw', 'sgd'"),
        (["train.momentum=0.9"], 'train.momentum: applies to train.optimizer = "sgd" only'),
        (["train.optimizer=sgd", "train.momentum=1"], "train.momentum: must be in [0, 1)"),
        (["train.lr=2"], "train.lr: must be in (0, 1] (AdamW's step size)"),
    ],
)
def test_bad_keys_types_and_values_are_named(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert fragment in str(e.value)


def test_sgd_takes_the_larger_step_sizes_dp_sgd_needs():
    train = load_config(None, ["train.optimizer=sgd", "train.lr=4", "train.momentum=0.9"]).train
    assert (train.optimizer, train.lr, train.momentum) == ("sgd", 4.0, 0.9)


def test_dp_sgd_brings_its_recipe_for_the_keys_left_unset(tmp_path: Path):
    private = load_config(None, ["privacy.mode=dp_sgd", "privacy.epsilon=6"]).train
    assert (private.batch_size, private.lr, private.weight_decay) == (256, 1e-2, 0.0)
    assert load_config(None, []).train.batch_size == 8  # not without DP-SGD
    chosen = load_config(None, ["privacy.mode=dp_sgd", "privacy.epsilon=6", "train.batch_size=64"]).train
    assert (chosen.batch_size, chosen.lr) == (64, 1e-2)  # what the user sets wins, key by key
    path = tmp_path / "dp.toml"
    path.write_text('[privacy]\nmode = "dp_sgd"\nepsilon = 6.0\n[train]\nlr = 0.002\n')
    from_file = load_config(path).train
    assert (from_file.batch_size, from_file.lr) == (256, 0.002)
    resolved = tmp_path / "resolved.toml"
    write_toml(load_config(path), resolved)
    assert load_config(resolved) == load_config(path)  # a resumed run reads back the same values


def test_privacy_guards_apply_only_where_they_matter():
    assert load_config(None, ["algorithm.name=fedavg_lora", "fl.clients_per_round=1"]).fl.clients_per_round == 1
    assert load_config(None, ["algorithm.server_rule=delta", "fl.clients_per_round=1"]).fl.clients_per_round == 1
    assert load_config(None, ["quant.granularity=row", "lora.r=16"]).quant.granularity == "row"


def test_bad_toml_and_missing_file_are_clear(tmp_path: Path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[fl\nrounds=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_toml(bad)
    wrong_type = tmp_path / "wrong.toml"
    wrong_type.write_text("[fl]\nrounds = 2.5\n")
    with pytest.raises(ConfigError, match="fl.rounds: expected an integer"):
        load_config(wrong_type)


def test_resolved_config_round_trips_through_toml(tmp_path: Path):
    cfg = load_config(None, [*SMOKE.split(), "lora.target_modules=q_proj,v_proj"])
    write_toml(cfg, tmp_path / "c.toml")
    assert load_config(tmp_path / "c.toml") == cfg
    assert build_config(to_tree(cfg)) == cfg


def test_changed_keys_lists_dotted_differences():
    a = ExperimentConfig()
    b = load_config(None, ["fl.rounds=9", "seed=4"])
    assert changed_keys(a, b) == ["seed", "fl.rounds"]


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[1].glob("configs/*.toml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path: Path):
    from fedlpp.experiments.sweep import load_sweep

    configs = [p.config for p in load_sweep(path, []).points] if "[sweep]" in path.read_text() else [load_config(path)]
    assert all(cfg.data.path == "" for cfg in configs), "shipped configs leave data.path empty; users set it with an override"


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["privacy.mode=dp_sgd"], "privacy.epsilon"),  # neither a target nor a sigma
        (["privacy.mode=dp_sgd", "privacy.epsilon=3", "privacy.noise_multiplier=1"], "privacy.epsilon"),  # both
        (["privacy.noise_multiplier=1"], "privacy.noise_multiplier"),  # set with mode none
        (["privacy.mode=laplace"], "privacy.mode"),
        (["privacy.mode=dp_sgd", "privacy.epsilon=3", "privacy.accountant=gdp"], "privacy.accountant"),
        (["privacy.mode=dp_sgd", "privacy.epsilon=3", "privacy.delta=0"], "privacy.delta"),
        (["privacy.mode=dp_sgd", "privacy.epsilon=3", "privacy.client_sampling=poisson"], "privacy.client_sampling"),
        (["privacy.mode=client_dp", "privacy.epsilon=3", "privacy.accountant=prv"], "privacy.accountant"),
        (["privacy.mode=dp_sgd", "privacy.epsilon=3", "privacy.budget=2"], "privacy.budget"),
        (["privacy.mode=dp_sgd", "privacy.epsilon=3", "train.max_grad_norm=1"], "train.max_grad_norm"),
        (["privacy.secure_noise=true"], "privacy.secure_noise"),
        (
            [
                "privacy.mode=client_dp",
                "privacy.epsilon=3",
                "privacy.client_sampling=poisson",
                "secagg.enabled=true",
                "fl.num_clients=5",
                "fl.clients_per_round=3",
            ],
            "privacy.client_sampling",
        ),
    ],
)
def test_bad_privacy_settings_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_a_target_epsilon_is_also_the_budget():
    cfg = load_config(None, ["privacy.mode=dp_sgd", "privacy.epsilon=3"])
    assert cfg.privacy.enabled and cfg.privacy.stop_at == 3.0
    assert load_config(None, ["privacy.mode=client_dp", "privacy.noise_multiplier=1"]).privacy.stop_at == 0.0


def test_secagg_prg_is_a_choice_that_reaches_the_protocol():
    from fedlpp.engine.setup import secure_encoding

    with pytest.raises(ConfigError, match=r"secagg\.prg"):
        load_config(None, ["secagg.prg=rc4"])
    cfg = load_config(None, ["secagg.enabled=true", "secagg.prg=chacha20", "fl.clients_per_round=3"])
    assert secure_encoding(cfg, [10, 3, 4]).params.prg == "chacha20"
