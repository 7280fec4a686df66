"""What only the Ray engine does, on a local Ray instance this module starts and stops: actors that die, placement.

What every engine does (the in-process engine's bits, failures, faults) is in test_engine_contract.py.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

ray = pytest.importorskip("ray")

from fedmeta.algorithms.algorithm import TrainingWork  # noqa: E402
from fedmeta.algorithms.client_update import local_sgd  # noqa: E402
from fedmeta.data.federated import ClientData  # noqa: E402
from fedmeta.engine import Execution, RayEngine  # noqa: E402
from fedmeta.params import get_weights  # noqa: E402

from engine_cases import (  # noqa: E402
    KillsItsWorkerOnce, assert_same_bits, image_clients_by_id, new_model, running_ray, started_at,
    train_rounds,
)

pytestmark = pytest.mark.slow  # every test here starts Ray, which takes seconds


@pytest.fixture(scope="module")
def local_ray():
    """4 logical CPUs: the module's shared engine holds 2 actors while other tests start their own."""
    with running_ray(4, __name__):
        yield


@pytest.fixture(scope="module")
def image_clients() -> dict[str, ClientData]:
    return image_clients_by_id()


@pytest.fixture(scope="module")
def engine(local_ray, image_clients):
    """Two actors holding the image clients, shared by the tests that leave them alive."""
    with RayEngine(new_model(), image_clients, workers=2) as engine:
        yield engine


class CrashingOnce(RayEngine):
    """A Ray engine whose actor running ``client04`` is killed, once."""

    marker: str

    def map(self, work, *args, **kwargs):
        return super().map(KillsItsWorkerOnce(work, "client04", self.marker), *args, **kwargs)


def test_the_engine_counts_the_clients_each_node_ran(engine, image_clients):
    before = sum(engine.clients_per_node.values())

    engine.map(started_at, get_weights(new_model()), list(image_clients.values()), [0] * len(image_clients))

    assert len(engine.clients_per_node) == 1  # one node: this machine
    assert sum(engine.clients_per_node.values()) - before == len(image_clients)


def actor_pids(engine) -> list[int]:
    return [pid for _, _, pid in ray.get([actor.ready.remote() for actor in engine._actors])]


@pytest.mark.bits
def test_an_actor_killed_while_running_a_client_is_replaced_and_the_rounds_keep_their_bits(
        engine, local_ray, image_clients, tmp_path):
    expected = train_rounds(engine, image_clients)
    with CrashingOnce(new_model(), image_clients, workers=2) as crashing:
        crashing.marker = str(tmp_path / "killed")
        pids = actor_pids(crashing)

        with pytest.warns(RuntimeWarning, match=r"Ray actor \d died \(\w+\) while running client 'client04'; "
                                                r"replaced it and running the client again"):
            crashed = train_rounds(crashing, image_clients)

        assert len(set(pids) - set(actor_pids(crashing))) == 1  # one actor was replaced
    assert (tmp_path / "killed").exists()
    assert_same_bits(crashed[0], expected[0])
    assert crashed[1] == expected[1]


def test_an_actor_killed_between_maps_is_replaced_and_its_client_runs_again(engine, image_clients):
    update = TrainingWork(local_sgd(0.1, 4))
    weights = get_weights(new_model())
    clients = list(image_clients.values())
    expected = engine.map(update, weights, clients, list(range(len(clients))))
    victim = actor_pids(engine)[1]
    os.kill(victim, signal.SIGKILL)

    with pytest.warns(RuntimeWarning, match="replaced it and running the client again"):
        again = engine.map(update, weights, clients, list(range(len(clients))))

    assert victim not in actor_pids(engine)
    for ours, theirs in zip(again, expected):
        assert_same_bits(ours.delta, theirs.delta)


def _dies_within(actor, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            ray.get(actor.ready.remote(), timeout=seconds)
        except ray.exceptions.RayActorError:
            return True
        time.sleep(0.1)
    return False


def test_close_stops_every_actor(local_ray, image_clients):
    engine = RayEngine(new_model(), image_clients, workers=2)
    actors = list(engine._actors)

    engine.close()

    for actor in actors:  # ray.kill is asynchronous: a call sent just after it may still be answered
        assert _dies_within(actor, seconds=30)
    assert ray.is_initialized()  # the instance was this module's: the engine leaves it running
    with pytest.raises(RuntimeError, match="this engine is closed"):
        engine.map(started_at, get_weights(new_model()), list(image_clients.values())[:1], [0])


def test_no_actors_or_more_actors_than_cpus_are_refused(local_ray, image_clients):
    with pytest.raises(ValueError, match="at least 1 actor, got 0"):
        RayEngine(new_model(), image_clients, workers=0)
    with pytest.raises(ValueError, match="5 Ray actors need 5 CPUs, but the Ray cluster has 4"):
        RayEngine(new_model(), image_clients, workers=5)


def test_actors_on_gpus_need_as_many_gpus_in_the_cluster(local_ray, image_clients):
    with pytest.raises(ValueError, match=r"1 Ray actors on engine.device = 'cuda' need 1 GPUs, but the Ray cluster "
                                         r"has 0: use fewer workers, or add GPU nodes"):
        RayEngine(new_model(), image_clients, workers=1, execution=Execution(device="cuda"))
