"""Everything the report reads from disk, read once: where each planned run stands, and the data's size.

The report is assembled from this alone (``findings``, ``markdown``, ``figures``), so it
can be written after any subset of the runs: a configuration without a finished run is
listed as missing, and the verdicts that need it say "not run".
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from fedmeta.data.download import dataset_paths
from fedmeta.data.federated import PAPER_HELD_OUT_FRACTION, held_out_count
from fedmeta.data.tff_h5 import count_clients, label_counts
from fedmeta.evaluation.tasks import EMNIST_CLASS_GROUPS
from fedmeta.experiment.reproduce import plan
from fedmeta.experiment.reproduce.plan import DataDirs, Scale
from fedmeta.experiment.reproduce.runs import RunRecord, RunState, read_record, run_state


class Collected(NamedTuple):
    """Every planned run of a scale and where it stands, the finished runs' records, and the data read.

    ``missing_data`` maps an experiment whose data was not found to why; ``writers`` is
    how many FEMNIST writers each run reads; ``official_emnist``: they come from TFF's
    ``fed_emnist_*.h5`` (3,400 writers, the paper's data) rather than our FEMNIST;
    ``digit_share``: the share of digits among those writers' training labels.
    """

    scale: Scale
    output: Path
    data: DataDirs
    states: dict[str, RunState]
    records: dict[str, RunRecord]
    missing_data: dict[str, str]
    writers: int
    official_emnist: bool
    digit_share: float | None = None

    @property
    def held_out_writers(self) -> int:
        """How many of the writers the paper's held-out fraction holds out (at least one, not all)."""
        return held_out_count(PAPER_HELD_OUT_FRACTION, self.writers)


def collect(scale: Scale, output: Path, data_dir: Path, source: str | None = None) -> Collected:
    """Finds every run the scale plans; without Shakespeare's files, that experiment is "not run"."""
    missing_data = {}
    emnist = plan.find_dataset(data_dir, "emnist", source)  # every experiment needs it: no report without
    try:
        shakespeare = plan.find_dataset(data_dir, "shakespeare", source)
    except FileNotFoundError as error:
        shakespeare, missing_data["shakespeare"] = None, str(error)
    data = DataDirs(emnist, shakespeare)
    experiments = tuple(e for e in plan.EXPERIMENTS if e not in missing_data)
    states = {spec.name: run_state(spec) for spec in plan.planned_runs(experiments, scale, output, data)}
    records = {name: read_record(state) for name, state in states.items() if state.status == "finished"}
    train = dataset_paths("emnist", emnist)[0]
    writers = count_clients(train, "emnist")
    if scale.max_clients is not None:
        writers = min(writers, scale.max_clients)
    labels = label_counts(train, scale.max_clients)
    first, last = EMNIST_CLASS_GROUPS["digit"]
    return Collected(scale, output, data, states, records, missing_data, writers, train.name.startswith("fed_emnist"),
                     float(labels[first:last + 1].sum()) / max(int(labels.sum()), 1))
