"""The run loop: rounds of the configured algorithm, evaluated on held-out clients.

A run directory (``fedmeta.experiment.run_dir``) holds everything needed to trust,
reuse and continue the run; a checkpoint is written every ``checkpoint_every`` rounds and
after the last. ``resume_experiment`` continues a run from its checkpoint and ends with
the same bits as a run that never stopped. Either holds the run directory's lock while
it writes there.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from tqdm import tqdm

from fedmeta.algorithms.algorithm import Schedule, ServerState, init_state, run_round
from fedmeta.algorithms.client_update import LocalTraining
from fedmeta.algorithms.per_fedavg import AdaptationSteps
from fedmeta.client_work import ClientState
from fedmeta.data.federated import ClientData, FederatedDataset
from fedmeta.engine.execution import resolve_device
from fedmeta.engine.states import DiskStates, StateWriteError
from fedmeta.evaluation.decomposition import Decomposition, decompose_client_update
from fedmeta.evaluation.personalization import Personalization, PersonalizationReport, personalize
from fedmeta.evaluation.summary import rounds_to_threshold
from fedmeta.evaluation.tasks import CLASSIFICATION, Task
from fedmeta.evaluation.tuning import GRID, MAX_EPOCHS, Tuning, tune_fine_tuning
from fedmeta.experiment.build import build_engine, build_personalization, build_schedule
from fedmeta.experiment.checkpoint import (
    CLIENT_STATES_DIR, Checkpoint, check_against, read_checkpoint, save_checkpoint,
)
from fedmeta.experiment.config import (
    EngineConfig, ExperimentConfig, config_from_dict, config_to_dict, config_to_toml, load_config, parse_override,
    resolved,
)
from fedmeta.experiment.inputs import Given, RunInputs, build_inputs, recorded
from fedmeta.experiment.privacy import PrivateTraining, private_schedule
from fedmeta.experiment.provenance import provenance, utc_now
from fedmeta.experiment.run_dir import (
    CHECKPOINT, WriteError, add_provenance, append_evaluation, append_metrics, checkpoint_path, config_path,
    cut_evaluations, cut_metrics, locked, new_run_dir, open_metrics, read_metrics, write_config, write_evaluation,
    writing,
)
from fedmeta.experiment.tracking import open_trackers, require_trackers
from fedmeta.params import Params, client_seed, get_weights


@dataclass(frozen=True)
class RunResult:
    """What a finished run leaves behind, in memory and in ``run_dir``."""

    run_dir: Path
    config: ExperimentConfig
    dataset: FederatedDataset
    report: PersonalizationReport
    weights: Params
    client_states: Mapping[str, ClientState] = field(default_factory=dict)

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every round's metrics row, read from ``metrics.jsonl``.

        Read from disk rather than kept: a run's memory must not grow with its rounds.
        """
        return read_metrics(self.run_dir)


def evaluated_clients(dataset: FederatedDataset, max_clients: int | None) -> list[ClientData]:
    """The held-out clients an evaluation uses: all, or the first ``max_clients`` ids.

    The held-out split is already a seeded random draw, so its first ids are a fair sample.
    """
    clients = dataset.held_out_clients()
    return clients if max_clients is None else clients[:max_clients]


def threshold_rounds(history: Sequence[dict[str, Any]], thresholds: Sequence[float],
                     task: Task = CLASSIFICATION) -> dict[str, dict[str, int | None]]:
    """Rounds needed for the primary metric, initial and personalized, to reach each threshold (None: never)."""
    higher_is_better = task.higher_is_better[task.primary]
    return {
        key: {f"{t:g}": rounds_to_threshold(history, key, t, higher_is_better) for t in thresholds}
        for key in (f"initial/{task.primary}", f"personalized/{task.primary}")
    }


def _postfix(row: dict[str, Any], metric: str) -> dict[str, str]:
    shown = {"loss": f"{row['client/train_loss']:.3f}"} if "client/train_loss" in row else {}  # none came back
    if f"initial/{metric}" in row:
        shown["init"] = f"{row[f'initial/{metric}']:.3f}"
        shown["pers"] = f"{row[f'personalized/{metric}']:.3f}"
    return shown


class DivergenceError(ValueError):
    """The global loss diverged; the checkpoint on disk is the last one before it."""


@dataclass(frozen=True)
class _Parts:
    """What a config builds before the first round, for a new run and a resumed one alike."""

    dataset: FederatedDataset
    model: nn.Module
    schedule: Schedule
    fine_tune: Personalization
    held_out: list[ClientData]
    pooled: list[ClientData] | None
    privacy: PrivateTraining | None
    task: Task
    yardstick: tuple[float, str]

    @classmethod
    def build(cls, config: ExperimentConfig, given: Given) -> _Parts:
        require_trackers(config.logging)
        resolve_device(config.engine.device)  # a device this machine lacks stops the run before its directory
        inputs = build_inputs(config, given)
        dataset, model = inputs.dataset, inputs.model
        pooled = [dataset.pooled_train()] if config.algorithm.name == "centralized" else None
        if pooled is None and config.algorithm.cohort_size > len(dataset.train_ids):
            raise ValueError(f"algorithm.cohort_size = {config.algorithm.cohort_size}: the dataset has only "
                             f"{len(dataset.train_ids)} training clients")
        loss = inputs.task.loss
        schedule, privacy = private_schedule(config, build_schedule(config.algorithm, config.model.personal,
                                                                    len(dataset.train_ids), loss),
                                             len(dataset.train_ids), get_weights(model))
        return cls(dataset, model, schedule, build_personalization(config, loss),
                   evaluated_clients(dataset, config.evaluation.max_clients), pooled, privacy, inputs.task,
                   inputs.divergence_yardstick())


def _divergence(row: dict[str, Any], yardstick: tuple[float, str], factor: float) -> str | None:
    """Why the round's loss counts as diverged, or None.

    The yardstick is the loss of a trivial prediction (``RunInputs.divergence_yardstick``):
    ln(num_classes), the cross-entropy of a uniform guess, rather than the best loss so
    far: cohorts alone move the loss of a healthy run by 5x between rounds (the embedded
    default: 0.32 to 1.89), and a run broken from its first round has no good loss.
    """
    loss = row.get("client/train_loss")
    if loss is None:
        return None
    if not math.isfinite(loss):
        return f"diverged at round {row['round']}: client/train_loss = {loss} is not finite"
    value, described = yardstick
    if loss > factor * value:
        return (f"diverged at round {row['round']}: client/train_loss = {loss:.4g} is more than "
                f"divergence_factor = {factor:g} times {described}")
    return None


def _stopped(run_dir: Path, checkpointed: int) -> str:
    """What a run stopped by an error keeps on disk."""
    if checkpointed:
        return f"{checkpoint_path(run_dir)} keeps the run after {checkpointed} rounds"
    return "no checkpoint was written yet"


def _go_on(run_dir: Path, checkpointed: int) -> str:
    """How to go on once the cause of a stop is fixed."""
    if checkpointed:
        return f"continue with `fedmeta run --resume {run_dir}`"
    return f"start again with `fedmeta run {config_path(run_dir)}`"


def _train(config: ExperimentConfig, run_dir: Path, parts: _Parts, state: ServerState, rounds_done: int,
           evaluated: list[dict[str, Any]], *, progress: bool, client_states: Mapping[str, ClientState]) -> RunResult:
    """Runs rounds ``rounds_done`` to the end, appending to the run directory's files.

    ``client_states`` are the states the clients of a stateful method were left in (a
    checkpoint's, or none yet), in memory or in files (``DiskStates``); the engine holds
    them from then on, and every checkpoint saves (or names) them.

    ``evaluated`` holds the metrics rows of evaluated rounds so far (for rounds to each
    threshold); other rows go to ``metrics.jsonl`` only. A failed write (a full disk)
    stops the run with a WriteError saying what the directory still holds.
    """
    checkpointed = rounds_done
    report = None
    clients = {**parts.dataset.clients, **{c.client_id: c for c in parts.pooled or ()}}
    bar = tqdm(range(rounds_done, config.rounds), initial=rounds_done, total=config.rounds, desc=config.name,
               unit="round", disable=not progress, dynamic_ncols=True)
    try:
        with build_engine(config.engine, parts.model, clients) as engine, open_metrics(run_dir) as metrics_file, \
                open_trackers(config, run_dir, rounds_done) as trackers:
            engine.restore_client_states(client_states)
            for round_idx in bar:
                cohort = parts.pooled or (
                    parts.privacy.cohort(parts.dataset, config.seed, round_idx) if parts.privacy
                    else parts.dataset.sample_cohort(config.algorithm.cohort_size, config.seed, round_idx))
                state, metrics = run_round(parts.schedule, state, cohort, engine=engine, seed=config.seed,
                                           round_idx=round_idx, faults=config.faults)
                row = {"round": round_idx + 1, **metrics}  # rounds done, as the plots and thresholds count
                if parts.privacy:
                    row.update(parts.privacy.metrics(round_idx + 1, state.aggregator))
                diverged = _divergence(row, parts.yardstick, config.divergence_factor)
                if diverged:
                    append_metrics(metrics_file, {**row, "diverged": diverged, "time/finished_at": utc_now()})
                    trackers.log(row)
                    raise DivergenceError(f"{diverged}; stopped, {_stopped(run_dir, checkpointed)} (lower "
                                          "algorithm.client_lr or raise divergence_factor)")
                last = round_idx == config.rounds - 1
                if last or (round_idx + 1) % config.evaluation.every == 0:
                    started = time.perf_counter()
                    bar.set_description(f"{config.name} (personalizing {len(parts.held_out)} held-out clients)")
                    report = personalize(state.weights, parts.held_out, parts.fine_tune, engine=engine,
                                         seed=config.seed, round_idx=round_idx, task=parts.task)
                    row.update(report.metrics())
                    row["time/evaluation_seconds"] = time.perf_counter() - started
                    evaluation = {"round": round_idx + 1, **report.to_json()}
                    append_evaluation(run_dir, evaluation)
                    bar.set_description(config.name)
                    evaluated.append(row)
                row["time/finished_at"] = utc_now()
                append_metrics(metrics_file, row)
                trackers.log(row)
                if last:  # before the last checkpoint, which marks the run finished
                    privacy = ({"privacy": parts.privacy.summary(round_idx + 1, state.aggregator)}
                               if parts.privacy else {})
                    write_evaluation(run_dir, {**evaluation, "rounds_to_threshold":
                                               threshold_rounds(evaluated, config.evaluation.thresholds, parts.task),
                                               **privacy})
                if last or (round_idx + 1) % config.checkpoint_every == 0:
                    with writing(Path(metrics_file.name)):
                        os.fsync(metrics_file.fileno())  # the lines the checkpoint counts are on disk before it is
                    save_checkpoint(checkpoint_path(run_dir), Checkpoint(
                        config, state, round_idx + 1, metrics_file.tell(), torch.get_rng_state(),
                        engine.client_states()))
                    checkpointed = round_idx + 1
                bar.set_postfix(_postfix(row, parts.task.primary), refresh=False)
            final_states = engine.client_states()
    except (WriteError, StateWriteError) as error:
        raise WriteError(f"{error}; stopped, {_stopped(run_dir, checkpointed)}: free space or fix the "
                         f"directory, then {_go_on(run_dir, checkpointed)}") from None
    return RunResult(run_dir, config, parts.dataset, report, state.weights, final_states)


def run_experiment(config: ExperimentConfig, *, given: Given = Given(), progress: bool = True,
                   started: Callable[[Path], None] = lambda run_dir: None) -> RunResult:
    """Trains, evaluates and records one configured run in a new run directory; returns its results.

    ``given`` holds the parts passed from Python (model, dataset, loss, metrics) in place
    of the config's; the run's ``config.toml`` names each (``fedmeta.experiment.inputs``).
    ``started`` is called with the run directory once it exists (the CLI prints it, so
    that an interrupted run can be resumed). A run directory whose config or provenance
    could not be written holds nothing to resume and is removed.
    """
    config = resolved(recorded(config, given))
    parts = _Parts.build(config, given)
    run_dir = new_run_dir(config.output_dir, config.name)
    with ExitStack() as held:
        try:
            held.enter_context(locked(run_dir))
            write_config(run_dir, config_to_toml(config))
            add_provenance(run_dir, provenance(), resumed=False)
        except WriteError as error:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise WriteError(f"{error}; {run_dir} held nothing to resume and was removed") from None
        started(run_dir)
        state = init_state(parts.schedule, get_weights(parts.model))
        states = DiskStates(run_dir / CLIENT_STATES_DIR) if config.engine.client_states == "disk" else {}
        return _train(config, run_dir, parts, state, 0, [], progress=progress, client_states=states)


def _resumable_checkpoint(run_dir: Path) -> Checkpoint:
    """The run directory's checkpoint, if the run can continue from it and its config.toml agrees."""
    path = checkpoint_path(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from; the run stopped before its first "
                                f"checkpoint, so start it again with `fedmeta run {config_path(run_dir)}`")
    checkpoint = read_checkpoint(path)
    if checkpoint.metrics_offset is None:
        raise ValueError(f"{path}: written by an older fedmeta without resume data; it can be evaluated, "
                         "not resumed")
    if load_config(config_path(run_dir)) != checkpoint.config:
        raise ValueError(f"{config_path(run_dir)}: differs from the config in {path.name}; a resumed run "
                         "continues as it was configured, so start a new run to change it")
    if checkpoint.rounds_done >= checkpoint.config.rounds:
        raise ValueError(f"{run_dir}: the run already finished all {checkpoint.config.rounds} rounds; "
                         "nothing to resume")
    return checkpoint


def resume_experiment(run_dir: str | Path, *, given: Given = Given(), progress: bool = True,
                      started: Callable[[Path], None] = lambda run_dir: None) -> RunResult:
    """Continues a stopped run from its checkpoint, appending to the same run directory.

    The run ends with the same weights, metrics (but for ``time/*``) and evaluation as if
    it had never stopped. The config is the run's own: a changed ``config.toml``, a
    finished run, a directory without a checkpoint, a checkpoint that does not fit its
    config, or a directory another process is writing is refused with a message;
    ``started`` is called with the run directory once none is. ``given`` passes again
    the parts the run was given from Python that its config could not name.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    with ExitStack() as held:
        try:
            held.enter_context(locked(run_dir))
        except WriteError as error:
            raise WriteError(f"{error}; a resumed run writes to its run directory") from None
        checkpoint = _resumable_checkpoint(run_dir)
        config = checkpoint.config
        parts = _Parts.build(config, given)
        check_against(checkpoint_path(run_dir), checkpoint, parts.schedule, get_weights(parts.model))
        kept = cut_metrics(run_dir, checkpoint.metrics_offset, checkpoint.rounds_done)
        cut_evaluations(run_dir, checkpoint.rounds_done)
        add_provenance(run_dir, provenance(), resumed=True)
        evaluated = [row for row in kept if f"initial/{parts.task.primary}" in row]
        torch.set_rng_state(checkpoint.torch_rng_state)
        started(run_dir)
        return _train(config, run_dir, parts, checkpoint.state, checkpoint.rounds_done, evaluated,
                      progress=progress, client_states=checkpoint.client_states)


def checkpoint_file(path: str | Path) -> Path:
    """The checkpoint ``path`` names: a run directory's ``checkpoint.pt``, or the file itself.

    A text file (a run's ``config.toml``, its metrics) is refused in one line saying what to
    give instead, before ``torch.load`` would call it no checkpoint for a less clear reason.
    """
    path = Path(path)
    if path.is_dir():
        if checkpoint_path(path).is_file():
            return checkpoint_path(path)
        if config_path(path).is_file():
            raise FileNotFoundError(f"{path}: no {CHECKPOINT} in this run directory; the run stopped before its "
                                    "first checkpoint")
        raise FileNotFoundError(f"{path}: a directory without {CHECKPOINT}; give a run directory or a checkpoint")
    if path.suffix in (".toml", ".json", ".jsonl"):
        run_dir = path.parent
        instead = (f"give its run directory {run_dir} (or {checkpoint_path(run_dir)})"
                   if checkpoint_path(run_dir).is_file() else "give a run directory or its checkpoint.pt")
        raise ValueError(f"{path}: a {path.suffix[1:].upper()} file, not a checkpoint; {instead}")
    return path


def evaluation_keys(config: ExperimentConfig) -> tuple[str, ...]:
    """The config keys an evaluation of a run of ``config`` reads, which ``evaluate_checkpoint`` lets overrides set.

    Those of the method's personalization rule (``build_personalization``), which
    held-out clients, where the data is and how the engine runs; the data, model and
    weights are the checkpoint's.
    """
    name = config.algorithm.name
    if name in ("fomaml", "maml", "perfedavg"):
        steps = "personalization_steps" if name == "perfedavg" else "inner_steps"
        rule = tuple(f"algorithm.{key}" for key in ("inner_lr", steps, "client_batch_size"))
    else:
        rule = tuple(f"evaluation.fine_tune_{key}" for key in ("epochs", "optimizer", "lr", "batch_size"))
        rule += ("algorithm.lam",) if name in ("ditto", "pfedme") else ()
    engine = tuple(f"engine.{f.name}" for f in dataclasses.fields(EngineConfig) if f.name != "client_states")
    return (*rule, "evaluation.max_clients", "data.path", *engine)


def _refuse_unused(overrides: Sequence[str], config: ExperimentConfig) -> None:
    """Raises ValueError for an override an evaluation would silently ignore, such as a training setting."""
    used = evaluation_keys(config)
    for text in overrides:
        key = ".".join(parse_override(text)[0])
        if key not in used:
            shown = [k for k in used if not k.startswith("engine.")]
            raise ValueError(f"--set {text}: eval does not use {key}; for a {config.algorithm.name} checkpoint it "
                             f"takes {', '.join(shown)} and engine.*")


def _restore(path: str | Path, overrides: Sequence[str], *, evaluation: bool = False, given: Given = Given(),
             ) -> tuple[Path, ExperimentConfig, RunInputs, Params, int]:
    """A checkpoint's file, config (with ``overrides``), dataset, model and task, weights and rounds done.

    ``path`` is a run directory or a checkpoint file; ``given`` passes again the parts the
    run was given from Python. The checkpoint is checked against the model and algorithm
    its config builds first; for an ``evaluation``, an override of a key the evaluation
    does not read is refused.
    """
    path = checkpoint_file(path)
    checkpoint = read_checkpoint(path)
    config = config_from_dict(config_to_dict(checkpoint.config), overrides)
    if evaluation:
        _refuse_unused(overrides, checkpoint.config)
    inputs = build_inputs(config, given)
    weights = get_weights(inputs.model)
    schedule, _ = private_schedule(checkpoint.config, build_schedule(checkpoint.config.algorithm,
                                                                     checkpoint.config.model.personal),
                                   len(inputs.dataset.train_ids), weights)
    check_against(path, checkpoint, schedule, weights)
    return path, config, inputs, checkpoint.state.weights, checkpoint.rounds_done


def evaluate_checkpoint(path: str | Path, overrides: Sequence[str] = (), *, clients: str = "held_out",
                        given: Given = Given()) -> tuple[ExperimentConfig, PersonalizationReport]:
    """Personalization evaluation of a saved model (a run directory or its checkpoint), on its run's held-out
    (or training) clients.

    ``overrides`` change the evaluation (``evaluation.fine_tune_lr=0.002``), and only it: a
    key it does not read (``evaluation_keys``) is refused. The data and model come from the
    checkpoint's config, or from ``given`` for the parts the run was given from Python.
    """
    _, config, inputs, weights, rounds_done = _restore(path, overrides, evaluation=True, given=given)
    dataset, model = inputs.dataset, inputs.model
    fine_tune = build_personalization(config, inputs.task.loss)
    if clients == "held_out":
        chosen = evaluated_clients(dataset, config.evaluation.max_clients)
    elif clients == "train":
        chosen = dataset.train_clients()[: config.evaluation.max_clients]
    else:
        raise ValueError(f"clients = {clients!r}: expected 'held_out' or 'train'")
    with build_engine(config.engine, model, {c.client_id: c for c in chosen}) as engine:
        report = personalize(weights, chosen, fine_tune, engine=engine, seed=config.seed,
                             round_idx=rounds_done - 1, task=inputs.task)
    return config, report


def tune_checkpoint(path: str | Path, overrides: Sequence[str] = (), *, given: Given = Given(),
                    grid: Sequence[tuple[str, float]] = GRID, max_epochs: int = MAX_EPOCHS
                    ) -> tuple[ExperimentConfig, Tuning, PersonalizationReport]:
    """Chooses how to fine-tune on a validation split of the run's training clients, then evaluates the held-out
    clients so (``fedmeta.evaluation.tuning``).

    Returns the config with the chosen ``evaluation.fine_tune_*``, the tuning and the
    held-out report. ``evaluation.max_clients`` caps the validation clients too; ``grid``
    and ``max_epochs`` are the candidates (``fedmeta eval --tune``'s by default).
    """
    _, config, inputs, weights, rounds_done = _restore(path, overrides, evaluation=True, given=given)
    if isinstance(build_personalization(config), AdaptationSteps):
        raise ValueError(f"--tune: {config.algorithm.name} personalizes by its own adaptation steps "
                         "(algorithm.inner_lr and its steps), not by evaluation.fine_tune_*; there is nothing to tune")
    dataset, cap = inputs.dataset, config.evaluation.max_clients
    validation = dataset.validation_split(config.seed).held_out_clients()[:cap]
    held_out = evaluated_clients(dataset, cap)

    def fine_tuning(optimizer: str, lr: float, epochs: int) -> Personalization:
        return build_personalization(_fine_tuned(config, optimizer, lr, epochs), inputs.task.loss)

    with build_engine(config.engine, inputs.model, {c.client_id: c for c in (*validation, *held_out)}) as engine:
        tuning = tune_fine_tuning(weights, validation, fine_tuning, engine=engine, seed=config.seed,
                                  round_idx=rounds_done - 1, task=inputs.task, grid=grid, max_epochs=max_epochs)
        chosen = _fine_tuned(config, tuning.optimizer, tuning.lr, tuning.epochs)
        report = personalize(weights, held_out, build_personalization(chosen, inputs.task.loss), engine=engine,
                             seed=config.seed, round_idx=rounds_done - 1, task=inputs.task)
    return chosen, tuning, report


def _fine_tuned(config: ExperimentConfig, optimizer: str, lr: float, epochs: int) -> ExperimentConfig:
    return dataclasses.replace(config, evaluation=dataclasses.replace(
        config.evaluation, fine_tune_optimizer=optimizer, fine_tune_lr=lr, fine_tune_epochs=epochs))


def decompose_checkpoint(path: str | Path, client_id: str | None = None,
                         overrides: Sequence[str] = ()) -> tuple[str, Decomposition, Params]:
    """The FedAvg decomposition of one client's next update from a saved model.

    Returns (client id, decomposition, the FedAvg gradient −Δ/β of the client update the
    algorithm actually runs), so the two can be compared. The client defaults to the
    first training client; its seed is the one it would get in the next round. ``path``
    is a run directory or its checkpoint.
    """
    path, config, inputs, weights, rounds_done = _restore(path, overrides)
    dataset, model = inputs.dataset, inputs.model
    client_id = client_id or dataset.train_ids[0]
    if client_id not in dataset.clients:
        raise ValueError(f"client {client_id!r} is not in the dataset (e.g. {', '.join(dataset.train_ids[:3])})")
    algorithm = build_schedule(config.algorithm, config.model.personal, loss=inputs.task.loss).at(rounds_done)[1]
    update = algorithm.client_update
    if type(update) is not LocalTraining:  # FedProx's pull, MAML's query step: other updates than plain steps
        raise ValueError(f"{path}: the decomposition holds for clients that take plain local steps (fedsgd, fedavg, "
                         f"reptile, two_stage, centralized), not for {algorithm.name}")
    data = dataset.clients[client_id].train
    seed = client_seed(config.seed, rounds_done, client_id)
    decomposition = decompose_client_update(model, weights, data, update, seed)
    delta = update(model, weights, data, seed).delta
    return client_id, decomposition, {k: -d / update.lr for k, d in delta.items()}
