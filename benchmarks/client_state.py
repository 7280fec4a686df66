"""The memory budget of client state: bytes per client that each stateful method keeps, measured.

    python -m benchmarks.client_state

For the FEMNIST CNN (``fedavg_cnn``) and the Shakespeare ``char_lstm``, each method runs
one round on the two smallest real clients of the dataset (an in-process engine) and the
states the engine then holds are measured, tensor by tensor; nothing is computed by hand.
FedRep and FedPer keep the model's last layer (``FEDREP_HEAD``). Totals are bytes per
client times a population: the writers (roles) of the data here, and TFF's 3,400 FEMNIST
writers; the engine holds every state in the process that runs the rounds.

Prints a table and writes ``benchmarks/results/client_state.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common import DEFAULT_DATA_DIR, DITTO_LAM, FEDREP_HEAD, WORKLOADS, Workload, \
    build_workload_model, load_population, save_report
from fedmeta.algorithms.algorithm import FederatedAlgorithm, init_state, run_round
from fedmeta.algorithms.presets import ditto, fedper, fedrep, pfedme, scaffold
from fedmeta.client_work import ClientState
from fedmeta.data.federated import ClientData
from fedmeta.engine import InProcessEngine
from fedmeta.params import get_weights

RESULTS = Path(__file__).resolve().parent / "results" / "client_state.json"
METHODS = ("ditto", "fedrep", "fedper", "pfedme", "scaffold")
MODELS = {"fedavg_cnn": WORKLOADS["W1"], "char_lstm": WORKLOADS["W4"]}
TFF_FEMNIST_WRITERS = 3400


def method(name: str, model: str, num_clients: int) -> FederatedAlgorithm:
    """The method with its shipped config's keys that shape the state (none do but the personal modules)."""
    head = FEDREP_HEAD[model]
    return {"ditto": lambda: ditto(DITTO_LAM),
            "fedrep": lambda: fedrep(head),
            "fedper": lambda: fedper(head),
            "pfedme": lambda: pfedme(15.0, local_steps=2, inner_steps=1),
            "scaffold": lambda: scaffold(num_clients)}[name]()


def state_bytes(state: ClientState) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def measure(name: str, workload: Workload, clients: dict[str, ClientData], num_classes: int) -> dict:
    """One round of ``name`` on the two smallest clients; what each then keeps, as the engine holds it."""
    model = build_workload_model(workload, num_classes, next(iter(clients.values())).train)
    weights = get_weights(model)
    cohort = sorted(clients.values(), key=lambda c: (c.num_train, c.client_id))[:2]
    schedule = method(name, workload.model, len(clients))
    engine = InProcessEngine(model)
    run_round(schedule, init_state(schedule, weights), cohort, engine=engine, seed=0, round_idx=0)
    states = engine.client_states()
    sizes = {state_bytes(state) for state in states.values()}
    if len(sizes) > 1:
        raise RuntimeError(f"{name}: clients keep states of different sizes {sorted(sizes)}")
    keys = sorted(next(iter(states.values()))) if states else []
    return {"method": schedule.name, "clients_with_state": len(states), "keys": keys,
            "bytes_per_client": sizes.pop() if sizes else 0, "model_bytes": state_bytes(weights),
            "whole_model": set(keys) == set(weights)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    args = parser.parse_args()
    rows = []
    for model, workload in MODELS.items():
        clients, num_classes = load_population(workload, args.data_dir)
        for name in METHODS:
            row = measure(name, workload, clients, num_classes)
            row.update(model=model, clients_here=len(clients))
            rows.append(row)
    report = {"date": time.strftime("%Y-%m-%d"), "rows": rows}
    save_report(RESULTS, report)
    print(table(report))


def table(report: dict) -> str:
    """Bytes per client and what they come to for the data here and for TFF's FEMNIST, as a markdown table."""
    lines = ["| model | method | a client keeps | bytes per client | share of the model | clients here | total here "
             f"| total for TFF's {TFF_FEMNIST_WRITERS:,} FEMNIST writers |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for row in report["rows"]:
        kept = "one value per weight" if row["whole_model"] else ", ".join(row["keys"]) or "nothing"
        size = row["bytes_per_client"]
        here = row["clients_here"]
        tff = readable(size * TFF_FEMNIST_WRITERS) if row["model"] == "fedavg_cnn" else "–"
        lines.append(f"| {row['model']} | {row['method']} | {kept} | {size:,} | {size / row['model_bytes']:.3f} "
                     f"| {here:,} | {readable(size * here)} | {tff} |")
    return "\n".join(lines)


def readable(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


if __name__ == "__main__":
    main()
