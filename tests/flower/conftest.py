"""A tiny experiment and what a Flower run of it must match: the same config run locally."""

from __future__ import annotations

import dataclasses
import os
import json
from pathlib import Path
from typing import Callable

import pytest
import torch

from fedmeta.experiment.checkpoint import read_checkpoint
from fedmeta.experiment.config import ExperimentConfig
from fedmeta.experiment.run import RunResult, run_experiment
from flower_cases import BIN, Processes
from run_cases import without_times

# the shared tiny experiment (tests/conftest.py), named flower, in cohorts of 4
FLOWER = ("name=flower", "algorithm.cohort_size=4")


def only_run_dir(output_dir: Path) -> Path:
    (run_dir,) = [p.parent for p in Path(output_dir).glob("*/checkpoint.pt")]
    return run_dir


def assert_same_run(flower_dir: Path, local: RunResult) -> None:
    """The Flower run directory holds the local run's weights, server state, metrics and evaluations, bit for bit."""
    checkpoint = read_checkpoint(flower_dir / "checkpoint.pt")
    rows = [json.loads(line) for line in (flower_dir / "metrics.jsonl").read_text().splitlines()]
    evaluation = json.loads((flower_dir / "evaluation.json").read_text())
    local_evaluation = json.loads((local.run_dir / "evaluation.json").read_text())

    assert dataclasses.replace(checkpoint.config, output_dir=local.config.output_dir) == local.config
    assert checkpoint.state.weights.keys() == local.weights.keys()
    for key, weight in local.weights.items():
        torch.testing.assert_close(checkpoint.state.weights[key], weight, rtol=0, atol=0)
    local_state = read_checkpoint(local.run_dir / "checkpoint.pt").state
    assert checkpoint.state.stage == local_state.stage
    torch.testing.assert_close(checkpoint.state.server, local_state.server, rtol=0, atol=0)
    assert without_times(rows) == without_times(json.loads(json.dumps(local.history)))
    assert all("time/finished_at" in row for row in rows)
    assert evaluation == local_evaluation
    assert ((flower_dir / "evaluations.jsonl").read_text().splitlines()
            == (local.run_dir / "evaluations.jsonl").read_text().splitlines())
    provenance = json.loads((flower_dir / "provenance.json").read_text())
    assert provenance["started"].keys() == json.loads((local.run_dir / "provenance.json").read_text())["started"].keys()


@pytest.fixture(scope="session")
def tiny(tiny_config) -> Callable[..., ExperimentConfig]:
    """Builds the tiny config for Flower writing into a directory, with overrides."""
    return lambda output_dir, *overrides: tiny_config(output_dir, *FLOWER, *overrides)


@pytest.fixture
def same_run():
    """Asserts that the one run directory under a Flower run's output_dir matches a local run."""
    return lambda output_dir, local: assert_same_run(only_run_dir(output_dir), local)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, tiny):
    """Runs the tiny config, with overrides, locally on fedmeta's in-process engine.

    Once per module and overrides: the tests only read the run.
    """
    runs: dict[tuple[str, ...], RunResult] = {}

    def run(*overrides: str) -> RunResult:
        if overrides not in runs:
            runs[overrides] = run_experiment(tiny(tmp_path_factory.mktemp("local"), *overrides), progress=False)
        return runs[overrides]

    return run


@pytest.fixture
def simulate(monkeypatch):
    """Runs a ServerApp and a ClientApp on Flower's simulation engine: three SuperNodes, one single-CPU Ray actor.

    ``flwr.simulation`` is imported here, not with the test modules: it costs a second, which
    every pytest worker would pay while collecting.
    """
    run_simulation = pytest.importorskip("flwr.simulation").run_simulation
    for variable in ("FLWR_TELEMETRY_ENABLED", "RAY_USAGE_STATS_ENABLED", "RAY_DEDUP_LOGS"):
        monkeypatch.setenv(variable, "0")
    # one actor: the machine's cores are shared, and the order of work never changes a bit
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": 1, "num_gpus": 0, "include_dashboard": False}}
    return lambda server_app, client_app: run_simulation(server_app=server_app, client_app=client_app,
                                                         num_supernodes=3, backend_config=backend)


@pytest.fixture
def processes(tmp_path):
    """Flower's processes for a test, with ``FLWR_HOME`` in its directory; every one is stopped in teardown."""
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",  # how often a SuperExec looks for apps to start (1 s)
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    started = Processes(tmp_path, env)
    yield started
    started.stop()
