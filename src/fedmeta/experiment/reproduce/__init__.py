"""``fedmeta reproduce``: the paper's experiments as resumable runs, and a report beside its numbers.

    reproduce(("table1",), SCALES["quick"], Path("runs/reproduce"), data_dir)   # runs, resumes or skips
    write_report(SCALES["quick"], Path("runs/reproduce"), data_dir)             # from whatever runs exist
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from fedmeta.experiment.reproduce.paper import CLAIMS, TABLE1, THRESHOLD, PaperRow, paper_row
from fedmeta.experiment.reproduce.plan import (
    EXPERIMENTS, SCALES, TUNED, Scale, data_dirs, default_data_dir, estimated_seconds, experiment_runs, planned_runs,
)
from fedmeta.experiment.reproduce.report import write_report
from fedmeta.experiment.reproduce.runs import RunState, ensure_run, ensure_tuned, measured_pace, read_record, run_state
from fedmeta.experiment.reproduce.verdicts import Accuracies, Interval, Verdict

__all__ = [
    "Accuracies", "CLAIMS", "EXPERIMENTS", "Interval", "PaperRow", "RunState", "SCALES", "Scale", "TABLE1",
    "THRESHOLD", "Verdict", "default_data_dir", "ensure_run", "estimated_seconds", "paper_row", "reproduce",
    "run_state", "write_report",
]


def reproduce(experiments: Sequence[str], scale: Scale, output: Path, data_dir: Path, *, progress: bool = True,
              log: Callable[[str], None] = lambda _: None, source: str | None = None) -> list[RunState]:
    """Brings every run of ``experiments`` to finished (skipping, resuming or starting each); returns their states.

    The data is checked before any run starts, so a wrong ``data_dir`` fails at once, in
    one line naming ``source`` (where ``data_dir`` came from; default ``--data-dir DIR``).
    """
    unknown = [e for e in experiments if e not in EXPERIMENTS]
    if unknown:
        raise ValueError(f"experiment {unknown[0]!r}: expected one of {', '.join(EXPERIMENTS)} or 'all'")
    data = data_dirs(data_dir, tuple(experiments), source)
    runs = planned_runs(tuple(experiments), scale, output, data)
    found = [run_state(spec) for spec in runs]
    to_do = [state.spec for state in found if state.status in ("resumable", "missing")]
    finished = [read_record(state) for state in found if state.status == "finished"]
    pace = measured_pace(finished) if to_do else None
    minutes = sum(estimated_seconds(spec.config) for spec in to_do) / 60
    here = ("" if pace is None else f"; the {len(finished)} finished here took {pace:.2f} times their estimate, "
                                    f"so about {minutes * pace:.0f} min here")
    tuned = {spec.name for e in experiments if e in TUNED for spec in experiment_runs(e, scale, output, data)}
    log(f"{scale.name} scale: {len(runs)} runs, {len(to_do)} to run or resume (at most about {minutes:.0f} min "
        f"on 2 cores{here})" + (f"; fine-tuning chosen for {len(tuned)} of them as each finishes" if tuned else ""))
    states = []
    for index, spec in enumerate(runs, 1):
        states.append(ensure_run(spec, progress=progress, pace=pace,
                                 log=lambda text, i=index: log(f"[{i}/{len(runs)}] {text}")))
        if spec.name in tuned:
            ensure_tuned(states[-1], *scale.fine_tuning, log=log)
    return states
