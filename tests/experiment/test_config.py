import sys

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
    ("rounds=ten", r"rounds = 'ten': expected an int"),
    ("rounds=true", r"rounds = True: expected an int"),
    ("rounds=0", r"rounds = 0: expected at least 1"),
    ("rounds=-5", r"rounds = -5: expected at least 1"),
    ("algorithm.local_epochs=1.5", r"algorithm.local_epochs = 1.5: expected an int"),
    ("data.path=3", r"data.path = 3: expected a str"),
    ("algorithm=3", r"algorithm = 3: expected a table"),
    ("algorithm.name=fedmagic", r"algorithm.name = 'fedmagic': expected one of 'fedsgd', 'fedavg'"),
    ("algorithm.client_lr=-1", r"algorithm.client_lr = -1.0: expected a positive, finite learning rate"),
    ("algorithm.client_lr=0", r"algorithm.client_lr = 0.0: expected a positive, finite learning rate"),
    ("algorithm.client_lr=inf", r"algorithm.client_lr = inf: expected a positive, finite learning rate"),
    ("algorithm.server_lr=-0.5", r"algorithm.server_lr = -0.5: expected a positive, finite learning rate"),
    ("algorithm.reptile_server_lr=0", r"algorithm.reptile_server_lr = 0.0: expected a positive, finite"),
    ("evaluation.fine_tune_lr=0", r"evaluation.fine_tune_lr = 0.0: expected a positive, finite learning rate"),
    ("evaluation.fine_tune_lr=nan", r"evaluation.fine_tune_lr = nan: expected a positive, finite learning rate"),
    ("algorithm.local_epochs=0", r"algorithm.local_epochs = 0: expected at least 1"),
    ("algorithm.local_steps=0", r"algorithm.local_steps = 0: expected at least 1"),
    ("evaluation.fine_tune_epochs=0", r"evaluation.fine_tune_epochs = 0: expected at least 1"),
    ("data.alpha=-1", r"data.alpha = -1.0: expected a finite standard deviation >= 0"),
    ("data.beta=inf", r"data.beta = inf: expected a finite standard deviation >= 0"),
    ("algorithm.cohort_size=101", r"algorithm.cohort_size = 101: expected at most data.num_clients = 100, "
                                  r"the number of clients"),
    ("algorithm.server_momentum=1.5", r"algorithm.server_momentum = 1.5: expected a momentum in \[0, 1\)"),
    ("data.held_out_fraction=1", r"data.held_out_fraction = 1.0: expected a fraction in \(0, 1\)"),
    ("data.held_out_fraction=0", r"data.held_out_fraction = 0.0: expected a fraction in \(0, 1\)"),
    ("data.held_out_fraction=-0.1", r"data.held_out_fraction = -0.1: expected a fraction in \(0, 1\)"),
    ("evaluation.fine_tune_optimizer=rmsprop", r"evaluation.fine_tune_optimizer = 'rmsprop'"),
    ("model.name=resnet", r"model.name = 'resnet': expected one of"),
    ("evaluation.thresholds=[0.5, 2]", r"evaluation.thresholds = \(0.5, 2.0\): expected accuracies in \(0, 1\]"),
    ("algorithm.name=two_stage", r"algorithm.switch_round = None: expected a round >= 1 for two_stage"),
    ("rounds", r"--set 'rounds': expected key=value"),
    ("engine.workers=-1", r"engine.workers = -1: expected 0 \(in-process\) or more worker processes"),
    ("engine.bfloat16=1", r"engine.bfloat16 = 1: expected true, false or 'auto'"),
    ("engine.bfloat16=yes", r"engine.bfloat16 = 'yes': expected true, false or 'auto'"),
])
def test_bad_values_name_the_key_and_the_value(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_cohort_larger_than_max_clients_of_a_loaded_dataset_is_rejected_before_loading():
    with pytest.raises(ConfigError, match=r"algorithm.cohort_size = 10: expected at most data.max_clients = 5"):
        load_config(None, ["data.kind=emnist", "data.max_clients=5"])


def test_centralized_ignores_the_cohort_size():
    config = load_config(None, ["algorithm.name=centralized", "data.num_clients=5"])

    assert config.algorithm.cohort_size == 10


def test_momentum_with_a_non_sgd_server_optimizer_is_rejected():
    with pytest.raises(ConfigError, match="momentum is SGD's"):
        load_config(None, ["algorithm.server_optimizer=adam", "algorithm.server_momentum=0.9"])


def test_errors_in_a_file_name_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("rounds = -2\n")

    with pytest.raises(ConfigError, match=r"bad.toml: rounds = -2"):
        load_config(path)


def test_a_section_that_is_not_a_table_names_the_file_and_the_key(tmp_path):
    path = tmp_path / "flat.toml"
    path.write_text('algorithm = "fedavg"\n')

    with pytest.raises(ConfigError, match=r"flat.toml: algorithm = 'fedavg': expected a table"):
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


def test_an_integer_too_large_for_a_float_is_a_config_error():
    # found by fuzzing: float() raised OverflowError
    with pytest.raises(ConfigError, match=r"data.held_out_fraction = 1(0{400}): expected a float \(this integer "
                                          r"is too large for one\)"):
        load_config(None, [f"data.held_out_fraction={10**400}"])


LIMITED_INT_DIGITS = pytest.mark.skipif(not hasattr(sys, "get_int_max_str_digits"),
                                        reason="this Python reads integers of any length")


@LIMITED_INT_DIGITS
def test_an_integer_too_long_for_python_is_read_as_a_word():
    # tomllib raises a plain ValueError (not TOMLDecodeError) past Python's 4300 digits
    with pytest.raises(ConfigError, match=r"seed = '9{5000}': expected an int"):
        load_config(None, ["seed=" + "9" * 5000])


def test_a_value_nested_too_deeply_is_a_config_error():
    # tomllib raised RecursionError
    with pytest.raises(ConfigError, match=r"--set rounds=\.\.\.: the value is nested too deeply"):
        load_config(None, ["rounds=" + "[" * 5000 + "]" * 5000])


@pytest.mark.parametrize("text, message", [
    (b"name = 'caf\xe9'\n", r"bad.toml: invalid TOML: not UTF-8 text \(byte 0xe9 at offset 11\)"),
    (b"rounds = " + b"[" * 5000 + b"]" * 5000, r"bad.toml: invalid TOML: nested too deeply"),
    pytest.param(b"seed = " + b"9" * 5000, r"bad.toml: invalid TOML: Exceeds the limit \(4300 digits\)",
                 marks=LIMITED_INT_DIGITS),
])
def test_a_config_file_python_cannot_parse_names_the_file(tmp_path, text, message):
    (tmp_path / "bad.toml").write_bytes(text)

    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "bad.toml")


def test_a_directory_given_as_the_config_names_it(tmp_path):
    with pytest.raises(ConfigError, match=rf"{tmp_path}: cannot read the config file \(Is a directory\)"):
        load_config(tmp_path)


def test_the_task_defaults_to_cross_entropy_and_its_metrics_follow_the_loss():
    default, regression = load_config(None), load_config(None, ["task.loss=mse"])

    assert (default.task.loss, default.task.metric_names) == ("cross_entropy", ("accuracy",))
    assert regression.task.metric_names == ("mse", "mae")
    assert load_config(None, ["task.loss=mypkg.losses:huber"]).task.metric_names == ()  # reports its loss


def test_model_data_loss_and_metrics_may_be_import_paths_of_ones_own():
    config = load_config(None, ["model.name=mypkg.models:resnet18", "data.kind=mypkg.data:load",
                                "task.loss=torch.nn.functional:huber_loss", "task.metrics=['mae', 'mypkg.m:r2']"])

    assert (config.model_name, config.data.kind) == ("mypkg.models:resnet18", "mypkg.data:load")
    assert config.task.metrics == ("mae", "mypkg.m:r2")


@pytest.mark.parametrize("override, message", [
    ("task.loss=hinge", r"^task.loss = 'hinge': expected one of 'cross_entropy', 'mse', 'mae', 'bce_with_logits', "
                        r"or an import path 'package.module:name' of your own$"),
    ("task.metrics=['mae', 'r2']", r"^task.metrics\[1\] = 'r2': expected one of 'accuracy', 'mse', 'mae', "
                                   r"'label_accuracy', 'digit_accuracy', 'letter_accuracy', 'upper_accuracy', "
                                   r"'lower_accuracy', or an import path"),
    ("task.metrics=['mae', 'mae']", r"^task.metrics = \['mae', 'mae'\]: expected distinct metrics$"),
    ("model.name=mypkg.models.resnet18", r"^model.name = 'mypkg.models.resnet18': expected one of .*, or an import "
                                         r"path 'package.module:name' of your own$"),
    ("data.kind=mypkg.data:load", r"^model.name = None: expected a model for data.kind = 'mypkg.data:load' \(only "
                                  r"the built-in kinds have a default model\)$"),
])
def test_a_bad_task_or_import_path_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_thresholds_are_accuracies_for_classification_and_any_positive_value_for_an_error():
    config = load_config(None, ["task.loss=mse", "evaluation.thresholds=[2.5]"])

    assert config.evaluation.thresholds == (2.5,)
    with pytest.raises(ConfigError, match=r"^evaluation.thresholds = \(0.5, 2.0\): expected accuracies in \(0, 1\]$"):
        load_config(None, ["task.loss=bce_with_logits", "evaluation.thresholds=[0.5, 2]"])
