"""Methods whose clients keep state (W5 Ditto, W6 FedRep) against FedAvg (W1): side by side, in one invocation.

    python -m benchmarks.stateful                    # W1, W5 and W6
    python -m benchmarks.stateful --workloads W1,W5

Each workload has its own ``ProcessEngine`` (one worker per core; an engine holds the
states of one method), all alive at once. They take the rounds in turn, round by round,
rotating which goes first, so a change in the machine's load hits them alike. All train
W1's cohorts from the same initial model, the global model on W1's batches; samples
count every pass a client makes over its examples (``Workload.passes``: Ditto trains the
global and the personal model, FedRep the head and then the body), so samples/s is per
trained sample. Beside wall time, each round's CPU time is summed over this process and
the engine's workers: on a machine that other jobs share, time spent waiting for a core
leaves it out, so its ratios move less than those of wall time.

Then, where the time goes, as medians over ``--repeats`` on the first measured cohort:

- ``client work``: the client updates alone, one after another in this process on one
  thread (as in a worker), per trained sample: what the method costs without an engine;
- ``states``: one ``map_stateful`` whose work returns its client's state unchanged (every
  client holding its state of the method's size), less a ``map`` of work that does nothing:
  what moving the states to the workers and back costs a round.

Prints a table and writes ``benchmarks/results/stateful.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

from benchmarks.common import DEFAULT_DATA_DIR, build_workload_model, cohorts, load_and_date, load_note, \
    load_population, samples_of, save_report, workload_by_name
from benchmarks.systems.fedmeta_system import algorithm
from fedmeta.algorithms.algorithm import init_state, is_stateful, run_round
from fedmeta.engine import Execution, ProcessEngine, default_workers
from fedmeta.engine.execution import single_threaded
from fedmeta.params import client_seed, get_weights

RESULTS = Path(__file__).resolve().parent / "results" / "stateful.json"
BASELINE = "W1"


def nothing(model, weights, client, seed):
    """Work that does nothing: what a map costs by itself."""
    return None


@dataclass(frozen=True)
class Unchanged:
    """Stateful work that trains nothing and keeps its client's state: what moving the states costs."""

    update: Any

    def init_client_state(self, weights):
        return self.update.init_client_state(weights)

    def __call__(self, model, weights, client, state, seed):
        return None, state


def cpu_seconds(engine) -> float:
    """CPU time so far of this process and of the engine's workers (user and system)."""
    workers = [psutil.Process(process.pid).cpu_times() for process in engine._processes]
    return time.process_time() + sum(t.user + t.system for t in workers)


def train_side_by_side(engines: dict, workloads: dict, weights, rounds, seed: int) -> dict[str, dict]:
    """Every workload's rounds, round by round in turn: per workload, measured wall and CPU seconds and
    trained samples."""
    schedules = {name: algorithm(workloads[name]) for name in engines}
    states = {name: init_state(schedules[name], weights) for name in engines}
    measured = {name: {"seconds": 0.0, "cpu_seconds": 0.0, "samples": 0} for name in engines}
    names = list(engines)
    for round_idx, cohort in enumerate(rounds):
        turn = round_idx % len(names)
        for name in names[turn:] + names[:turn]:
            started, cpu_started = time.perf_counter(), cpu_seconds(engines[name])
            states[name], _ = run_round(schedules[name], states[name], cohort, engine=engines[name], seed=seed,
                                        round_idx=round_idx)
            if round_idx >= workloads[name].warmup_rounds:
                measured[name]["seconds"] += time.perf_counter() - started
                measured[name]["cpu_seconds"] += cpu_seconds(engines[name]) - cpu_started
                measured[name]["samples"] += samples_of(workloads[name], cohort)
    return measured


def client_work_seconds(workloads: dict, model, weights, cohort, seed: int, repeats: int) -> dict[str, float]:
    """Median seconds of each workload's client updates over ``cohort``, in this process on one thread.

    The workloads take each client in turn, so load changes hit them alike; a stateful
    update starts from a fresh client state, which is what its first round does.
    """
    model = Execution().prepare(model)
    updates = {name: algorithm(w).client_update for name, w in workloads.items()}
    times: dict[str, list[float]] = {name: [] for name in workloads}
    with single_threaded():
        for repeat in range(repeats + 1):  # the first pass warms the kernels up and is not counted
            spent = dict.fromkeys(workloads, 0.0)
            for client in cohort:
                data, client_s = client.train, client_seed(seed, 1, client.client_id)
                names = list(workloads) if repeat % 2 == 0 else list(workloads)[::-1]
                for name in names:
                    update = updates[name]
                    started = time.perf_counter()
                    if is_stateful(update):
                        update(model, weights, data, update.init_client_state(weights), client_s)
                    else:
                        update(model, weights, data, client_s)
                    spent[name] += time.perf_counter() - started
            if repeat:
                for name in workloads:
                    times[name].append(spent[name])
    return {name: statistics.median(t) for name, t in times.items()}


def median_seconds(action, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def state_seconds(engine, update, weights, cohort, repeats: int) -> float:
    """Median seconds a round spends moving the cohort's states to the workers and back (0 without states)."""
    if not is_stateful(update):
        return 0.0
    seeds = list(range(len(cohort)))
    work = Unchanged(update)
    engine.map_stateful(work, weights, cohort, seeds)  # every client of the cohort now holds a state
    empty = median_seconds(lambda: engine.map(nothing, weights, cohort, seeds), repeats)
    return median_seconds(lambda: engine.map_stateful(work, weights, cohort, seeds), repeats) - empty


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="W1,W5,W6", help="W1 first; stateful workloads of W1's data")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--workers", type=int, default=default_workers(), help="workers per engine (default: cores)")
    parser.add_argument("--repeats", type=int, default=5, help="passes for the client work and the state maps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    workloads = {name: workload_by_name(name) for name in args.workloads.split(",")}
    if next(iter(workloads)) != BASELINE:
        raise SystemExit(f"--workloads must start with {BASELINE}, the baseline the others are compared with")
    base = workloads[BASELINE]
    for name, workload in workloads.items():
        if (workload.dataset, workload.model, workload.cohort_size, workload.batch_size, workload.rounds) != \
                (base.dataset, base.model, base.cohort_size, base.batch_size, base.rounds):
            raise SystemExit(f"{name} does not train {BASELINE}'s data, model, cohorts and batches")

    clients, num_classes = load_population(base, args.data_dir)
    model = build_workload_model(base, num_classes, next(iter(clients.values())).train)
    weights = get_weights(model)
    rounds = [[clients[c] for c in ids] for ids in cohorts(base, list(clients), args.seed)]
    first_measured = rounds[base.warmup_rounds]
    load_before = os.getloadavg()[0]
    engines = {name: ProcessEngine(model, clients, workers=args.workers) for name in workloads}
    try:
        trained = train_side_by_side(engines, workloads, weights, rounds, args.seed)
        for name, engine in engines.items():
            trained[name]["state_s"] = state_seconds(engine, algorithm(workloads[name]).client_update, weights,
                                                     first_measured, args.repeats)
            trained[name]["state_bytes"] = sum(t.numel() * t.element_size() for state in
                                               engine.client_states().values() for t in state.values())
            trained[name]["clients_with_state"] = len(engine.client_states())
    finally:
        for engine in engines.values():
            engine.close()
    work = client_work_seconds(workloads, model, weights, first_measured, args.seed, args.repeats)
    first_samples = {name: samples_of(w, first_measured) for name, w in workloads.items()}
    for name in workloads:
        trained[name].update(client_work_s=work[name], client_work_samples=first_samples[name],
                             method=algorithm(workloads[name]).name)

    report = {"workloads": list(workloads), "workers": args.workers, "rounds": base.rounds,
              "cohort_size": base.cohort_size, "repeats": args.repeats,
              "machine": f"{os.cpu_count()} cores, torch {torch.__version__}", **load_and_date(load_before),
              "runs": trained}
    save_report(RESULTS, report)
    print(table(report))


def table(report: dict) -> str:
    """The measured rates and their ratio to the baseline's, per trained sample, as a markdown table."""
    runs = report["runs"]
    rate = {name: r["samples"] / r["seconds"] for name, r in runs.items()}
    cpu_rate = {name: r["samples"] / r["cpu_seconds"] for name, r in runs.items()}
    work_rate = {name: r["client_work_samples"] / r["client_work_s"] for name, r in runs.items()}
    base = BASELINE
    lines = [f"{report['rounds']} measured rounds of {report['cohort_size']} clients, {report['workers']} workers "
             f"per engine; {report['machine']}; {report['date']}; {load_note(report)}", "",
             f"| workload | method | trained samples/s | vs {base} | s/round | per CPU-second | vs {base} "
             f"| client work alone, samples/s | vs {base} | states moved, ms/round | states held, MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in runs.items():
        lines.append(
            f"| {name} | {r['method']} | {rate[name]:.0f} | {rate[name] / rate[base]:.3f} | "
            f"{r['seconds'] / report['rounds']:.3f} | {cpu_rate[name]:.0f} | {cpu_rate[name] / cpu_rate[base]:.3f} | "
            f"{work_rate[name]:.0f} | {work_rate[name] / work_rate[base]:.3f} "
            f"| {r['state_s'] * 1000:.1f} | {r['state_bytes'] / 1e6:.0f} ({r['clients_with_state']} clients) |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
