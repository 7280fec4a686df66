import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedmeta.experiment.config import (
    ConfigError, ExperimentConfig, builtin_configs, config_from_dict, config_to_dict, config_to_toml, load_config,
    parse_override, resolved,
)


def test_no_config_gives_the_embedded_synthetic_default():
    config = load_config()

    assert config == ExperimentConfig()
    assert config.data.kind == "synthetic"
    assert config.model_name == "logistic_regression"


def test_toml_sections_map_onto_dataclasses(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('rounds = 7\n[algorithm]\nname = "reptile"\nlocal_steps = 5\nclient_lr = 1\n')

    config = load_config(path)

    assert config.rounds == 7
    assert config.algorithm.name == "reptile"
    assert config.algorithm.local_steps == 5
    assert config.algorithm.client_lr == 1.0 and isinstance(config.algorithm.client_lr, float)


def test_overrides_parse_toml_values_and_bare_words():
    config = load_config(None, ["algorithm.client_lr=0.1", "data.kind=emnist", "evaluation.thresholds=[0.5, 0.8]",
                                "data.max_clients=none"])

    assert config.algorithm.client_lr == 0.1
    assert config.data.kind == "emnist"
    assert config.evaluation.thresholds == (0.5, 0.8)
    assert config.data.max_clients is None


def test_override_wins_over_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("rounds = 7\n")

    config = load_config(path, ["rounds=3"])

    assert config.rounds == 3


def test_unknown_key_suggests_the_closest_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'algorithm.client_rl'; did you mean 'client_lr'\?"):
        load_config(None, ["algorithm.client_rl=0.1"])


def test_unknown_section_is_an_error():
    with pytest.raises(ConfigError, match="unknown config key 'algorithms'; did you mean 'algorithm'"):
        config_from_dict({"algorithms": {"name": "fedavg"}})


@pytest.mark.parametrize("override, message", [
    ("rounds=ten", r"rounds = 'ten': expected a int"),
    ("rounds=true", r"rounds = True: expected a int"),
    ("rounds=0", r"rounds = 0: expected at least 1"),
    ("algorithm.name=fedprox", r"algorithm.name = 'fedprox': expected one of 'fedsgd', 'fedavg'"),
    ("algorithm.client_lr=-1", r"algorithm.client_lr = -1.0: expected a positive learning rate"),
    ("algorithm.server_momentum=1.5", r"algorithm.server_momentum = 1.5: expected a momentum in \[0, 1\)"),
    ("data.held_out_fraction=1", r"data.held_out_fraction = 1.0: expected a fraction in \(0, 1\)"),
    ("evaluation.fine_tune_optimizer=rmsprop", r"evaluation.fine_tune_optimizer = 'rmsprop'"),
    ("model.name=resnet", r"model.name = 'resnet': expected one of"),
    ("evaluation.thresholds=[0.5, 2]", r"evaluation.thresholds = \(0.5, 2.0\): expected accuracies in \(0, 1\]"),
    ("algorithm.name=two_stage", r"algorithm.switch_round = None: expected a round >= 1 for two_stage"),
    ("rounds", r"--set 'rounds': expected key=value"),
    ("engine.workers=-1", r"engine.workers = -1: expected 0 \(in-process\) or more worker processes"),
    ("engine.bfloat16=1", r"engine.bfloat16 = 1: expected a bool"),
])
def test_bad_values_name_the_key_and_the_value(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_momentum_with_a_non_sgd_server_optimizer_is_rejected():
    with pytest.raises(ConfigError, match="momentum is SGD's"):
        load_config(None, ["algorithm.server_optimizer=adam", "algorithm.server_momentum=0.9"])


def test_errors_in_a_file_name_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("rounds = -2\n")

    with pytest.raises(ConfigError, match=r"bad.toml: rounds = -2"):
        load_config(path)


def test_invalid_toml_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("rounds = = 2\n")

    with pytest.raises(ConfigError, match=r"broken.toml: invalid TOML"):
        load_config(path)


def test_missing_config_file_lists_the_shipped_configs(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config file not found: .*nope.toml \(shipped configs: .*femnist"):
        load_config(tmp_path / "nope.toml")


def test_shipped_configs_load_by_name_and_are_valid():
    shipped = builtin_configs()

    configs = {name: load_config(name) for name in shipped}

    assert {"synthetic", "femnist", "femnist_two_stage", "shakespeare"} <= set(configs)
    assert configs["femnist_two_stage"].algorithm.switch_round == 70


def test_shipped_synthetic_config_is_the_embedded_default_apart_from_its_name():
    assert load_config("synthetic", ["name=default"]) == load_config()


def test_resolved_config_survives_a_toml_round_trip(tmp_path):
    config = resolved(load_config("femnist", ["data.path=somewhere"]))
    path = tmp_path / "config.toml"

    path.write_text(config_to_toml(config))

    assert load_config(path) == config
    assert config.model.name == "fedavg_cnn"


def test_dict_round_trip_keeps_unset_optionals():
    config = load_config(None, ["evaluation.max_clients=5"])

    assert config_from_dict(config_to_dict(config)) == config


@given(st.floats(min_value=1e-6, max_value=10, allow_nan=False))
def test_any_positive_float_override_round_trips(lr):
    path, value = parse_override(f"algorithm.client_lr={lr!r}")

    assert path == ["algorithm", "client_lr"]
    assert value == lr
