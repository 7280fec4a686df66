"""Each method's hyperparameters, chosen by a small search on training clients only.

The training clients of the first seed's split are split again (seeded, the same
fraction as the held-out split): the search trains on the rest with the comparison's
budget and scores a candidate by the mean personalized accuracy of the validation
clients, after the method's own personalization. Held-out clients are never read. Ties
go to the first candidate in grid order. Each trial is recorded in
``<output>/<scale>/search/<setting>-<method>-<candidate>.json`` and skipped when found
with the same config, so an interrupted search resumes.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np

from fedmeta.algorithms.algorithm import init_state, run_round
from fedmeta.data.federated import FederatedDataset
from fedmeta.evaluation.personalization import personalize
from fedmeta.experiment.build import (
    build_dataset, build_engine, build_initial_model, build_personalization, build_schedule,
)
from fedmeta.experiment.compare.methods import Method
from fedmeta.experiment.compare.plan import Scale, Setting, method_config
from fedmeta.experiment.config import ExperimentConfig, config_from_dict, config_to_dict
from fedmeta.experiment.run_dir import replace_atomically
from fedmeta.params import get_weights

SEARCH = "search"
"""The trials' folder under ``<output>/<scale>``."""


def candidates(method: Method, setting: Setting) -> list[dict[str, float]]:
    """Every point of the method's grid as config key → value, scaled knobs times the setting's client lr."""
    values = [[v * setting.client_lr if knob.scaled else v for v in knob.values] for knob in method.grid]
    return [{knob.key: value for knob, value in zip(method.grid, point)} for point in itertools.product(*values)]


def candidate_name(choice: Mapping[str, float]) -> str:
    """``mu=0.1`` (keys without their section), or ``default`` for an empty grid."""
    return ",".join(f"{key.split('.', 1)[1]}={value:g}" for key, value in choice.items()) or "default"


class Trial(NamedTuple):
    """One candidate's result: its values, its score (None: diverged) and the run's config."""

    choice: dict[str, float]
    score: float | None
    initial: float | None
    config: ExperimentConfig


def run_trial(config: ExperimentConfig, data: FederatedDataset) -> tuple[float | None, float | None]:
    """Trains ``config`` on the fitting clients; (mean personalized, mean initial) accuracy of the validation ones.

    None, None when a round's loss is not finite.
    """
    torch_model = build_initial_model(config, data)
    schedule = build_schedule(config.algorithm, config.model.personal, len(data.train_ids))
    state = init_state(schedule, get_weights(torch_model))
    clients = data.held_out_clients()[: config.evaluation.max_clients]
    with build_engine(config.engine, torch_model, data.clients) as engine:
        for round_idx in range(config.rounds):
            cohort = data.sample_cohort(config.algorithm.cohort_size, config.seed, round_idx)
            state, metrics = run_round(schedule, state, cohort, engine=engine, seed=config.seed, round_idx=round_idx)
            if not math.isfinite(metrics.get("client/train_loss", 0.0)):
                return None, None
        report = personalize(state.weights, clients, build_personalization(config), engine=engine, seed=config.seed,
                             round_idx=config.rounds - 1)
    personalized = report.personalized[-1].mean
    return (personalized if math.isfinite(personalized) else None), report.initial.mean


def _read(path: Path, config: ExperimentConfig) -> Trial | None:
    """The recorded trial at ``path`` if it ran this very config."""
    try:
        record = json.loads(path.read_text())
        if config_from_dict(record["config"]) != config:
            return None
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
    return Trial(record["choice"], record["score"], record["initial"], config)


def search(scale: Scale, setting: Setting, method: Method, output: Path, *,
           log: Callable[[str], None] = lambda _: None) -> list[Trial]:
    """Every candidate's trial, run or read back, in grid order (``setting.data.path`` filled in)."""
    seed = scale.seeds[0]
    folder = output / scale.name / SEARCH
    folder.mkdir(parents=True, exist_ok=True)
    data = None
    trials = []
    for choice in candidates(method, setting):
        name = f"{setting.name}-{method.name}-{candidate_name(choice)}"
        path = folder / f"{name}.json"
        if data is None:
            data = build_dataset(setting.data, seed).validation_split(seed)
        train_size = float(np.mean([data.clients[c].num_train for c in data.train_ids]))
        config = method_config(scale, setting, method, choice, seed, name=f"search-{name}",
                               output_dir=folder, train_size=train_size)
        found = _read(path, config)
        if found is not None:
            log(f"search {name}: recorded ({_shown(found.score)}); skipped")
            trials.append(found)
            continue
        log(f"search {name}: {config.rounds} rounds on {len(data.train_ids)} training clients, "
            f"scored on {min(len(data.held_out_ids), config.evaluation.max_clients or len(data.held_out_ids))} "
            "validation clients")
        score, initial = run_trial(config, data)
        record: dict[str, Any] = {"choice": choice, "score": score, "initial": initial,
                                  "config": config_to_dict(config)}
        replace_atomically(path, lambda file: file.write(json.dumps(record, indent=1).encode()))
        log(f"search {name}: {_shown(score)}")
        trials.append(Trial(choice, score, initial, config))
    return trials


def _shown(score: float | None) -> str:
    return "diverged" if score is None else f"validation personalized accuracy {score:.4f}"


def best(trials: list[Trial]) -> dict[str, float]:
    """The values of the best-scoring trial (the first of equals); a diverged one never wins over one that did not."""
    scored = [t for t in trials if t.score is not None]
    return dict(max(scored, key=lambda t: t.score).choice if scored else trials[0].choice)
