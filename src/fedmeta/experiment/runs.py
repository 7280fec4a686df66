"""Lists and compares run directories: status, rounds, last accuracies, wall time.

Reads only a run directory's files (``fedmeta.experiment.run_dir``), never trains or
evaluates, so it is cheap enough to list a whole ``runs/`` folder. The accuracies are the
primary metric's (accuracy unless the task has another) from the last evaluated row of
``metrics.jsonl``; the wall time sums its rounds' ``time/round_seconds`` and
``time/evaluation_seconds``, the time spent running, not waiting between a crash and a resume.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from fedmeta.evaluation.personalization import primary_metric
from fedmeta.experiment.checkpoint import read_checkpoint
from fedmeta.experiment.reproduce.figures import plot_curves
from fedmeta.experiment.reproduce.findings import Curve
from fedmeta.experiment.reproduce.runs import DIVERGED
from fedmeta.experiment.run_dir import (
    LOCK, checkpoint_path, config_path, evaluation_path, metrics_path, read_metrics,
)

STATUSES = ("running", "finished", "diverged", "crashed")


class RunSummary(NamedTuple):
    """One run directory at a glance; ``initial`` and ``personalized`` are None before its first evaluation."""

    run_dir: Path
    status: str
    rounds_done: int
    rounds: int
    metric: str
    initial: float | None
    personalized: float | None
    wall_seconds: float
    history: list[dict[str, Any]]

    def curve(self) -> Curve:
        """The primary metric at each evaluated round, for the overlaid plot."""
        rows = [row for row in self.history if f"initial/{self.metric}" in row]
        return Curve(tuple(row["round"] for row in rows), tuple(row[f"initial/{self.metric}"] for row in rows),
                     tuple(row[f"personalized/{self.metric}"] for row in rows))


def _lock_holder_alive(run_dir: Path) -> bool:
    """Whether ``.lock`` names a live process: a run that ended, however it died, leaves none or a dead PID.

    The PID is read rather than the lock tried, as trying it from the holder's own process
    would release the holder's lock; a PID reused since by another process reads as running.
    """
    try:
        pid = int((run_dir / LOCK).read_text().strip())
    except (FileNotFoundError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _configured_rounds(run_dir: Path) -> int:
    path = config_path(run_dir)
    try:
        rounds = tomllib.loads(path.read_text())["rounds"]
    except FileNotFoundError:
        raise ValueError(f"{run_dir}: not a fedmeta run directory (no config.toml)") from None
    except (tomllib.TOMLDecodeError, KeyError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a run's config ({error})") from None
    return rounds


def _status(run_dir: Path, history: list[dict[str, Any]], rounds: int) -> str:
    if _lock_holder_alive(run_dir):
        return "running"
    if (history and "diverged" in history[-1]) or (run_dir / DIVERGED).is_file():
        return "diverged"  # the run loop logs the diverged round with its reason, past the last checkpoint
    if evaluation_path(run_dir).is_file() and checkpoint_path(run_dir).is_file():
        if read_checkpoint(checkpoint_path(run_dir)).rounds_done >= rounds:
            return "finished"
    return "crashed"


def summarize_run(run_dir: str | Path) -> RunSummary:
    """The run directory's status, rounds, last evaluated metric and wall time.

    Raises:
        ValueError: not a run directory, or its ``metrics.jsonl`` is not a run's (rounds that repeat).
    """
    run_dir = Path(run_dir)
    rounds = _configured_rounds(run_dir)
    history = read_metrics(run_dir) if metrics_path(run_dir).is_file() else []  # a run just started has none yet
    metric = next(filter(None, map(primary_metric, history)), "accuracy")
    evaluated = [row for row in history if f"initial/{metric}" in row]
    last = evaluated[-1] if evaluated else {}
    return RunSummary(run_dir, _status(run_dir, history, rounds), history[-1]["round"] if history else 0, rounds,
                      metric, last.get(f"initial/{metric}"), last.get(f"personalized/{metric}"),
                      sum(row.get("time/round_seconds", 0.0) + row.get("time/evaluation_seconds", 0.0)
                          for row in history), history)


def list_runs(directory: str | Path = "runs") -> list[RunSummary]:
    """Every run directory directly in ``directory`` (those holding ``config.toml``), by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory}: not a directory of runs")
    return [summarize_run(path) for path in sorted(directory.iterdir()) if config_path(path).is_file()]


def format_runs(summaries: Sequence[RunSummary]) -> str:
    """An aligned table, one run a line; a metric other than accuracy is named in its column."""
    metrics = {summary.metric for summary in summaries}
    suffix = "" if metrics <= {"accuracy"} else f" {'/'.join(sorted(metrics))}"
    cells = [["run", "status", "rounds", f"initial{suffix}", f"personalized{suffix}", "wall time"]]
    for s in summaries:
        cells.append([s.run_dir.name, s.status, f"{s.rounds_done}/{s.rounds}",
                      "" if s.initial is None else f"{s.initial:.4f}",
                      "" if s.personalized is None else f"{s.personalized:.4f}", _duration(s.wall_seconds)])
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(cell.ljust(width) if i < 2 else cell.rjust(width)
                               for i, (cell, width) in enumerate(zip(line, widths))).rstrip() for line in cells)


def _duration(seconds: float) -> str:
    """``4.2s`` under a minute, else ``m:ss`` or ``h:mm:ss``."""
    if seconds < 59.95:
        return f"{seconds:.1f}s"
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def compare_runs(run_dirs: Sequence[str | Path], output: str | Path) -> list[RunSummary]:
    """Summarizes the runs and draws their metric over rounds into one PNG, initial dashed, personalized solid."""
    summaries = [summarize_run(run_dir) for run_dir in run_dirs]
    curves = {s.run_dir.name: s.curve() for s in summaries if s.curve().rounds}
    if not curves:
        raise ValueError("nothing to plot: none of the runs has an evaluated round yet")
    plot_curves({" vs ".join(sorted({s.metric for s in summaries})) + " over rounds": curves}, Path(output))
    return summaries
