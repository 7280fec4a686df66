"""The Ray engine against the process engine: the same FedAvg rounds, side by side, in one invocation.

    python -m benchmarks.ray_engine                   # W1 (FEMNIST) if its data is there, else S400
    python -m benchmarks.ray_engine --workload S400 --repeats 30

Both engines run the workload's rounds (same cohorts, same seeds, same model) with one
worker per core, round by round in turn, alternating which goes first (so a change in the
machine's load hits both alike); the final weights must be equal, bit for bit. Then the cost of a round
that is not training is taken apart, on each engine, as the median over ``--repeats``:

- ``weights``: getting the round's weights to the workers (the process engine copies
  them into its shared-memory buffer inside ``map``; the Ray engine ``ray.put``s them);
- ``empty map``: one ``map`` of work that does nothing over the first cohort: the
  weights as above, sending the tasks, scheduling, and getting an empty answer back;
- ``updates``: one ``map`` whose work returns a zero update of the model's size, less the
  empty map: what bringing the updates back costs.

Prints a table and writes ``benchmarks/results/ray_engine.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import DEFAULT_DATA_DIR, build_workload_model, cohorts, load_population, samples_of, \
    workload_by_name
from fedmeta.algorithms.algorithm import init_state, run_round
from fedmeta.algorithms.client_update import ClientUpdate
from fedmeta.algorithms.presets import fedavg
from fedmeta.algorithms.server_optimizers import server_sgd
from fedmeta.engine import ProcessEngine, default_workers
from fedmeta.engine.execution import single_threaded
from fedmeta.params import get_weights

RESULTS = Path(__file__).resolve().parent / "results" / "ray_engine.json"


def nothing(model, weights, client, seed):
    """Work that does nothing: what a map costs by itself."""
    return None


def zero_update(model, weights, client, seed):
    """Work that returns an update of the model's size without training: a map plus the updates coming back."""
    return ClientUpdate({k: torch.zeros_like(v) for k, v in model.state_dict().items()}, len(client.train), {})


def train_side_by_side(engines: dict, workload, model, rounds, seed) -> dict:
    """The workload's rounds through every engine, round by round in turn (so drift in the
    machine's load hits them alike): per engine, (final weights, measured seconds, samples)."""
    schedule = fedavg(workload.epochs, client_lr=workload.client_lr, client_batch_size=workload.batch_size,
                      server_optimizer=server_sgd(1.0))
    states = {name: init_state(schedule, get_weights(model)) for name in engines}
    seconds = {name: 0.0 for name in engines}
    samples = 0
    for round_idx, cohort in enumerate(rounds):
        order = list(engines) if round_idx % 2 == 0 else list(engines)[::-1]
        for name in order:
            started = time.perf_counter()
            states[name], _ = run_round(schedule, states[name], cohort, engine=engines[name], seed=seed,
                                        round_idx=round_idx)
            if round_idx >= workload.warmup_rounds:
                seconds[name] += time.perf_counter() - started
        if round_idx >= workload.warmup_rounds:
            samples += samples_of(workload, cohort)
    return {name: (states[name].weights, seconds[name], samples) for name in engines}


def median_seconds(action, repeats: int) -> float:
    """The median time of ``action``, with torch on one thread as it is during a map."""
    times = []
    for _ in range(repeats):
        with single_threaded():
            started = time.perf_counter()
            action()
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def overheads(engine, weights, cohort, repeats: int, put_weights) -> dict[str, float]:
    seeds = list(range(len(cohort)))
    engine.map(zero_update, weights, cohort, seeds)  # warm: the work reaches every worker once
    empty = median_seconds(lambda: engine.map(nothing, weights, cohort, seeds), repeats)
    updates = median_seconds(lambda: engine.map(zero_update, weights, cohort, seeds), repeats)
    return {"weights_s": median_seconds(put_weights, repeats), "empty_map_s": empty, "updates_s": updates - empty}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", help="W1, W2, W4 or S<population> (default: W1, or S400 without FEMNIST)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--workers", type=int, default=default_workers(), help="workers / actors (default: cores)")
    parser.add_argument("--repeats", type=int, default=20, help="maps per overhead measurement")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    name = args.workload or ("W1" if (args.data_dir / "femnist" / "femnist_train.h5").exists() else "S400")
    workload = workload_by_name(name)
    if workload.kind != "train":
        raise SystemExit(f"{name} is not a training workload")

    import ray

    from fedmeta.engine.ray_engine import RayEngine, _array

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors cannot import benchmarks/
    clients, num_classes = load_population(workload, args.data_dir)
    model = build_workload_model(workload, num_classes, next(iter(clients.values())).train)
    rounds = [[clients[c] for c in ids] for ids in cohorts(workload, list(clients), args.seed)]
    weights = get_weights(model)
    load_before = os.getloadavg()[0]

    started = time.perf_counter()
    process = ProcessEngine(model, clients, workers=args.workers)
    process_startup = time.perf_counter() - started
    started = time.perf_counter()
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    ray.init(num_cpus=args.workers, include_dashboard=False, logging_level="WARNING")
    ray_init = time.perf_counter() - started
    try:
        with process, RayEngine(model, clients, workers=args.workers) as on_ray:
            ray_startup = time.perf_counter() - started
            trained = train_side_by_side({"process": process, "ray": on_ray}, workload, model, rounds, args.seed)
            shared = process._weights

            def copy_weights():
                with torch.no_grad():
                    for key, buffer in shared.items():
                        buffer.copy_(weights[key])

            parts = {"process": overheads(process, weights, rounds[0], args.repeats, copy_weights),
                     "ray": overheads(on_ray, weights, rounds[0], args.repeats,
                                      lambda: ray.put({k: _array(v) for k, v in weights.items()}))}
    finally:
        ray.shutdown()
    results = {name: {"seconds": seconds, "samples": samples, **parts[name]}
               for name, (_, seconds, samples) in trained.items()}
    results["process"]["startup_s"] = process_startup
    results["ray"].update(startup_s=ray_startup, ray_init_s=ray_init)
    same_bits = all(torch.equal(trained["ray"][0][k], trained["process"][0][k]) for k in weights)

    report = {"workload": name, "workers": args.workers, "rounds": workload.rounds,
              "clients_per_round": workload.cohort_size, "parameters": sum(v.numel() for v in weights.values()),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                         f"ray {ray.__version__}",
              "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
              "same_bits": same_bits, **results}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1))
    print(table(report))
    if not same_bits:
        raise SystemExit("the engines' final weights differ")


def table(report: dict) -> str:
    p, r = report["process"], report["ray"]
    rate = {k: v["samples"] / v["seconds"] for k, v in (("process", p), ("ray", r))}
    per_round = {k: v["seconds"] / report["rounds"] for k, v in (("process", p), ("ray", r))}
    ms = 1000
    rows = [
        ("samples/s", f"{rate['process']:.0f}", f"{rate['ray']:.0f}", f"{rate['ray'] / rate['process']:.3f}"),
        ("seconds per round", f"{per_round['process']:.3f}", f"{per_round['ray']:.3f}",
         f"{per_round['ray'] / per_round['process']:.3f}"),
        ("start-up (s)", f"{p['startup_s']:.1f}", f"{r['startup_s']:.1f} ({r['ray_init_s']:.1f} ray.init)", ""),
        ("weights to workers (ms)", f"{p['weights_s'] * ms:.2f}", f"{r['weights_s'] * ms:.2f}", ""),
        (f"empty map of {report['clients_per_round']} clients (ms)", f"{p['empty_map_s'] * ms:.2f}",
         f"{r['empty_map_s'] * ms:.2f}", ""),
        (f"{report['clients_per_round']} updates back (ms)", f"{p['updates_s'] * ms:.2f}",
         f"{r['updates_s'] * ms:.2f}", ""),
    ]
    lines = [f"{report['workload']}: {report['rounds']} measured rounds of {report['clients_per_round']} clients, "
             f"{report['parameters']:,} parameters, {report['workers']} workers; {report['machine']}; "
             f"same final weights: {'yes' if report['same_bits'] else 'NO'}; 1-minute load average "
             f"{report['load_average_before']:.1f} before, {report['load_average_after']:.1f} after",
             "", "| | process engine | Ray engine | Ray / process |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
