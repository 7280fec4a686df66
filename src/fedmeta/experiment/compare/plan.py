"""What ``fedmeta compare`` runs at each scale, and the budget arithmetic that makes it fair.

Every method gets the same budget: ``Setting.budget`` client training samples over its
whole run. A method's rounds are the budget over its samples per round, which is the
cohort size times ``Method.samples_per_client`` (FedAvg(E=1): a pass over the client's
data; MAML(K): K + 1 batches; ...), with the mean train size of the seed's training
clients. Two-stage spends half the budget in each stage. Local-only trains nothing
(one round, to evaluate). Each (setting, method, seed) is one resumable run named
``<setting>-<method>-s<seed>``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Mapping, NamedTuple

import numpy as np

from fedmeta.experiment.build import build_dataset
from fedmeta.experiment.compare.methods import METHODS, Method
from fedmeta.experiment.config import (
    AlgorithmConfig, DataConfig, EngineConfig, EvaluationConfig, ExperimentConfig, ModelConfig,
)
from fedmeta.experiment.reproduce.plan import (
    EVALUATION_SECONDS, ROUND_OVERHEAD_SECONDS, SAMPLES_PER_SECOND, RunSpec, find_dataset,
)

MIN_SEEDS = 3
"""A report needs at least this many seeds: its intervals are over the seeds' means."""


class Setting(NamedTuple):
    """One dataset as the comparison uses it, with its model, client optimizer and budget.

    ``data.path`` is filled in from the data directory; ``budget`` is the client
    training samples every method spends; ``workers`` is the engine's (0: in-process);
    ``head`` is the model's output layer, which FedRep's and FedPer's clients keep. Each
    run is evaluated ``evaluations`` times, evenly spaced, the last round always, on
    ``held_out_clients`` held-out clients (None: all): per dataset, since fine-tuning an
    LSTM on a role costs ten times a CNN on a writer.
    """

    name: str
    data: DataConfig
    model: str
    client_lr: float
    client_batch_size: int
    cohort_size: int
    budget: int
    head: tuple[str, ...]
    workers: int | None = None
    evaluations: int = 3
    held_out_clients: int | None = None


@dataclass(frozen=True)
class Scale:
    """The settings, seeds and fine-tuning epochs of one scale."""

    name: str
    settings: tuple[Setting, ...]
    seeds: tuple[int, ...]
    fine_tune_epochs: int
    note: str = ""

    def setting(self, name: str) -> Setting:
        for setting in self.settings:
            if setting.name == name:
                return setting
        raise ValueError(f"dataset {name!r}: scale {self.name!r} has {', '.join(s.name for s in self.settings)}")


SEEDS = (42, 43, 44)
# a two-layer perceptron, so that FedRep and FedPer have a body to share
_SYNTHETIC = {"model": "mlp", "head": ("fc2",), "client_lr": 0.05, "client_batch_size": 20}
_FEMNIST = {"model": "fedavg_cnn", "head": ("classifier.3",), "client_lr": 0.02,  # the paper's client SGD
            "client_batch_size": 20}
_SHAKESPEARE = {"model": "char_lstm", "head": ("output",), "client_lr": 1.0,  # the shipped config's
                "client_batch_size": 10}

SCALES: dict[str, Scale] = {
    # the tests' scale: every code path in seconds on 20 synthetic clients; its numbers mean nothing
    "smoke": Scale(
        "smoke", settings=(Setting("synthetic", DataConfig(num_clients=20), cohort_size=3, budget=2_000, workers=0,
                                   evaluations=2, held_out_clients=4, **_SYNTHETIC),),
        seeds=SEEDS, fine_tune_epochs=1,
        note="The smoke scale checks that every step runs, on 20 synthetic clients. Its numbers mean nothing.",
    ),
    # minutes on 2 cores: Synthetic(0.5, 0.5) and the more heterogeneous Synthetic(1, 1) of FedProx and pFedMe
    "quick": Scale(
        "quick", settings=(
            Setting("synthetic", DataConfig(num_clients=100), cohort_size=10, budget=60_000, workers=0,
                    **_SYNTHETIC),
            Setting("synthetic_1_1", DataConfig(num_clients=100, alpha=1.0, beta=1.0), cohort_size=10,
                    budget=60_000, workers=0, **_SYNTHETIC),
        ),
        seeds=SEEDS, fine_tune_epochs=2,
        note="The quick scale compares the methods on synthetic data alone, in minutes: 100 clients each of "
             "Synthetic(0.5, 0.5) and Synthetic(1, 1), every held-out client evaluated. Real data, FEMNIST and "
             "Shakespeare, is `--scale full`.",
    ),
    # FEMNIST's 396 writers and Shakespeare's 715 roles: about 90 and 60 minutes of runs on 2 cores (estimated_seconds),
    # each with its search on top
    "full": Scale(
        "full", settings=(
            Setting("femnist", DataConfig(kind="emnist"), cohort_size=10, budget=120_000, workers=2,
                    evaluations=4, held_out_clients=60, **_FEMNIST),
            Setting("shakespeare", DataConfig(kind="shakespeare"), cohort_size=10, budget=15_000,
                    workers=2, evaluations=3, held_out_clients=20, **_SHAKESPEARE),
        ),
        seeds=SEEDS, fine_tune_epochs=2,
        note="The full scale: every FEMNIST writer and Shakespeare role, at budgets chosen so that each dataset "
             "takes one to two hours on 2 cores, its search included; 60 held-out writers and 20 held-out roles "
             "per run are evaluated.",
    ),
}

_LINEAR_SAMPLES_PER_SECOND = 40_000.0
"""Logistic regression on Synthetic, one core (measured)."""
_COST = {"maml": 3.0, "fomaml": 1.5, "perfedavg": 1.5}
"""How much more a trained sample costs than plain SGD's (extra gradients per batch)."""


def _samples_per_second(model: str) -> float:
    return SAMPLES_PER_SECOND.get(model, _LINEAR_SAMPLES_PER_SECOND)


@lru_cache(maxsize=16)
def mean_train(data: DataConfig, seed: int) -> float:
    """Mean train examples of the seed's training clients (the budget's unit for epoch-based methods)."""
    dataset = build_dataset(data, seed)
    return float(np.mean([dataset.clients[c].num_train for c in dataset.train_ids]))


def _rounds(budget: float, per_round: float) -> int:
    return max(1, round(budget / per_round))


def rounds_for(method: Method, algorithm: AlgorithmConfig, budget: int, train_size: float) -> tuple[int, int | None]:
    """(rounds, the two-stage switch round or None) that spend ``budget`` client samples.

    ``train_size`` is the mean train size of the training clients.
    """
    cohort = algorithm.cohort_size
    if method.name == "two_stage":
        switch = _rounds(budget / 2, cohort * algorithm.local_epochs * train_size)
        return switch + _rounds(budget / 2, cohort * algorithm.local_steps * algorithm.client_batch_size), switch
    per_round = cohort * method.samples_per_client(algorithm, train_size)
    return (1 if per_round == 0 else _rounds(budget, per_round)), None


def planned_samples(config: ExperimentConfig, train_size: float) -> float:
    """Client training samples a config spends, by the same arithmetic (checks ``rounds_for``)."""
    a = config.algorithm
    if a.name == "two_stage":
        return a.cohort_size * (a.switch_round * a.local_epochs * train_size
                                + (config.rounds - a.switch_round) * a.local_steps * a.client_batch_size)
    return config.rounds * a.cohort_size * METHODS[a.name].samples_per_client(a, train_size)


def method_config(scale: Scale, setting: Setting, method: Method, choice: Mapping[str, float], seed: int, *,
                  name: str, output_dir: Path, train_size: float) -> ExperimentConfig:
    """The run of ``method`` on ``setting`` at ``seed`` with the searched values ``choice`` (config keys)."""
    searched = {section: {k.split(".", 1)[1]: v for k, v in choice.items() if k.startswith(f"{section}.")}
                for section in ("algorithm", "evaluation")}
    # a placeholder switch round until the budget sets it (two-stage checks it has one)
    algorithm = AlgorithmConfig(**{"name": method.name, "cohort_size": setting.cohort_size,
                                   "client_lr": setting.client_lr, "inner_lr": setting.client_lr,
                                   "client_batch_size": setting.client_batch_size, **method.fixed,
                                   **searched["algorithm"], "switch_round": 1})
    rounds, switch = rounds_for(method, algorithm, setting.budget, train_size)
    algorithm = replace(algorithm, switch_round=switch)
    evaluation = EvaluationConfig(every=-(-rounds // setting.evaluations), max_clients=setting.held_out_clients,
                                  fine_tune_epochs=method.fine_tune_epochs or scale.fine_tune_epochs,
                                  **{"fine_tune_lr": setting.client_lr,
                                     "fine_tune_batch_size": setting.client_batch_size, **searched["evaluation"]})
    model = ModelConfig(setting.model, personal=setting.head if method.personal_head else ())
    return ExperimentConfig(
        name=name, seed=seed, rounds=rounds, output_dir=str(output_dir), checkpoint_every=min(5, evaluation.every),
        data=setting.data, model=model, algorithm=algorithm, evaluation=evaluation,
        engine=EngineConfig(workers=setting.workers),
    )


def with_data(setting: Setting, data_dir: Path, source: str | None = None) -> Setting:
    """The setting with ``data.path`` set to where its files are (synthetic needs none)."""
    if setting.data.kind == "synthetic":
        return setting
    return setting._replace(data=replace(setting.data, path=str(find_dataset(data_dir, setting.data.kind, source))))


def run_spec(scale: Scale, setting: Setting, method: Method, choice: Mapping[str, float], seed: int,
             output: Path) -> RunSpec:
    """The comparison run of a method at a seed (``setting.data.path`` already filled in)."""
    name = f"{setting.name}-{method.name}-s{seed}"
    return RunSpec(name, method_config(scale, setting, method, choice, seed, name=name,
                                       output_dir=output / scale.name / "runs",
                                       train_size=mean_train(setting.data, seed)))


def estimated_seconds(config: ExperimentConfig) -> float:
    """Rough wall time of a run on 2 cores, from the costs measured for ``fedmeta reproduce``."""
    a, e = config.algorithm, config.evaluation
    train_size = 150.0 if config.data.kind == "synthetic" else 136.0 if config.data.kind == "emnist" else 55.0
    samples = planned_samples(config, train_size) * _COST.get(a.name, 1.0)
    evaluations = math.ceil(config.rounds / e.every)
    clients = e.max_clients or 100
    evaluation = evaluations * clients * e.fine_tune_epochs * EVALUATION_SECONDS.get(config.model_name, 0.002)
    return samples / _samples_per_second(config.model_name) + config.rounds * ROUND_OVERHEAD_SECONDS + evaluation
