"""Property-based tests of the config parser: generated tables, TOML files and --set strings.

Whatever comes in, the parser returns a config or raises ConfigError (a ValueError) with
a one-line message; a config it accepts survives being written as TOML and read back.
"""

import dataclasses
import typing

import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmeta.experiment.config import ConfigError, ExperimentConfig, config_from_dict, config_to_toml, load_config

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _sections() -> dict[str, list[str]]:
    hints = typing.get_type_hints(ExperimentConfig)
    return {f.name: [g.name for g in dataclasses.fields(hints[f.name])] if dataclasses.is_dataclass(hints[f.name])
            else [] for f in dataclasses.fields(ExperimentConfig)}


SECTIONS = _sections()
DOTTED_KEYS = sorted(k for k, fields in SECTIONS.items() if not fields) + sorted(
    f"{section}.{key}" for section, fields in SECTIONS.items() for key in fields)
WORDS = ["fedavg", "reptile", "two_stage", "centralized", "fedsgd", "emnist", "synthetic", "leaf_json",
         "shakespeare", "sgd", "adam", "skip", "retry", "fedavg_cnn", "char_lstm", "runs", ""]

WILD_SCALARS = (st.booleans() | st.integers() | st.floats() | st.text(max_size=10) | st.dates()
                | st.integers(-(10**400), 10**400))  # beyond a float, and beyond TOML's 64 bits
WILD = st.recursive(WILD_SCALARS, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
PLAUSIBLE = (st.integers(-3, 200) | st.floats(-1.0, 2.0) | st.sampled_from(WORDS) | st.booleans() | st.none()
             | st.lists(st.floats(0.0, 1.5), max_size=3))
VALUES = st.one_of(PLAUSIBLE, PLAUSIBLE, PLAUSIBLE, WILD)  # mostly near-valid, so checks past the first fire
UNKNOWN = st.one_of(st.just({}), st.just({}), st.just({}), st.dictionaries(st.text(max_size=8), WILD, max_size=1))


def with_unknown(known):
    return st.builds(lambda table, extra: {**extra, **table}, known, UNKNOWN)


RAW_CONFIGS = with_unknown(st.fixed_dictionaries({}, optional={
    name: st.one_of(with_unknown(st.fixed_dictionaries({}, optional=dict.fromkeys(fields, VALUES))), WILD)
    if fields else VALUES
    for name, fields in SECTIONS.items()
}))


def as_override_value(value):
    """How a user would type ``value`` after ``key=``; anything TOML cannot write inline as Python prints it."""
    if value is None:
        return "none"
    if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict) for v in value)):
        return str(value)
    return tomli_w.dumps({"v": value}).partition("=")[2].strip()


KEY_VALUE = st.builds(lambda key, value: f"{key}={value}",
                      st.one_of(st.sampled_from(DOTTED_KEYS), st.sampled_from(DOTTED_KEYS), st.text(max_size=12)),
                      st.one_of(VALUES.map(as_override_value), VALUES.map(as_override_value), st.text(max_size=12),
                                st.just("[1, 2")))
OVERRIDES = st.lists(st.one_of(KEY_VALUE, KEY_VALUE, KEY_VALUE, st.text(max_size=20)), max_size=3)


def parsed_or_refused(parse, prefix=""):
    """The parsed config, or None after checking the refusal is a one-line ConfigError starting with ``prefix``."""
    try:
        return parse()
    except ConfigError as error:
        message = str(error)
        assert message.startswith(prefix) and len(message) > len(prefix) and "\n" not in message, repr(message)
        return None


def assert_survives_toml(config, tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(config_to_toml(config))

    assert load_config(path) == config


@FUZZ
@given(raw=RAW_CONFIGS)
def test_generated_tables_give_a_config_or_a_one_line_config_error(tmp_path, raw):
    config = parsed_or_refused(lambda: config_from_dict(raw))

    if config is not None:
        assert_survives_toml(config, tmp_path)


@FUZZ
@given(overrides=OVERRIDES)
def test_generated_overrides_give_a_config_or_a_one_line_config_error(tmp_path, overrides):
    config = parsed_or_refused(lambda: load_config(None, overrides))

    if config is not None:
        assert_survives_toml(config, tmp_path)


def _without_none(value):
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value if v is not None]
    return value


@FUZZ
@given(raw=RAW_CONFIGS.map(_without_none), overrides=OVERRIDES)
def test_generated_toml_files_with_overrides_give_a_config_or_an_error_naming_the_file(tmp_path, raw, overrides):
    path = tmp_path / "fuzzed.toml"
    path.write_text(tomli_w.dumps(raw))

    config = parsed_or_refused(lambda: load_config(path, overrides), prefix=f"{path}: ")

    if config is not None:
        assert_survives_toml(config, tmp_path)


@FUZZ
@given(text=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_arbitrary_bytes_as_a_config_file_are_refused_naming_the_file(tmp_path, text):
    path = tmp_path / "noise.toml"
    path.write_bytes(text)

    config = parsed_or_refused(lambda: load_config(path), prefix=f"{path}: ")

    if config is not None:
        assert_survives_toml(config, tmp_path)
