"""Finding, resuming and running the reproduction's runs, through the ordinary run machinery.

A run lives in ``<output>/<scale>/<name>-<timestamp>`` (``run_experiment`` names it). A
directory counts as a run of a spec only when its ``config.toml`` equals the spec's config
(its output directory aside): a run made with other data or an older budget is never
mistaken for this one. Re-running skips finished runs and resumes interrupted ones from
their checkpoint, which ends with the same bits as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import re
import statistics
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

from fedmeta.experiment.checkpoint import read_checkpoint
from fedmeta.experiment.config import ConfigError, ExperimentConfig, load_config
from fedmeta.experiment.reproduce.plan import RunSpec, estimated_seconds
from fedmeta.experiment.run import DivergenceError, resume_experiment, run_experiment, tune_checkpoint
from fedmeta.experiment.run_dir import (
    checkpoint_path, config_path, evaluation_path, parse_run_dir_name, read_evaluation, read_evaluations,
    read_metrics, read_provenance, read_tuned_evaluation, write_tuned_evaluation,
)

DIVERGED = "diverged.txt"
"""Left in a run directory whose run stopped as diverged: resuming would diverge again."""

STATUSES = ("finished", "diverged", "resumable", "missing")


class RunState(NamedTuple):
    """Where a spec's run stands: ``status`` is one of ``STATUSES``; ``rounds_done`` from its checkpoint."""

    spec: RunSpec
    status: str
    run_dir: Path | None = None
    rounds_done: int = 0
    note: str = ""


def _same(found: ExperimentConfig, expected: ExperimentConfig) -> bool:
    return dataclasses.replace(found, output_dir=expected.output_dir) == expected


def _candidates(spec: RunSpec) -> list[Path]:
    """Run directories named for the spec, newest first."""
    root = Path(spec.config.output_dir)
    if not root.is_dir():
        return []
    named = [(parsed, p) for p in root.iterdir()
             if p.is_dir() and (parsed := parse_run_dir_name(p.name)) and parsed.name == spec.name]
    named.sort(key=lambda item: item[0].order, reverse=True)
    return [p for _, p in named]


def _evaluated_rounds(run_dir: Path) -> int:
    """The round of the run's last evaluation (0 without one): how far a run kept without its checkpoint got."""
    try:
        return int(read_evaluation(run_dir)["round"])
    except (FileNotFoundError, ValueError, KeyError):
        return 0


def run_state(spec: RunSpec) -> RunState:
    """The most advanced run of ``spec`` on disk: finished, diverged, resumable (newest), or missing.

    A finished run counts as finished without its checkpoint too: the runs behind a
    published report are kept as their text files alone (config, metrics, evaluations).
    """
    states = []
    for run_dir in _candidates(spec):
        try:
            if not _same(load_config(config_path(run_dir)), spec.config):
                continue
        except (FileNotFoundError, ConfigError):
            continue
        if (run_dir / DIVERGED).is_file():
            states.append(RunState(spec, "diverged", run_dir, note=(run_dir / DIVERGED).read_text().strip()))
            continue
        try:
            rounds_done = read_checkpoint(checkpoint_path(run_dir)).rounds_done
        except FileNotFoundError:
            rounds_done = _evaluated_rounds(run_dir)
            if rounds_done < spec.config.rounds:
                continue  # stopped before its first checkpoint: nothing to resume
        except ValueError:
            continue
        done = rounds_done >= spec.config.rounds and evaluation_path(run_dir).is_file()
        states.append(RunState(spec, "finished" if done else "resumable", run_dir, rounds_done))
    for status in ("finished", "diverged", "resumable"):
        found = [s for s in states if s.status == status]
        if found:
            return found[0]
    return RunState(spec, "missing")


def ensure_run(spec: RunSpec, *, progress: bool = True, log: Callable[[str], None] = lambda _: None,
               estimate: Callable[[ExperimentConfig], float] = estimated_seconds,
               pace: float | None = None) -> RunState:
    """Makes ``spec``'s run finished: skips it, resumes it, or starts it; a divergence is recorded, not raised.

    ``estimate`` gives the wall seconds the start message announces (``fedmeta compare`` has its own);
    ``pace`` (``measured_pace``), how many times their estimate the runs finished on this machine took.
    """
    state = run_state(spec)
    rounds = spec.config.rounds
    if state.status == "finished":
        log(f"{spec.name}: finished ({rounds} rounds) in {state.run_dir}; skipped")
        return state
    if state.status == "diverged":
        log(f"{spec.name}: diverged earlier ({state.note}); skipped")
        return state
    try:
        if state.status == "resumable":
            log(f"{spec.name}: resuming {state.run_dir} after {state.rounds_done} of {rounds} rounds")
            resume_experiment(state.run_dir, progress=progress)
        else:
            minutes = estimate(spec.config) / 60
            here = "" if pace is None else f", {minutes * pace:.0f} at the pace measured here"
            log(f"{spec.name}: starting, {rounds} rounds (about {minutes:.0f} min{here}), in {spec.config.output_dir}")
            run_experiment(spec.config, progress=progress)
    except DivergenceError as error:
        run_dir = _candidates(spec)[0]
        (run_dir / DIVERGED).write_text(f"{error}\n")
        log(f"{spec.name}: {error}")
        return RunState(spec, "diverged", run_dir, note=str(error))
    state = run_state(spec)
    log(f"{spec.name}: finished in {state.run_dir}")
    return state


def ensure_tuned(state: RunState, grid: Sequence[tuple[str, float]], max_epochs: int, *,
                 log: Callable[[str], None] = lambda _: None) -> None:
    """Evaluates a finished run's held-out clients with fine-tuning chosen on its training clients, once.

    ``fedmeta eval --tune`` on the run's checkpoint (``tune_checkpoint``) over ``grid`` and
    up to ``max_epochs``, kept in the run directory (``TUNED_EVALUATION``): a run that has
    it is skipped.
    """
    if state.status != "finished":
        log(f"{state.spec.name}: not finished; fine-tuning not chosen")
        return
    if read_tuned_evaluation(state.run_dir) is not None:
        log(f"{state.spec.name}: fine-tuning already chosen; skipped")
        return
    if not checkpoint_path(state.run_dir).is_file():
        log(f"{state.spec.name}: kept without its checkpoint; fine-tuning cannot be chosen")
        return
    _, tuning, report = tune_checkpoint(state.run_dir, grid=grid, max_epochs=max_epochs)
    write_tuned_evaluation(state.run_dir, report.to_json() | {"tuning": tuning.to_json()})
    log(f"{state.spec.name}: fine-tuning chosen on {len(tuning.client_ids)} training clients: {tuning.optimizer} "
        f"lr {tuning.lr:g}, {tuning.epochs} epoch(s)")


class RunRecord(NamedTuple):
    """A finished run's metrics and evaluations, as the report reads them.

    ``evaluation`` is the last evaluation, ``evaluations`` every one (none for a run made
    before they were kept), ``tuned`` the last with fine-tuning chosen; ``machines`` the
    CPUs it ran on (started and each resume), as ``machine_label`` names them.
    """

    spec: RunSpec
    run_dir: Path
    history: list[dict[str, Any]]
    evaluation: dict[str, Any]
    tuned: dict[str, Any] | None = None
    evaluations: tuple[dict[str, Any], ...] = ()
    machines: tuple[str, ...] = ()

    def last_evaluations(self, count: int) -> tuple[dict[str, Any], ...]:
        """The last ``count`` evaluations (only the last one for a run that kept no others), on one set of clients.

        Raises:
            ValueError: when they evaluated different clients, which a run never does.
        """
        last = self.evaluations[-count:] or (self.evaluation,)
        if any(e["client_ids"] != last[-1]["client_ids"] for e in last):
            raise ValueError(f"{self.run_dir}: its evaluations at rounds {[e['round'] for e in last]} "
                             "did not evaluate the same clients")
        return last

    @property
    def evaluated(self) -> list[dict[str, Any]]:
        return [row for row in self.history if "initial/accuracy" in row]

    @property
    def wall_seconds(self) -> float:
        """Training and evaluation time summed over rounds (segments of a resumed run included)."""
        return sum(row.get("time/round_seconds", 0.0) + row.get("time/evaluation_seconds", 0.0) for row in self.history)


def measured_pace(records: Sequence[RunRecord]) -> float | None:
    """The median over finished runs of their wall time over their estimate (None without one).

    The estimates were measured on one CPU; on another the runs still to do take about this
    many times theirs. A median, since a run that shared the machine or was stopped took longer.
    """
    ratios = [r.wall_seconds / estimated_seconds(r.spec.config) for r in records if r.wall_seconds > 0]
    return statistics.median(ratios) if ratios else None


def machine_label(record: dict[str, Any]) -> str:
    """A provenance record's CPU and, where recorded, the vector capability torch used.

    "Intel Xeon Processor, AVX512": the same model name can hide CPUs twice as fast as each other.
    """
    model = " ".join(re.sub(r"\((R|TM)\)", "", record.get("cpu") or "").split())
    return ", ".join(part for part in (model, record.get("cpu_capability")) if part) or "unknown"


def _machines(run_dir: Path) -> tuple[str, ...]:
    """The distinct CPUs a run ran on, in order (none for a run begun before provenance was kept)."""
    try:
        provenance = read_provenance(run_dir)
    except (FileNotFoundError, ValueError):
        return ()
    records = [r for r in (provenance["started"], *provenance["resumed"]) if r]
    return tuple(dict.fromkeys(machine_label(r) for r in records))


def read_record(state: RunState) -> RunRecord:
    """Reads a finished run's files."""
    return RunRecord(state.spec, state.run_dir, read_metrics(state.run_dir), read_evaluation(state.run_dir),
                     read_tuned_evaluation(state.run_dir), tuple(read_evaluations(state.run_dir)),
                     _machines(state.run_dir))
