"""What only the process engine does: fork and spawn, workers that die, orphaned workers.

What every engine does (the in-process engine's bits, failures, faults) is in test_engine_contract.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedmeta.algorithms.algorithm import TrainingWork
from fedmeta.algorithms.client_update import local_sgd
from fedmeta.data.federated import ClientData
from fedmeta.engine import Execution, InProcessEngine, ProcessEngine, default_workers
from fedmeta.engine.process import PARENT_CHECK_SECONDS
from fedmeta.params import get_weights

from engine_cases import (
    KillsItsWorkerOnce, assert_same_bits, image_clients_by_id, new_model, started_at, train_rounds,
)


@pytest.fixture(scope="module")
def image_clients() -> dict[str, ClientData]:
    return image_clients_by_id()


@pytest.mark.bits
def test_the_number_of_workers_does_not_change_a_single_bit(image_clients):
    results = {}
    for workers in (1, 2, 3):
        with ProcessEngine(new_model(), image_clients, workers=workers) as engine:
            results[workers] = train_rounds(engine, image_clients)

    assert_same_bits(results[1][0], results[2][0])
    assert_same_bits(results[1][0], results[3][0])
    assert results[1][1] == results[2][1] == results[3][1]


@pytest.mark.slow
@pytest.mark.bits
def test_spawned_workers_give_the_bits_of_the_in_process_engine(image_clients):
    update = TrainingWork(local_sgd(0.1, 4, epochs=3))
    weights = get_weights(new_model())
    clients = list(image_clients.values())
    seeds = list(range(len(clients)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = InProcessEngine(new_model()).map(update, weights, clients, seeds)
    finally:
        torch.set_num_threads(threads)

    with ProcessEngine(new_model(), image_clients, workers=2, start_method="spawn") as engine:
        spawned = engine.map(update, weights, clients, seeds)

    # spawn pickles the model through shared memory: without a private copy each, both workers train one model
    for ours, theirs in zip(spawned, expected):
        assert_same_bits(ours.delta, theirs.delta)


class CrashingOnce(ProcessEngine):
    """A process engine whose worker running ``client04`` is killed, once."""

    marker: str

    def map(self, work, *args, **kwargs):
        return super().map(KillsItsWorkerOnce(work, "client04", self.marker), *args, **kwargs)


@pytest.mark.bits
def test_a_worker_killed_while_running_a_client_is_replaced_and_the_rounds_keep_their_bits(image_clients, tmp_path):
    with ProcessEngine(new_model(), image_clients, workers=2) as engine:
        expected = train_rounds(engine, image_clients)
    with CrashingOnce(new_model(), image_clients, workers=2) as engine:
        engine.marker = str(tmp_path / "killed")
        pids = [p.pid for p in engine._processes]

        with pytest.warns(RuntimeWarning, match=r"worker \d died \(exit code -9\) while running client 'client04'; "
                                                r"replaced it and running the client again"):
            crashed = train_rounds(engine, image_clients)

        assert len(set(pids) - {p.pid for p in engine._processes}) == 1  # one worker was replaced
    assert (tmp_path / "killed").exists()
    assert_same_bits(crashed[0], expected[0])
    assert crashed[1] == expected[1]


def test_a_worker_killed_between_maps_is_replaced_before_the_next(image_clients):
    update = TrainingWork(local_sgd(0.1, 4))
    weights = get_weights(new_model())
    clients = list(image_clients.values())
    with ProcessEngine(new_model(), image_clients, workers=2) as engine:
        expected = engine.map(update, weights, clients, list(range(len(clients))))
        victim = engine._processes[1]
        os.kill(victim.pid, signal.SIGKILL)
        victim.join()

        again = engine.map(update, weights, clients, list(range(len(clients))))

        assert engine._processes[1].is_alive() and engine._processes[1] is not victim
    for ours, theirs in zip(again, expected):
        assert_same_bits(ours.delta, theirs.delta)


def test_close_stops_every_worker(image_clients):
    engine = ProcessEngine(new_model(), image_clients, workers=2)
    processes = list(engine._processes)
    assert all(p.is_alive() for p in processes)

    engine.close()

    assert not any(p.is_alive() for p in processes)
    with pytest.raises(RuntimeError, match="this engine is closed"):
        engine.map(started_at, get_weights(new_model()), list(image_clients.values())[:1], [0])


ORPHAN_SCRIPT = """
import sys, torch
from fedmeta.data.federated import ClientData, Examples
from fedmeta.engine import ProcessEngine
client = ClientData("c", Examples(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)),
                    Examples(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long)))
engine = ProcessEngine(torch.nn.Linear(3, 2), {"c": client}, workers=2)
print(*(p.pid for p in engine._processes), flush=True)
sys.stdin.read()  # until killed
"""


def running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for a reaper does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_workers_exit_when_their_parent_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", ORPHAN_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    workers = [int(pid) for pid in parent.stdout.readline().split()]
    assert len(workers) == 2 and all(running(pid) for pid in workers)

    parent.kill()  # SIGKILL: no cleanup runs in the parent
    parent.wait()
    deadline = time.monotonic() + 10 * PARENT_CHECK_SECONDS
    while any(running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)

    left = [pid for pid in workers if running(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"workers {left} outlived their killed parent"


def test_bfloat16_changes_the_update_only_slightly(image_clients):
    update = TrainingWork(local_sgd(0.1, 4))
    weights = get_weights(new_model())
    client = [image_clients["client01"]]
    with ProcessEngine(new_model(), image_clients, workers=1) as engine:
        full = engine.map(update, weights, client, [1])[0].delta
    with ProcessEngine(new_model(), image_clients, workers=1, execution=Execution(bfloat16=True)) as engine:
        half = engine.map(update, weights, client, [1])[0].delta

    assert not torch.equal(full["conv.2.weight"], half["conv.2.weight"])
    for key in full:
        assert torch.allclose(full[key], half[key], atol=0.05), key


def test_no_workers_is_refused(image_clients):
    with pytest.raises(ValueError, match="at least 1 worker, got 0"):
        ProcessEngine(new_model(), image_clients, workers=0)


def test_the_default_is_one_worker_per_usable_core():
    assert default_workers() == len(os.sched_getaffinity(0))
