"""A fedmeta experiment as a Flower App: its run config and its project directory.

Flower ships an App to the SuperLink and every SuperNode as a bundle built from a
directory whose ``pyproject.toml`` names the ServerApp and ClientApp and holds the run
config. The run config here *is* the experiment config, table for table
(``[tool.flwr.app.config.algorithm]`` is ``[algorithm]``), so ``flwr run --run-config
'rounds=50 algorithm.client_lr=0.05'`` overrides keys just as ``fedmeta run --set`` does.
Flower's run config holds scalars only; a list (``evaluation.thresholds``) travels as its
TOML text.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import typing
from pathlib import Path
from typing import Any, Mapping

import tomli_w

from fedmeta.algorithms.faults import Faults
from fedmeta.experiment.config import ConfigError, ExperimentConfig, config_from_dict, config_to_dict

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

SERVER_APP = "fedmeta.flower.server:server_app"
CLIENT_APP = "fedmeta.flower.client:client_app"
SECURE_CLIENT_APP = "fedmeta.flower.client:secure_client_app"
FLOWER_REQUIREMENT = "flwr[simulation]>=1.42,<1.43"
APP_NAME = re.compile(r"[A-Za-z][A-Za-z0-9-]{0,63}")
"""Flower's rule for an App's (and its directory's) name."""
SECURE_ALGORITHMS = ("fedsgd", "fedavg", "fedprox", "ditto", "fedrep", "fedper")
"""The algorithms whose aggregator SecAgg+'s weighted mean is: the mean weighted by examples."""


def check_secure(config: ExperimentConfig) -> None:
    """Raises ValueError for a config that SecAgg+ cannot aggregate as ``fedmeta run`` would."""
    name = config.algorithm.name
    if name not in SECURE_ALGORITHMS:
        raise ValueError(f"flower.secagg = true with algorithm.name = {name!r}: SecAgg+ gives the mean weighted by "
                         f"examples, the aggregator of {', '.join(SECURE_ALGORITHMS)} only")
    if config.faults != Faults():
        raise ValueError("flower.secagg = true with [faults]: the fault rules judge each client's update, which "
                         "the server never sees under SecAgg+; leave [faults] out")
    privacy = config.privacy
    if privacy.enabled and privacy.target_quantile is not None:
        raise ValueError("flower.secagg = true with privacy.target_quantile: adaptive clipping counts the clipped "
                         "clients one by one, which the server never sees under SecAgg+; use a fixed privacy.clip")
    if privacy.enabled and privacy.sampling != "fixed":
        raise ValueError(f"flower.secagg = true with privacy.sampling = {privacy.sampling!r}: a deployment draws "
                         "fixed-size cohorts; set privacy.sampling = 'fixed'")
    if privacy.enabled and not privacy.clip <= config.flower.clipping_range:
        raise ValueError(f"flower.clipping_range = {config.flower.clipping_range:g}: expected at least privacy.clip "
                         f"= {privacy.clip:g}, or SecAgg+ would clip the clipped sum again")


def _lists_as_text(values: Any) -> Any:
    if isinstance(values, dict):
        return {k: _lists_as_text(v) for k, v in values.items() if v is not None}
    if isinstance(values, list):
        return "[" + ", ".join(tomli_w.dumps({"v": v}).partition("=")[2].strip() for v in values) + "]"
    return values


def run_config(config: ExperimentConfig) -> dict[str, Any]:
    """The experiment as a Flower run config: nested tables of scalars, unset keys left out."""
    return _lists_as_text(config_to_dict(config))


def _nest(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Flower flattens tables into dotted keys (``algorithm.client_lr``); this undoes it."""
    nested: dict[str, Any] = {}
    for key, value in run_config.items():
        if isinstance(value, Mapping):
            value = _nest(value)
        *tables, last = key.split(".")
        table = nested
        for name in tables:
            table = table.setdefault(name, {})
        if isinstance(value, dict) and isinstance(table.get(last), dict):
            table[last].update(value)
        else:
            table[last] = value
    return nested


def _text_as_lists(cls: type, values: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Parses the TOML text of list-valued keys back into lists (see ``run_config``)."""
    hints = typing.get_type_hints(cls)
    decoded = dict(values)
    for field in dataclasses.fields(cls):
        value, kind = values.get(field.name), hints[field.name]
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            decoded[field.name] = _text_as_lists(kind, value, f"{prefix}{field.name}.")
        elif typing.get_origin(kind) is tuple and isinstance(value, str):
            try:
                decoded[field.name] = tomllib.loads(f"v = {value}")["v"]
            except ValueError:
                decoded[field.name] = None
            if not isinstance(decoded[field.name], list):
                raise ConfigError(f"{prefix}{field.name} = {value!r}: expected a TOML list, e.g. '[0.7, 0.8]'")
    return decoded


def experiment_config(run_config: Mapping[str, Any]) -> ExperimentConfig:
    """The experiment a Flower run config describes (the inverse of ``run_config``)."""
    return config_from_dict(_text_as_lists(ExperimentConfig, _nest(run_config), ""))


def app_pyproject(config: ExperimentConfig, name: str) -> str:
    """The ``pyproject.toml`` of a Flower App that runs ``config`` with fedmeta's apps.

    Its only dependency is Flower: fedmeta itself must be installed where the SuperLink
    and the SuperNodes run, so that no node installs anything at run time.
    """
    if not APP_NAME.fullmatch(name):
        raise ValueError(f"Flower App name {name!r}: start with a letter and use letters, digits and "
                         "hyphens only (at most 64), e.g. 'fedmeta-app'")
    project = {
        "project": {
            "name": name,
            "version": "1.0.0",
            "description": f"fedmeta experiment {config.name!r} as a Flower App",
            "license": "Apache-2.0",
            "dependencies": [FLOWER_REQUIREMENT],
        },
        "tool": {"flwr": {"app": {
            "publisher": "fedmeta",
            "components": {"serverapp": SERVER_APP,
                           "clientapp": SECURE_CLIENT_APP if config.flower.secagg else CLIENT_APP},
            "config": run_config(config),
        }}},
    }
    header = ("# A fedmeta experiment as a Flower App, written by `fedmeta flower app`.\n"
              "# [tool.flwr.app.config] is the experiment config; override keys with\n"
              "# flwr run --run-config 'rounds=10 algorithm.client_lr=0.05'\n")
    return header + tomli_w.dumps(project)


def check_deployable(config: ExperimentConfig) -> None:
    """Raises ValueError for an experiment a Flower deployment cannot run: the centralized baseline, DP-FedAvg
    without SecAgg+, what SecAgg+ cannot aggregate (``check_secure``), a task other than classification by
    cross-entropy and accuracy."""
    if config.algorithm.name == "centralized":
        raise ValueError("algorithm.name = 'centralized' pools every client's data in one place, which a "
                         "Flower deployment never does; choose a federated algorithm")
    if config.privacy.enabled and not config.flower.secagg:
        raise ValueError("[privacy] on Flower needs flower.secagg = true: the SuperNodes clip the updates and the "
                         "server noises their sum, which it must not see one by one; set flower.secagg = true")
    if config.flower.secagg:
        check_secure(config)
    if config.task.loss != "cross_entropy" or config.task.metric_names != ("accuracy",):
        raise ValueError(f"[task] loss = {config.task.loss!r}: a Flower deployment trains on cross-entropy and "
                         "reports accuracy; run other tasks with `fedmeta run` or fedmeta.Experiment")


def write_app(config: ExperimentConfig, directory: str | Path) -> Path:
    """Writes a Flower App directory for ``config``; the directory's name is the App's.

    Returns the ``pyproject.toml`` written. An existing one is left alone (ValueError), so
    that a hand-edited App is never overwritten; an experiment a deployment cannot run
    (``check_deployable``) is refused before anything is written.
    """
    check_deployable(config)
    directory = Path(directory)
    path = directory / "pyproject.toml"
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory}: a file, not a directory; choose a new directory for the Flower App")
    if path.exists():
        raise ValueError(f"{path} already exists; choose a new directory for the Flower App")
    text = app_pyproject(config, directory.resolve().name)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as error:  # a file among its parents, no permission, a full disk
        raise ValueError(f"{path}: cannot write the Flower App ({error.strerror or error})") from None
    return path
