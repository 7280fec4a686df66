"""The process engine gives the in-process engine's results, whatever the number of workers."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fedmeta.algorithms.algorithm import TrainingWork
from fedmeta.algorithms.client_update import local_sgd
from fedmeta.algorithms.faults import Faults
from fedmeta.data.federated import ClientData, Examples
from fedmeta.engine import ClientFailure, Execution, InProcessEngine, ProcessEngine, WorkerError, default_workers
from fedmeta.engine.process import PARENT_CHECK_SECONDS
from fedmeta.evaluation.personalization import personalize
from fedmeta.params import get_weights

from engine_cases import assert_same_bits, image_client, image_clients_by_id, new_model, train_rounds


@pytest.fixture(scope="module")
def image_clients() -> dict[str, ClientData]:
    return image_clients_by_id()


def test_the_number_of_workers_does_not_change_a_single_bit(image_clients):
    results = {}
    for workers in (1, 2, 3):
        with ProcessEngine(new_model(), image_clients, workers=workers) as engine:
            results[workers] = train_rounds(engine, image_clients)

    assert_same_bits(results[1][0], results[2][0])
    assert_same_bits(results[1][0], results[3][0])
    assert results[1][1] == results[2][1] == results[3][1]


def test_workers_give_the_bits_of_the_in_process_engine_on_one_thread(image_clients):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a worker's setting; kernels may reduce differently on more threads
    try:
        in_process = train_rounds(InProcessEngine(new_model()), image_clients)
    finally:
        torch.set_num_threads(threads)
    with ProcessEngine(new_model(), image_clients, workers=2) as engine:
        parallel = train_rounds(engine, image_clients)

    assert_same_bits(in_process[0], parallel[0])
    assert in_process[1] == parallel[1]


@pytest.mark.slow
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


def test_personalization_through_workers_matches_the_in_process_engine(image_clients):
    fine_tune = local_sgd(0.1, 4, epochs=2)
    weights = get_weights(new_model())
    clients = list(image_clients.values())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = personalize(weights, clients, fine_tune, engine=InProcessEngine(new_model()), seed=3)
    finally:
        torch.set_num_threads(threads)
    with ProcessEngine(new_model(), image_clients, workers=2) as engine:
        report = personalize(weights, clients, fine_tune, engine=engine, seed=3)

    assert report.clients == expected.clients


def test_a_client_the_workers_do_not_hold_is_sent_with_its_task(image_clients):
    stranger = image_client(99, 11)
    update = TrainingWork(local_sgd(0.1, 4))
    weights = get_weights(new_model())
    expected = InProcessEngine(new_model(), Execution()).map(update, weights, [stranger], [5])

    with ProcessEngine(new_model(), image_clients, workers=2) as engine:
        # same id as a held client, different data: the object, not the id, decides
        impostor = ClientData("client00", stranger.train, stranger.test)
        sent = engine.map(update, weights, [stranger, impostor], [5, 5])

    for result in sent:
        assert result.num_examples == 11
        assert torch.allclose(result.delta["head.3.weight"], expected[0].delta["head.3.weight"], atol=1e-6)


def started_at(model, weights, client, seed):
    return client.client_id, time.monotonic_ns()


def test_the_longest_clients_run_first(image_clients):
    clients = list(image_clients.values())
    with ProcessEngine(new_model(), image_clients, workers=1) as engine:
        starts = engine.map(started_at, get_weights(new_model()), clients, [0] * len(clients))

    assert [cid for cid, _ in starts] == [c.client_id for c in clients]  # results keep the caller's order
    run_order = [cid for cid, _ in sorted(starts, key=lambda s: s[1])]
    assert run_order == [c.client_id for c in sorted(clients, key=lambda c: -c.num_train)]


def test_a_failing_client_is_named_and_the_engine_stays_usable(image_clients):
    empty = ClientData("no-train", Examples(torch.zeros(0, 1, 6, 6), torch.zeros(0, dtype=torch.long)),
                       image_clients["client00"].test)
    update = TrainingWork(local_sgd(0.1, 4))
    weights = get_weights(new_model())
    with ProcessEngine(new_model(), image_clients, workers=2) as engine:
        with pytest.raises(ValueError, match="client 'no-train': client has no training examples"):
            engine.map(update, weights, [image_clients["client01"], empty], [1, 2])
        again = engine.map(update, weights, [image_clients["client01"]], [1])

    assert again[0].num_examples == 30


def test_workers_collect_a_failing_client_and_run_the_others(image_clients):
    empty = ClientData("no-train", Examples(torch.zeros(0, 1, 6, 6), torch.zeros(0, dtype=torch.long)),
                       image_clients["client00"].test)
    update = TrainingWork(local_sgd(0.1, 4))
    weights = get_weights(new_model())
    cohort = [image_clients["client01"], empty, image_clients["client02"]]
    with ProcessEngine(new_model(), image_clients, workers=2) as engine:
        expected = engine.map(update, weights, [cohort[0], cohort[2]], [1, 3])

        results = engine.map(update, weights, cohort, [1, 2, 3], on_error="collect")

    assert isinstance(results[1], ClientFailure) and results[1].client_id == "no-train"
    assert str(results[1].error) == "client 'no-train': client has no training examples"
    assert "Traceback" in results[1].traceback
    for ours, theirs in zip([results[0], results[2]], expected):
        assert_same_bits(ours.delta, theirs.delta)


@dataclass(frozen=True)
class KillsItsWorkerOnce:
    """Client work that kills its own worker process (SIGKILL) the first time it runs ``client_id``."""

    work: TrainingWork
    client_id: str
    marker: str

    def __call__(self, model, weights, client, seed):
        if client.client_id == self.client_id and not os.path.exists(self.marker):
            Path(self.marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return self.work(model, weights, client, seed)


class CrashingOnce(ProcessEngine):
    """A process engine whose worker running ``client04`` is killed, once."""

    marker: str

    def map(self, work, *args, **kwargs):
        return super().map(KillsItsWorkerOnce(work, "client04", self.marker), *args, **kwargs)


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


def exit_on_client03(model, weights, client, seed):
    if client.client_id == "client03":
        os._exit(7)
    return client.client_id


def test_a_client_that_kills_every_worker_is_given_up_on_after_its_retries(image_clients):
    clients = list(image_clients.values())
    weights = get_weights(new_model())
    with ProcessEngine(new_model(), image_clients, workers=2, client_retries=1) as engine:
        with pytest.warns(RuntimeWarning, match="running the client again"), pytest.raises(
                WorkerError, match=r"worker \d died \(exit code 7\) while running client 'client03', 2 times: "
                                   r"giving up on the client"):
            engine.map(exit_on_client03, weights, clients, [0] * len(clients))
        with pytest.warns(RuntimeWarning):
            collected = engine.map(exit_on_client03, weights, clients, [0] * len(clients), on_error="collect")
        still_usable = engine.map(exit_on_client03, weights, clients[:3], [0] * 3)

    assert [r if isinstance(r, str) else r.client_id for r in collected] == [c.client_id for c in clients]
    assert isinstance(collected[3], ClientFailure) and isinstance(collected[3].error, WorkerError)
    assert still_usable == ["client00", "client01", "client02"]


def broken_image_client(client_id: str, shape: tuple[int, ...], fill: float | None = None) -> ClientData:
    x = torch.rand(5, *shape) if fill is None else torch.full((5, *shape), fill)
    return ClientData(client_id, Examples(x, torch.zeros(5, dtype=torch.long)), Examples(x[:2], torch.zeros(2)))


def test_the_number_of_workers_does_not_change_a_bit_with_faults_on(image_clients):
    # sorted ids: broken, client00, client00nan, client01, ...: both in the first rounds' cohorts
    clients = {**image_clients, "broken": broken_image_client("broken", (1, 5, 5)),
               "client00nan": broken_image_client("client00nan", (1, 6, 6), math.nan)}
    faults = Faults(dropout=0.2, seconds_per_example=0.1, slowdown_sigma=0.5, round_deadline=1.5, min_clients=2)
    results = {}
    for workers in (1, 2):
        with ProcessEngine(new_model(), clients, workers=workers) as engine, \
                pytest.warns(RuntimeWarning, match="client 'broken' failed and is left out: RuntimeError"):
            results[workers] = train_rounds(engine, clients, rounds=4, faults=faults)

    assert_same_bits(results[1][0], results[2][0])
    assert results[1][1] == results[2][1]
    totals = {k: sum(m[k] for m in results[1][1]) for k in ("faults/dropped", "faults/stragglers", "faults/failed",
                                                            "faults/rejected")}
    assert all(totals.values()), totals  # every kind of fault happened


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


def layout_and_precision(model, weights, client, seed):
    conv = model.conv[2].weight  # 4 input channels: the layouts differ
    with torch.no_grad():
        output_dtype = model.conv(client.train.x[:1]).dtype
    return conv.is_contiguous(memory_format=torch.channels_last), output_dtype, torch.get_num_threads()


@pytest.mark.parametrize("execution, expected", [
    (Execution(), (True, torch.float32, 1)),
    (Execution(channels_last=False), (False, torch.float32, 1)),
    (Execution(bfloat16=True), (True, torch.bfloat16, 1)),
])
def test_workers_run_single_threaded_in_the_configured_layout_and_precision(image_clients, execution, expected):
    with ProcessEngine(new_model(), image_clients, workers=1, execution=execution) as engine:
        seen = engine.map(layout_and_precision, get_weights(new_model()), [image_clients["client00"]], [0])

    assert seen == [expected]


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


def test_bad_arguments_are_refused(image_clients):
    with pytest.raises(ValueError, match="at least 1 worker, got 0"):
        ProcessEngine(new_model(), image_clients, workers=0)
    with ProcessEngine(new_model(), image_clients, workers=1) as engine:
        with pytest.raises(ValueError, match="got 2 clients but 1 seeds"):
            engine.map(started_at, get_weights(new_model()), list(image_clients.values())[:2], [0])


def test_the_default_is_one_worker_per_usable_core():
    assert default_workers() == len(os.sched_getaffinity(0))
