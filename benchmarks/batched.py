"""The batched engine against client-by-client engines: the same FedAvg rounds, side by side, in one invocation.

    python -m benchmarks.batched                      # W1 (FEMNIST) if its data is there, and S400
    python -m benchmarks.batched --workloads S400

Per workload, three engines run the same rounds (same cohorts, seeds and model), round by
round in turn, alternating which goes first: the in-process engine client by client on one
thread, the process engine with one single-threaded worker per core, and the in-process
engine with ``batched=True`` (each cohort as one ``torch.func.vmap`` computation on all of
torch's threads). Reported: samples per second over the measured rounds, each as a ratio
to the process engine (the default), and how far the batched run's final weights are from
the client-by-client ones (float rounding, not bits). Prints a table per workload; writes
``benchmarks/results/batched.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import torch

from benchmarks.common import (
    DEFAULT_DATA_DIR, build_workload_model, cohorts, load_and_date, load_note, load_population, save_report,
    workload_by_name,
)
from benchmarks.ray_engine import train_side_by_side
from fedmeta.engine import InProcessEngine, ProcessEngine, default_workers

RESULTS = Path(__file__).resolve().parent / "results" / "batched.json"
ENGINES = ("client by client", "process engine", "batched")


def cpu() -> str:
    """The CPU's model name and the vector units that move these ratios (AVX2, AVX-512, AMX)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    units = [unit for unit in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if unit in flags]
    return f"{name} ({', '.join(units) or 'no AVX2'})"


def measure(name: str, data_dir: Path, seed: int) -> dict:
    workload = workload_by_name(name)
    if workload.kind != "train":
        raise SystemExit(f"{name} is not a training workload")
    clients, num_classes = load_population(workload, data_dir)
    model = build_workload_model(workload, num_classes, next(iter(clients.values())).train)
    rounds = [[clients[c] for c in ids] for ids in cohorts(workload, list(clients), seed)]
    load_before = os.getloadavg()[0]
    with ProcessEngine(model, clients, workers=default_workers()) as process:
        engines = {ENGINES[0]: InProcessEngine(build_workload_model(workload, num_classes, rounds[0][0].train)),
                   ENGINES[1]: process,
                   ENGINES[2]: InProcessEngine(build_workload_model(workload, num_classes, rounds[0][0].train),
                                               batched=True)}
        trained = train_side_by_side(engines, workload, model, rounds, seed)
    reference = trained[ENGINES[0]][0]
    gap = max(float((trained[ENGINES[2]][0][k] - w).abs().max()) for k, w in reference.items())
    return {"workload": name, "rounds": workload.rounds, "warmup_rounds": workload.warmup_rounds,
            "clients_per_round": workload.cohort_size, "workers": default_workers(),
            "parameters": sum(v.numel() for v in reference.values()), "batched_weight_gap": gap,
            "samples_per_s": {k: samples / seconds for k, (_, seconds, samples) in trained.items()},
            **load_and_date(load_before)}


def table(report: dict) -> str:
    rates = report["samples_per_s"]
    lines = [f"{report['workload']}: {report['rounds'] - report['warmup_rounds']} measured rounds of "
             f"{report['clients_per_round']} clients, {report['parameters']:,} parameters; {load_note(report)}; "
             f"batched final weights within {report['batched_weight_gap']:.1e} of client by client",
             "", "| engine | samples/s | / process engine |", "|---|---|---|"]
    lines += [f"| {name} | {rates[name]:.0f} | {rates[name] / rates[ENGINES[1]]:.2f}x |" for name in ENGINES]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", help="comma-separated: W1, W2, W4, S<population> (default: W1 if its "
                                            "data is there, and S400)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    have_femnist = (args.data_dir / "femnist" / "femnist_train.h5").exists()
    names = args.workloads.split(",") if args.workloads else (["W1"] if have_femnist else []) + ["S400"]
    machine = (f"{cpu()}, {os.cpu_count()} cores, torch {torch.__version__} "
               f"({torch.get_num_threads()} threads for the batched engine)")
    reports = [measure(name, args.data_dir, args.seed) for name in names]
    save_report(RESULTS, {"machine": machine, "workloads": reports})
    print(machine)
    for report in reports:
        print("\n" + table(report))


if __name__ == "__main__":
    main()
