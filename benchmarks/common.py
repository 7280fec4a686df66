"""What every benchmarked system shares: the workloads, their data, cohorts and batches.

Each system runs as its own process (``python -m benchmarks.systems.<name>`` or a peer's
launcher); the driver (``benchmarks/run.py``) starts it, watches the memory of its whole
process tree, and reads one ``BENCH_RESULT {json}`` line from its output.

A system reports only what it can see from the inside: the wall time at which its first
round started (``first_round_wall``, from ``time.time()``), the samples trained and the
seconds spent in the measured rounds. Start-up is ``first_round_wall`` minus the launch
time the driver recorded; the first ``warmup_rounds`` rounds are run but not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fedmeta.data.federated import ClientData, Examples
from fedmeta.params import client_seed

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
RESULT_PREFIX = "BENCH_RESULT "


@dataclass(frozen=True)
class Workload:
    """One standard workload: which data, model and amount of client work.

    ``kind`` is ``"train"`` (rounds of ``method``: each cohort client runs ``epochs`` epochs
    of SGD at ``batch_size`` from the round's weights) or ``"personalize"`` (each of
    ``num_clients`` clients evaluates, fine-tunes ``epochs`` epochs on its train split,
    and evaluates on its test split after each epoch).

    ``method`` is ``"fedavg"``, or a method whose clients keep state (``"ditto"``,
    ``"fedrep"``), which only fedmeta runs; ``passes`` is how many times such a client
    trains on each of its examples per epoch (Ditto: the global and the personal model;
    FedRep: the head, then the body), so samples count all the training a client does.
    """

    name: str
    kind: str
    dataset: str  # "femnist", "shakespeare" or "synthetic"
    model: str
    cohort_size: int
    epochs: int
    rounds: int
    warmup_rounds: int = 1
    batch_size: int = 20
    client_lr: float = 0.02
    num_clients: int = 0  # personalize: clients evaluated; synthetic: population size
    method: str = "fedavg"

    @property
    def passes(self) -> int:
        return 2 if self.method in ("ditto", "fedrep") else 1


WORKLOADS = {
    "W1": Workload("W1", "train", "femnist", "fedavg_cnn", cohort_size=10, epochs=1, rounds=16),
    # a W2 round is long (20 clients x 10 epochs), so its first-round costs need no warm-up round
    "W2": Workload("W2", "train", "femnist", "fedavg_cnn", cohort_size=20, epochs=10, rounds=2, warmup_rounds=0),
    "W3": Workload("W3", "personalize", "femnist", "fedavg_cnn", cohort_size=0, epochs=3, rounds=1,
                   warmup_rounds=0, num_clients=100),
    "W4": Workload("W4", "train", "shakespeare", "char_lstm", cohort_size=10, epochs=1, rounds=6),
    # W1's data, model, cohorts and batches, with clients that keep state (fedmeta only)
    "W5": Workload("W5", "train", "femnist", "fedavg_cnn", cohort_size=10, epochs=1, rounds=16, method="ditto"),
    "W6": Workload("W6", "train", "femnist", "fedavg_cnn", cohort_size=10, epochs=1, rounds=16, method="fedrep"),
}
DITTO_LAM = 0.1  # the shipped config's
FEDREP_HEAD = {"fedavg_cnn": ("classifier.3",), "char_lstm": ("output",)}  # each model's last layer
SWEEP_POPULATIONS = (100, 400, 1600, 3400)
SWEEP_CLIENT_EXAMPLES = 200


def sweep_workload(population: int) -> Workload:
    """The scaling sweep: FedAvg rounds on a synthetic population of ``population`` clients."""
    return Workload(f"S{population}", "train", "synthetic", "logistic_regression", cohort_size=10, epochs=1,
                    rounds=40, num_clients=population)


def workload_by_name(name: str) -> Workload:
    if name in WORKLOADS:
        return WORKLOADS[name]
    if name.startswith("S") and name[1:].isdigit():
        return sweep_workload(int(name[1:]))
    raise SystemExit(f"unknown workload {name!r}: expected one of {sorted(WORKLOADS)} or S<population>")


def load_population(workload: Workload, data_dir: Path = DEFAULT_DATA_DIR) -> tuple[dict[str, ClientData], int]:
    """Every client of the workload's data (train and test splits) and the number of classes.

    Synthetic clients all hold ``SWEEP_CLIENT_EXAMPLES`` examples. FEMNIST and Shakespeare come from the
    TFF-layout h5 files in ``data_dir``; all writers (roles) form the population, none held out.
    """
    from fedmeta.data.synthetic import synthetic
    from fedmeta.data.tff_h5 import load_emnist_h5, load_shakespeare_h5

    if workload.dataset == "synthetic":
        # every client the same size, so a round is the same work whatever the population
        dataset = synthetic(workload.num_clients, seed=0, min_examples=SWEEP_CLIENT_EXAMPLES,
                            max_examples=SWEEP_CLIENT_EXAMPLES)
    elif workload.dataset == "femnist":
        folder = Path(data_dir) / "femnist"
        dataset = load_emnist_h5(folder / "femnist_train.h5", folder / "femnist_test.h5")
    elif workload.dataset == "shakespeare":
        folder = Path(data_dir) / "shakespeare"
        dataset = load_shakespeare_h5(folder / "shakespeare_train.h5", folder / "shakespeare_test.h5")
    else:
        raise SystemExit(f"unknown dataset {workload.dataset!r}")
    return dataset.clients, dataset.num_classes


def cohorts(workload: Workload, client_ids: list[str], seed: int = 0) -> list[list[str]]:
    """The client ids of every round (warm-up rounds first), drawn from (seed, round) only.

    A personalization workload has one "round": the first ``num_clients`` ids in a
    seeded order.
    """
    ids = sorted(client_ids)
    if workload.kind == "personalize":
        order = np.random.default_rng(client_seed(seed, -1, "bench personalize")).permutation(len(ids))
        return [[ids[i] for i in sorted(order[: workload.num_clients])]]
    rounds = []
    for round_idx in range(workload.warmup_rounds + workload.rounds):
        rng = np.random.default_rng(client_seed(seed, round_idx, "cohort"))
        rounds.append([ids[i] for i in sorted(rng.choice(len(ids), workload.cohort_size, replace=False))])
    return rounds


def samples_of(workload: Workload, clients: list[ClientData]) -> int:
    """Training samples one round of ``clients`` processes (passes x epochs x train examples)."""
    return workload.passes * workload.epochs * sum(len(c.train) for c in clients)


def build_workload_model(workload: Workload, num_classes: int, example: Examples):
    """The workload's model, initialised from seed 0 (the same in every system)."""
    import torch

    from fedmeta.models.registry import build_model

    torch.manual_seed(0)
    return build_model(workload.model, num_classes=num_classes, input_dim=int(example.x[0].numel()))


def parse_args(description: str, extra: callable = None) -> argparse.Namespace:
    """The arguments every system takes: ``--workload``, ``--data-dir``, ``--workers``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--workload", required=True, help="W1, W2, W3, W4 or S<population>")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="processes (or threads) to use; default: one per core")
    parser.add_argument("--seed", type=int, default=0)
    if extra is not None:
        extra(parser)
    return parser.parse_args()


@dataclass
class Result:
    """What a system reports; the driver adds start-up time and memory."""

    system: str
    workload: str
    samples: int
    seconds: float
    rounds: int
    first_round_wall: float
    note: str = ""

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds


def emit(result: Result) -> None:
    """Prints the one line the driver reads."""
    print(RESULT_PREFIX + json.dumps(asdict(result)), flush=True)
    sys.stdout.flush()


def client_batches(workload: Workload, client: ClientData, seed: int, round_idx: int) -> list:
    """The index batches fedmeta's client update draws for this client in this round.

    Reference and naive systems train on exactly these, so every system does the same work.
    """
    import torch

    from fedmeta.algorithms.client_update import batch_order

    tag = f"personalize/{client.client_id}" if workload.kind == "personalize" else client.client_id
    generator = torch.Generator().manual_seed(client_seed(seed, round_idx, tag))
    return [b for epoch in batch_order(len(client.train), workload.batch_size, generator, epochs=workload.epochs)
            for b in epoch]


def round_index(workload: Workload, position: int) -> int:
    """The round index a cohort position stands for (personalization uses round -1)."""
    return -1 if workload.kind == "personalize" else position


def load_and_date(load_before: float) -> dict:
    """When a side-by-side benchmark ran and how busy the machine was: its ratios are to be read with this."""
    return {"date": time.strftime("%Y-%m-%d"), "load_average_before": load_before,
            "load_average_after": os.getloadavg()[0]}


def load_note(report: dict) -> str:
    """``1-minute load average 1.2 before, 1.4 after``, for a table's heading."""
    return (f"1-minute load average {report['load_average_before']:.1f} before, "
            f"{report['load_average_after']:.1f} after")


def save_report(path: Path, report: dict) -> None:
    """Writes a benchmark's report as JSON (benchmarks/results/ is not committed)."""
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
