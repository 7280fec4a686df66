"""Where a round's wall time goes on the process engine: client work, the barrier's idle tail, and the rest.

    python -m benchmarks.round_tail                   # W1 (FEMNIST) if its data is there, else S400
    python -m benchmarks.round_tail --workload W2

Each client's work is timed inside its worker (a monotonic clock, the same for every
process on the machine). Per measured round: the round's wall time (the ``map``), each
worker's busy time, the *tail* (from the first worker running out of clients to the last
one finishing: the time the round waits on one worker while the other idles), and what is
left (sending tasks, copying updates back, starting and ending the map). Prints the means
over the measured rounds; writes ``benchmarks/results/round_tail.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import (
    DEFAULT_DATA_DIR, build_workload_model, cohorts, load_and_date, load_note, load_population, save_report,
    workload_by_name,
)
from benchmarks.batched import cpu
from fedmeta.algorithms.algorithm import TrainingWork
from fedmeta.algorithms.client_update import ClientUpdate, local_sgd
from fedmeta.engine import ProcessEngine, default_workers
from fedmeta.params import client_seed, get_weights

RESULTS = Path(__file__).resolve().parent / "results" / "round_tail.json"


@dataclass(frozen=True)
class Timed:
    """Client work that also reports, in its metrics, when it ran and in which worker."""

    work: TrainingWork

    def __call__(self, model, weights, client, seed) -> ClientUpdate:
        started = time.monotonic()
        update = self.work(model, weights, client, seed)
        return update._replace(metrics={**update.metrics, "started": started, "finished": time.monotonic(),
                                        "pid": float(os.getpid())})


def round_parts(updates: list[ClientUpdate], began: float, ended: float, workers: int) -> dict[str, float]:
    """One round's wall time split into work, the barrier's tail and the rest (seconds)."""
    last_finish: dict[float, float] = {}
    busy: dict[float, float] = {}
    for update in updates:
        pid = update.metrics["pid"]
        busy[pid] = busy.get(pid, 0.0) + update.metrics["finished"] - update.metrics["started"]
        last_finish[pid] = max(last_finish.get(pid, 0.0), update.metrics["finished"])
    wall = ended - began
    return {"wall_s": wall, "work_s": sum(busy.values()) / workers,
            "tail_s": max(last_finish.values()) - min(last_finish.values()) if len(last_finish) == workers else wall,
            "idle_share": 1 - sum(busy.values()) / (workers * wall)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", help="W1, W2, W4 or S<population> (default: W1, or S400 without FEMNIST)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    name = args.workload or ("W1" if (args.data_dir / "femnist" / "femnist_train.h5").exists() else "S400")
    workload = workload_by_name(name)
    clients, num_classes = load_population(workload, args.data_dir)
    model = build_workload_model(workload, num_classes, next(iter(clients.values())).train)
    work = Timed(TrainingWork(local_sgd(workload.client_lr, workload.batch_size, epochs=workload.epochs)))
    weights, workers = get_weights(model), default_workers()
    load_before = os.getloadavg()[0]
    rounds = []
    with ProcessEngine(model, clients, workers=workers) as engine:
        for round_idx, ids in enumerate(cohorts(workload, list(clients), args.seed)):
            cohort = [clients[c] for c in ids]
            seeds = [client_seed(args.seed, round_idx, c.client_id) for c in cohort]
            began = time.monotonic()
            updates = engine.map(work, weights, cohort, seeds)
            ended = time.monotonic()
            if round_idx >= workload.warmup_rounds:
                rounds.append(round_parts(updates, began, ended, workers))
    means = {key: statistics.mean(r[key] for r in rounds) for key in rounds[0]}
    report = {"workload": name, "workers": workers, "clients_per_round": workload.cohort_size,
              "measured_rounds": len(rounds), "machine": f"{cpu()}, {os.cpu_count()} cores", **means,
              "rounds": rounds, **load_and_date(load_before)}
    save_report(RESULTS, report)
    rest = means["wall_s"] - means["work_s"] - means["tail_s"] / 2
    print(f"{name}: {len(rounds)} measured rounds of {workload.cohort_size} clients on {workers} workers; "
          f"{report['machine']}; {load_note(report)}")
    print(f"mean round {means['wall_s'] * 1000:.0f} ms: work {means['work_s'] * 1000:.0f} ms per worker, "
          f"barrier tail {means['tail_s'] * 1000:.0f} ms (one worker idle; half of it per worker), "
          f"the rest {rest * 1000:.0f} ms; workers idle {means['idle_share']:.1%} of the round")


if __name__ == "__main__":
    main()
