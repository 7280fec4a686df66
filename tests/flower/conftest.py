"""A tiny experiment and what a Flower run of it must match: the same config run locally."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from fedmeta.experiment.checkpoint import read_checkpoint
from fedmeta.experiment.config import ExperimentConfig, load_config
from fedmeta.experiment.run import RunResult, run_experiment

# 12 clients: 9 training, 3 held out; cohorts of 4; evaluated after rounds 1 and 2 (the last)
TINY = [
    "name=flower", "data.num_clients=12", "data.held_out_fraction=0.25", "rounds=3", "algorithm.cohort_size=4",
    "evaluation.every=2", "evaluation.fine_tune_epochs=2", "engine.workers=0",
]


def tiny_config(output_dir: Path, *overrides: str) -> ExperimentConfig:
    return load_config(None, [*TINY, f"output_dir={output_dir}", *overrides])


def without_times(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in history]


def only_run_dir(output_dir: Path) -> Path:
    (run_dir,) = [p.parent for p in Path(output_dir).glob("*/checkpoint.pt")]
    return run_dir


def assert_same_run(flower_dir: Path, local: RunResult) -> None:
    """The Flower run directory holds the local run's weights, server state, metrics and evaluation, bit for bit."""
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
    assert evaluation == local_evaluation


@pytest.fixture
def tiny():
    """Builds the tiny config writing into a directory, with overrides."""
    return tiny_config


@pytest.fixture
def same_run():
    """Asserts that the one run directory under a Flower run's output_dir matches a local run."""
    return lambda output_dir, local: assert_same_run(only_run_dir(output_dir), local)


@pytest.fixture
def local_run(tmp_path):
    """Runs the tiny config, with overrides, locally on fedmeta's in-process engine."""

    def run(*overrides: str) -> RunResult:
        return run_experiment(tiny_config(tmp_path / "local", *overrides), progress=False)

    return run
