"""The run loop: rounds of the configured algorithm, evaluated on held-out clients.

A run directory holds everything needed to trust and reuse the run:
``config.toml`` (resolved), ``metrics.jsonl`` (one line per round, written as it ends),
``evaluation.json`` (per-client numbers of the last evaluation) and ``checkpoint.pt``
(weights, server state and config; rewritten after every evaluation).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

from fedmeta.algorithms.algorithm import ServerState, init_state, run_round
from fedmeta.data.federated import ClientData, FederatedDataset
from fedmeta.evaluation.decomposition import Decomposition, decompose_client_update
from fedmeta.evaluation.personalization import PersonalizationReport, personalize
from fedmeta.evaluation.summary import rounds_to_threshold
from fedmeta.experiment.build import (
    build_dataset, build_engine, build_fine_tuning, build_initial_model, build_schedule,
)
from fedmeta.experiment.config import ExperimentConfig, config_from_dict, config_to_dict, config_to_toml, resolved
from fedmeta.params import Params, client_seed, get_weights

CHECKPOINT_FORMAT = "fedmeta.checkpoint/1"
TRACKED_ACCURACIES = ("initial/accuracy", "personalized/accuracy")


@dataclass(frozen=True)
class RunResult:
    """What a finished run leaves behind, in memory and in ``run_dir``."""

    run_dir: Path
    config: ExperimentConfig
    dataset: FederatedDataset
    history: list[dict[str, Any]]
    report: PersonalizationReport
    weights: Params


def new_run_dir(config: ExperimentConfig) -> Path:
    """``output_dir/<name>-<timestamp>``, with a suffix if that already exists."""
    base = Path(config.output_dir) / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir, suffix = base, 1
    while run_dir.exists():
        suffix += 1
        run_dir = base.with_name(f"{base.name}-{suffix}")
    run_dir.mkdir(parents=True)
    return run_dir


def evaluated_clients(dataset: FederatedDataset, max_clients: int | None) -> list[ClientData]:
    """The held-out clients an evaluation uses: all, or the first ``max_clients`` ids.

    The held-out split is already a seeded random draw, so its first ids are a fair sample.
    """
    clients = dataset.held_out_clients()
    return clients if max_clients is None else clients[:max_clients]


def _replace_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """Writes via a side file and renames it, so readers never see half a file."""
    partial = path.with_name(path.name + ".partial")
    write(partial)
    os.replace(partial, path)


def _write_json(path: Path, data: Any) -> None:
    _replace_atomically(path, lambda partial: partial.write_text(json.dumps(data, indent=1)))


def save_checkpoint(path: Path, config: ExperimentConfig, state: ServerState, rounds_done: int) -> None:
    """Writes the checkpoint atomically, so a crash never leaves a half-written file."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": config_to_dict(config),
        "rounds_done": rounds_done,
        "weights": state.weights,
        "server_state": {"aggregator": state.aggregator, "server": state.server, "stage": state.stage},
    }
    _replace_atomically(path, lambda partial: torch.save(payload, partial))


def load_checkpoint(path: str | Path) -> tuple[ExperimentConfig, Params, int]:
    """Reads a checkpoint (tensors and plain data only) into (config, weights, rounds done)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a file that is not a checkpoint
        raise ValueError(f"{path}: not a fedmeta checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a fedmeta checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    return config_from_dict(payload["config"]), payload["weights"], int(payload["rounds_done"])


def threshold_rounds(history: Sequence[dict[str, Any]], thresholds: Sequence[float]) -> dict[str, dict[str, int | None]]:
    """Rounds needed for each tracked accuracy to reach each threshold (None: never)."""
    return {
        key: {f"{t:g}": rounds_to_threshold(history, key, t) for t in thresholds}
        for key in TRACKED_ACCURACIES
    }


def _postfix(row: dict[str, Any]) -> dict[str, str]:
    shown = {"loss": f"{row['client/train_loss']:.3f}"}
    if "initial/accuracy" in row:
        shown["init"] = f"{row['initial/accuracy']:.3f}"
        shown["pers"] = f"{row['personalized/accuracy']:.3f}"
    return shown


def run_experiment(config: ExperimentConfig, *, progress: bool = True) -> RunResult:
    """Trains, evaluates and records one configured run; returns its results."""
    config = resolved(config)
    dataset = build_dataset(config.data, config.seed)
    model = build_initial_model(config, dataset)
    schedule = build_schedule(config.algorithm)
    fine_tune = build_fine_tuning(config.evaluation)
    held_out = evaluated_clients(dataset, config.evaluation.max_clients)
    pooled = [dataset.pooled_train()] if config.algorithm.name == "centralized" else None
    if pooled is None and config.algorithm.cohort_size > len(dataset.train_ids):
        raise ValueError(f"algorithm.cohort_size = {config.algorithm.cohort_size}: the dataset has only "
                         f"{len(dataset.train_ids)} training clients")

    run_dir = new_run_dir(config)
    (run_dir / "config.toml").write_text(config_to_toml(config))
    state = init_state(schedule, get_weights(model))
    engine = build_engine(config.engine, model, {**dataset.clients, **{c.client_id: c for c in pooled or ()}})
    history: list[dict[str, Any]] = []
    report = None
    bar = tqdm(range(config.rounds), desc=config.name, unit="round", disable=not progress, dynamic_ncols=True)
    with engine, open(run_dir / "metrics.jsonl", "w") as metrics_file:
        for round_idx in bar:
            cohort = pooled or dataset.sample_cohort(config.algorithm.cohort_size, config.seed, round_idx)
            state, metrics = run_round(schedule, state, cohort, engine=engine, seed=config.seed, round_idx=round_idx)
            row = {"round": round_idx, **metrics}
            last = round_idx == config.rounds - 1
            if last or (round_idx + 1) % config.evaluation.every == 0:
                started = time.perf_counter()
                bar.set_description(f"{config.name} (personalizing {len(held_out)} held-out clients)")
                report = personalize(model, state.weights, held_out, fine_tune, engine=engine,
                                     seed=config.seed, round_idx=round_idx)
                row.update(report.metrics())
                row["time/evaluation_seconds"] = time.perf_counter() - started
                save_checkpoint(run_dir / "checkpoint.pt", config, state, round_idx + 1)
                bar.set_description(config.name)
            history.append(row)
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
            bar.set_postfix(_postfix(row), refresh=False)
    evaluation = {"round": config.rounds - 1, **report.to_json(),
                  "rounds_to_threshold": threshold_rounds(history, config.evaluation.thresholds)}
    _write_json(run_dir / "evaluation.json", evaluation)
    return RunResult(run_dir, config, dataset, history, report, state.weights)


def _restore(path: str | Path, overrides: Sequence[str]) -> tuple[ExperimentConfig, FederatedDataset, Params, int]:
    """A checkpoint's config (with ``overrides``), its dataset, weights and rounds done."""
    saved, weights, rounds_done = load_checkpoint(path)
    config = config_from_dict(config_to_dict(saved), overrides)
    return config, build_dataset(config.data, config.seed), weights, rounds_done


def evaluate_checkpoint(path: str | Path, overrides: Sequence[str] = (), *,
                        clients: str = "held_out") -> tuple[ExperimentConfig, PersonalizationReport]:
    """Personalization evaluation of a saved model, on its run's held-out (or training) clients.

    ``overrides`` change the evaluation (``evaluation.fine_tune_lr=0.002``); the data
    and model come from the checkpoint's config.
    """
    config, dataset, weights, rounds_done = _restore(path, overrides)
    model = build_initial_model(config, dataset)
    fine_tune = build_fine_tuning(config.evaluation)
    if clients == "held_out":
        chosen = evaluated_clients(dataset, config.evaluation.max_clients)
    elif clients == "train":
        chosen = dataset.train_clients()[: config.evaluation.max_clients]
    else:
        raise ValueError(f"clients = {clients!r}: expected 'held_out' or 'train'")
    with build_engine(config.engine, model, {c.client_id: c for c in chosen}) as engine:
        report = personalize(model, weights, chosen, fine_tune, engine=engine, seed=config.seed,
                             round_idx=rounds_done - 1)
    return config, report


def decompose_checkpoint(path: str | Path, client_id: str | None = None,
                         overrides: Sequence[str] = ()) -> tuple[str, Decomposition, Params]:
    """The FedAvg decomposition of one client's next update from a saved model.

    Returns (client id, decomposition, the FedAvg gradient −Δ/β of the client update the
    algorithm actually runs), so the two can be compared. The client defaults to the
    first training client; its seed is the one it would get in the next round.
    """
    config, dataset, weights, rounds_done = _restore(path, overrides)
    client_id = client_id or dataset.train_ids[0]
    if client_id not in dataset.clients:
        raise ValueError(f"client {client_id!r} is not in the dataset (e.g. {', '.join(dataset.train_ids[:3])})")
    model = build_initial_model(config, dataset)
    update = build_schedule(config.algorithm).at(rounds_done)[1].client_update
    data = dataset.clients[client_id].train
    seed = client_seed(config.seed, rounds_done, client_id)
    decomposition = decompose_client_update(model, weights, data, update, seed)
    delta = update(model, weights, data, seed).delta
    return client_id, decomposition, {k: -d / update.lr for k, d in delta.items()}
