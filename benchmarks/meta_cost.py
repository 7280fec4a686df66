"""M1: MAML's second-order cost as a ratio to FOMAML's, the same client work side by side.

    python -m benchmarks.meta_cost                       # K = 1 and 5 on W1's first measured cohort
    python -m benchmarks.meta_cost --inner-steps 5 --repeats 5

For each K, ``maml`` and ``fomaml`` (``fedmeta.algorithms.maml.MetaGradient``, second
order or not) run the client update of every client of W1's first measured cohort: the
FEMNIST CNN from the same weights, the same K support batches and query batch of 20
(drawn from the same seed), in this process on one thread and in channels_last, as a
worker runs them. The two take each client in turn, alternating which goes first, so a
change in the machine's load hits both alike. Reported: seconds per client update (the
median over ``--repeats`` passes over the cohort, divided by its size) and their ratio.

Prints a table and writes ``benchmarks/results/meta_cost.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import DEFAULT_DATA_DIR, WORKLOADS, build_workload_model, cohorts, load_and_date, \
    load_note, load_population, save_report
from fedmeta.algorithms.maml import MetaGradient
from fedmeta.client_work import ClientUpdate
from fedmeta.engine import Execution
from fedmeta.engine.execution import single_threaded
from fedmeta.params import client_seed, get_weights

RESULTS = Path(__file__).resolve().parent / "results" / "meta_cost.json"
WORKLOAD = WORKLOADS["W1"]
INNER_LR = 0.02  # the shipped configs'


def updates(inner_steps: int, batch_size: int) -> dict[str, MetaGradient]:
    """MAML and FOMAML with the same K, inner lr and batch size: the same batches, one order of derivative apart."""
    return {"maml": MetaGradient(INNER_LR, inner_steps, batch_size, second_order=True),
            "fomaml": MetaGradient(INNER_LR, inner_steps, batch_size, second_order=False)}


def time_side_by_side(methods: dict[str, MetaGradient], model, weights, cohort, seed: int,
                      repeats: int) -> dict[str, dict]:
    """Per method: the median seconds of a pass over ``cohort`` and the samples one pass trains on."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    samples = dict.fromkeys(methods, 0)
    with single_threaded():
        for repeat in range(repeats + 1):  # the first pass warms the kernels up and is not counted
            spent = dict.fromkeys(methods, 0.0)
            for client in cohort:
                client_s = client_seed(seed, 1, client.client_id)
                for name in (list(methods) if repeat % 2 == 0 else list(methods)[::-1]):
                    started = time.perf_counter()
                    update: ClientUpdate = methods[name](model, weights, client.train, client_s)
                    spent[name] += time.perf_counter() - started
                    if repeat == 0:
                        samples[name] += update.metrics["num_samples"]
            if repeat:
                for name in methods:
                    times[name].append(spent[name])
    return {name: {"seconds_per_pass": statistics.median(times[name]), "samples_per_pass": samples[name]}
            for name in methods}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inner-steps", default="1,5", help="values of K, comma-separated")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the cohort")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    clients, num_classes = load_population(WORKLOAD, args.data_dir)
    model = build_workload_model(WORKLOAD, num_classes, next(iter(clients.values())).train)
    weights = get_weights(model)
    model = Execution().prepare(model)
    cohort = [clients[c] for c in cohorts(WORKLOAD, list(clients), args.seed)[WORKLOAD.warmup_rounds]]
    load_before = os.getloadavg()[0]
    runs = {}
    for k in (int(k) for k in args.inner_steps.split(",")):
        runs[k] = time_side_by_side(updates(k, WORKLOAD.batch_size), model, weights, cohort, args.seed, args.repeats)
    report = {"workload": WORKLOAD.name, "model": WORKLOAD.model, "clients": len(cohort),
              "batch_size": WORKLOAD.batch_size, "repeats": args.repeats, "torch": torch.__version__,
              **load_and_date(load_before), "runs": runs}
    save_report(RESULTS, report)
    print(table(report))


def table(report: dict) -> str:
    """Seconds per client update of MAML and FOMAML per K, and their ratio, as a markdown table."""
    lines = [f"M1: {report['clients']} clients of {report['workload']} ({report['model']}), batch "
             f"{report['batch_size']}, one thread; torch {report['torch']}; {report['date']}; {load_note(report)}", "",
             "| K | samples per update | maml s/update | fomaml s/update | maml / fomaml |",
             "|---:|---:|---:|---:|---:|"]
    for k, run in report["runs"].items():
        per_update = {name: r["seconds_per_pass"] / report["clients"] for name, r in run.items()}
        lines.append(f"| {k} | {run['maml']['samples_per_pass'] / report['clients']:.0f} | {per_update['maml']:.4f} "
                     f"| {per_update['fomaml']:.4f} | {per_update['maml'] / per_update['fomaml']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
