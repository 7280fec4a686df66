"""What keeping client states on disk (``engine.client_states = "disk"``) costs against memory, side by side.

    python -m benchmarks.state_store                     # W5: Ditto on W1's FEMNIST data and CNN
    python -m benchmarks.state_store --dir /mnt/fast     # where the state files go (default: a temporary
                                                         # directory under the current one)

Two ``ProcessEngine``s (one worker per core each), one holding the states in memory, one
in files (``DiskStates``), train the same cohorts from the same model, round by round in
turn, rotating which goes first, so a change in the machine's load hits both alike; the
two end with the same weights, checked. Every ``--checkpoint-every`` rounds each saves a
checkpoint the way a run does (``save_checkpoint``): in memory it embeds every state held,
on disk it fsyncs the files written since the last one, names them, and removes the ones
superseded. Then each checkpoint is read back as a resume reads and checks it, and one
client's state is, on its own, ``--repeats`` times: written to a new file; copied from its
file (mapped) into a buffer, as the process engine copies a state into its worker's
slot; and copied into it from memory, as in memory mode. Medians; the file is read from
the page cache.

Prints a table and writes ``benchmarks/results/state_store.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import DEFAULT_DATA_DIR, build_workload_model, cohorts, load_and_date, load_note, \
    load_population, save_report, workload_by_name
from benchmarks.systems.fedmeta_system import algorithm
from fedmeta.algorithms.algorithm import init_state, run_round
from fedmeta.engine import ProcessEngine, default_workers
from fedmeta.engine.execution import single_threaded
from fedmeta.engine.states import DiskStates
from fedmeta.experiment.checkpoint import CLIENT_STATES_DIR, Checkpoint, read_checkpoint, save_checkpoint
from fedmeta.experiment.config import load_config
from fedmeta.experiment.provenance import provenance
from fedmeta.params import get_weights

RESULTS = Path(__file__).resolve().parent / "results" / "state_store.json"
STORES = ("memory", "disk")


def state_bytes(states) -> int:
    return sum(t.numel() * t.element_size() for state in states.values() for t in state.values())


def one_state_file(states, directory: Path, repeats: int) -> dict:
    """Median seconds to write one client's state to a new file, and to copy it into a buffer from there and
    from memory."""
    client_id, state = next(iter(states.items()))
    store = DiskStates(directory)
    slot = {k: torch.empty_like(v) for k, v in state.items()}
    times: dict[str, list[float]] = {"state_write_s": [], "state_read_s": [], "state_copy_s": []}

    def timed(key: str, action) -> None:
        started = time.perf_counter()
        action()
        times[key].append(time.perf_counter() - started)

    def copy_from(source) -> None:
        for k, v in source.items():
            slot[k].copy_(v)

    with single_threaded():  # as the engines keep their states: a copy split over busy cores waits for them
        for _ in range(repeats):
            timed("state_write_s", lambda: store.__setitem__(client_id, state))
            timed("state_read_s", lambda: copy_from(store[client_id]))
            timed("state_copy_s", lambda: copy_from(state))
    return {key: statistics.median(t) for key, t in times.items()} | \
        {"state_bytes_each": sum(t.numel() * t.element_size() for t in state.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="W5", help="a stateful workload (W5 Ditto, W6 FedRep)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--dir", type=Path, default=Path("."), help="where the checkpoints and state files go")
    parser.add_argument("--workers", type=int, default=default_workers(), help="workers per engine (default: cores)")
    parser.add_argument("--checkpoint-every", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20, help="writes and reads of one state file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    workload = workload_by_name(args.workload)
    clients, num_classes = load_population(workload, args.data_dir)
    model = build_workload_model(workload, num_classes, next(iter(clients.values())).train)
    weights = get_weights(model)
    rounds = [[clients[c] for c in ids] for ids in cohorts(workload, list(clients), args.seed)]
    schedule = algorithm(workload)
    where = Path(tempfile.mkdtemp(prefix="fedmeta-state-store-", dir=args.dir))
    configs = {store: load_config(None, [f"engine.client_states={store}"]) for store in STORES}
    measured = {store: {"round_s": 0.0, "checkpoint_s": [], "checkpoint_bytes": []} for store in STORES}
    load_before = os.getloadavg()[0]
    engines = {store: ProcessEngine(model, clients, workers=args.workers) for store in STORES}
    try:
        engines["disk"].restore_client_states(DiskStates(where / "disk" / CLIENT_STATES_DIR))
        (where / "memory").mkdir()
        states = {store: init_state(schedule, weights) for store in STORES}
        for round_idx, cohort in enumerate(rounds):
            turn = round_idx % 2
            for store in STORES[turn:] + STORES[:turn]:
                started = time.perf_counter()
                states[store], _ = run_round(schedule, states[store], cohort, engine=engines[store], seed=args.seed,
                                             round_idx=round_idx)
                if round_idx >= workload.warmup_rounds:
                    measured[store]["round_s"] += time.perf_counter() - started
                if (round_idx + 1) % args.checkpoint_every == 0:
                    path = where / store / "checkpoint.pt"
                    started = time.perf_counter()
                    save_checkpoint(path, Checkpoint(configs[store], states[store], round_idx + 1,
                                                     client_states=engines[store].client_states()))
                    measured[store]["checkpoint_s"].append(time.perf_counter() - started)
                    measured[store]["checkpoint_bytes"].append(path.stat().st_size)
        if not all(torch.equal(states["memory"].weights[k], states["disk"].weights[k]) for k in weights):
            raise RuntimeError("the engines ended with different weights")
        for store in STORES:
            held = engines[store].client_states()
            measured[store].update(clients_with_state=len(held), states_bytes=state_bytes(held),
                                   held_in_memory_bytes=0 if store == "disk" else state_bytes(held))
            started = time.perf_counter()
            checkpoint = read_checkpoint(where / store / "checkpoint.pt")
            shapes = [tuple(t.shape) for state in checkpoint.client_states.values() for t in state.values()]
            measured[store].update(read_back_s=time.perf_counter() - started, read_back_tensors=len(shapes))
        files = list((where / "disk" / CLIENT_STATES_DIR).iterdir())
        measured["disk"]["files"] = len(files)
        measured["disk"]["files_bytes"] = sum(f.stat().st_size for f in files)
        measured["disk"].update(one_state_file(engines["memory"].client_states(), where / "one", args.repeats))
    finally:
        for engine in engines.values():
            engine.close()
        shutil.rmtree(where, ignore_errors=True)

    report = {"workload": workload.name, "method": schedule.name, "workers": args.workers,
              "rounds": workload.rounds, "cohort_size": workload.cohort_size,
              "checkpoint_every": args.checkpoint_every, "cpu": provenance()["cpu"],
              "machine": f"{os.cpu_count()} cores, torch {torch.__version__}", **load_and_date(load_before),
              "runs": measured}
    save_report(RESULTS, report)
    print(table(report))


def table(report: dict) -> str:
    """Seconds per round and per checkpoint, and what each keeps where, as a markdown table."""
    runs = report["runs"]
    lines = [f"{report['workload']} ({report['method']}): {report['rounds']} measured rounds of "
             f"{report['cohort_size']} clients, {report['workers']} workers per engine, a checkpoint every "
             f"{report['checkpoint_every']}; {report['cpu']}, {report['machine']}; {report['date']}; "
             f"{load_note(report)}", "",
             "| client states | s/round | vs memory | checkpoints, s each | last checkpoint file | read back, s "
             "| states held in memory | on disk |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    for store, r in runs.items():
        on_disk = f"{r['files_bytes'] / 1e6:.0f} MB ({r['files']} files)" if store == "disk" else "–"
        lines.append(
            f"| {store} | {r['round_s'] / report['rounds']:.3f} | "
            f"{r['round_s'] / runs['memory']['round_s']:.3f} | "
            f"{', '.join(f'{s:.2f}' for s in r['checkpoint_s'])} | {r['checkpoint_bytes'][-1] / 1e6:.1f} MB | "
            f"{r['read_back_s']:.2f} | {r['held_in_memory_bytes'] / 1e6:.0f} MB ({r['clients_with_state']} clients) "
            f"| {on_disk} |")
    disk = runs["disk"]
    lines += ["", f"One client's state ({disk['state_bytes_each'] / 1e6:.1f} MB), medians: written to a new file in "
                  f"{disk['state_write_s'] * 1000:.1f} ms; copied into a buffer from its file (mapped, in the page "
                  f"cache) in {disk['state_read_s'] * 1000:.1f} ms, "
                  f"from memory in {disk['state_copy_s'] * 1000:.1f} ms."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
