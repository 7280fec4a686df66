"""Configs from the command line: run --help lists the shipped ones; config show prints one with every key."""

import dataclasses
import re
import sys
import typing
from pathlib import Path

import pytest

import fedmeta
from fedmeta.cli import main
from fedmeta.experiment.config import ExperimentConfig, config_from_dict, load_config, resolved

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


def every_key(cls=ExperimentConfig, prefix=""):
    """Every key a config has, as ``section.key``, from the dataclasses."""
    keys = []
    types = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(types[field.name]):
            keys += every_key(types[field.name], f"{prefix}{field.name}.")
        else:
            keys.append(f"{prefix}{field.name}")
    return keys


def shown_keys(text):
    """The keys of ``config show`` output: set ones from the TOML, unset ones from their comments."""
    keys, section = [], ""
    for line in text.splitlines():
        if header := re.fullmatch(r"\[(\w+)\]", line):
            section = f"{header[1]}."
        elif key := re.match(r"(?:# )?(\w+)(?: =|: unset$)", line):
            keys.append(section + key[1])
    return keys


def test_run_help_lists_every_shipped_config_with_its_data_model_algorithm_and_rounds(capsys):
    shipped = sorted(p.stem for p in (Path(fedmeta.__file__).parent / "configs").glob("*.toml"))

    with pytest.raises(SystemExit):
        main(["run", "--help"])

    out = capsys.readouterr().out
    listed = re.findall(r"^  (\w+) +\w+ data, ", out, re.MULTILINE)
    assert listed == shipped
    assert "  femnist            emnist data, fedavg_cnn, fedavg, 100 rounds\n" in out
    assert "  local_only         synthetic data, logistic_regression, local_only, 1 round\n" in out


def test_only_help_loads_the_shipped_configs(monkeypatch, capsys):
    import fedmeta.cli as cli

    loaded = []
    monkeypatch.setattr(cli, "shipped_configs", lambda: loaded.append(True) or "shipped configs: (listed)")

    assert main(["config", "show", "synthetic"]) == 0
    assert loaded == []
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert loaded == [True]
    assert capsys.readouterr().out.endswith("shipped configs: (listed)\n")


def test_without_the_privacy_extra_every_command_works_and_run_help_says_what_dp_fedavg_needs(capsys, monkeypatch):
    import fedmeta.experiment.config as config_module

    real = config_module.importlib.util.find_spec
    monkeypatch.setattr(config_module.importlib.util, "find_spec",
                        lambda name, *args: None if name == "dp_accounting" else real(name, *args))

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    code = main(["config", "show", "synthetic"])

    out = capsys.readouterr().out
    assert code == 0
    assert ('  dp_fedavg          [privacy]: dp-accounting is not installed; install it with pip install '
            '"fedmeta[privacy]"\n') in out
    assert "  synthetic          synthetic data, logistic_regression, fedavg, 50 rounds\n" in out


@pytest.mark.parametrize("name", ["femnist", None])
def test_config_show_prints_every_key_and_reads_back_as_the_resolved_config(capsys, name):
    overrides = ["rounds=7", "engine.workers=0"]

    code = main(["config", "show", *([name] if name else []), *[a for o in overrides for a in ("--set", o)]])

    out = capsys.readouterr().out
    assert code == 0
    assert shown_keys(out) == every_key()
    assert config_from_dict(tomllib.loads(out)) == resolved(load_config(name, overrides))


def test_config_show_of_an_unset_key_is_a_comment_and_of_a_bad_key_one_line(capsys):
    assert main(["config", "show"]) == 0
    shown = capsys.readouterr().out

    code = main(["config", "show", "--set", "algorithm.client_rl=0.1"])

    assert "[data]\nkind = \"synthetic\"\n# path: unset\n" in shown
    assert 'name = "logistic_regression"' in shown  # resolved: the model the data kind takes
    assert code == 2
    assert capsys.readouterr().err == ("fedmeta: error: unknown config key 'algorithm.client_rl'; did you mean "
                                       "'client_lr'?\n")
