"""The Ray engine gives the in-process engine's results, on a local Ray instance this module starts and stops."""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from fedmeta.algorithms.algorithm import TrainingWork  # noqa: E402
from fedmeta.algorithms.client_update import local_sgd  # noqa: E402
from fedmeta.algorithms.faults import Faults  # noqa: E402
from fedmeta.data.federated import ClientData, Examples  # noqa: E402
from fedmeta.engine import ClientFailure, Execution, InProcessEngine, RayEngine, WorkerError  # noqa: E402
from fedmeta.evaluation.personalization import personalize  # noqa: E402
from fedmeta.experiment.config import load_config  # noqa: E402
from fedmeta.experiment.run import run_experiment  # noqa: E402
from fedmeta.params import get_weights  # noqa: E402

import engine_cases  # noqa: E402
from engine_cases import (  # noqa: E402
    assert_same_bits, image_client, image_clients_by_id, new_model, single_threaded, train_rounds,
)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance for this module; this module's functions travel to the actors by value.

    4 logical CPUs on however many cores: the module's shared engine holds 2 actors
    while other tests start engines of their own.
    """
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.cloudpickle.register_pickle_by_value(engine_cases)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        ray.cloudpickle.unregister_pickle_by_value(engine_cases)


@pytest.fixture(scope="module")
def image_clients() -> dict[str, ClientData]:
    return image_clients_by_id()


@pytest.fixture(scope="module")
def engine(local_ray, image_clients):
    """Two actors holding the image clients, shared by the tests that leave them alive."""
    with RayEngine(new_model(), image_clients, workers=2) as engine:
        yield engine


def test_actors_give_the_bits_of_the_in_process_engine(engine, image_clients):
    expected = single_threaded(train_rounds, InProcessEngine(new_model()), image_clients)

    rounds = train_rounds(engine, image_clients)

    assert_same_bits(rounds[0], expected[0])
    assert rounds[1] == expected[1]
    assert sum(engine.clients_per_node.values()) >= 15  # 3 rounds of 5 clients ran on the actors


def without_times(history):
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in history]


def test_a_run_with_engine_kind_ray_has_the_bits_of_one_in_process(local_ray, tmp_path, capsys):
    settings = ["data.num_clients=12", "data.held_out_fraction=0.25", "rounds=3", "algorithm.cohort_size=4",
                "evaluation.every=2", "evaluation.fine_tune_epochs=2"]
    in_process = single_threaded(run_experiment, load_config(None, [*settings, "engine.workers=0",
                                                                    f"output_dir={tmp_path / 'a'}"]), progress=False)

    on_ray = run_experiment(load_config(None, [*settings, "engine.kind=ray", "engine.workers=2",
                                               f"output_dir={tmp_path / 'b'}"]), progress=False)

    assert without_times(on_ray.history) == without_times(in_process.history)
    assert_same_bits(on_ray.weights, in_process.weights)
    assert on_ray.report == in_process.report
    assert "fedmeta: ray engine: 2 actors on 1 node:" in capsys.readouterr().err


def test_personalization_through_actors_matches_the_in_process_engine(engine, image_clients):
    fine_tune = local_sgd(0.1, 4, epochs=2)
    weights = get_weights(new_model())
    clients = list(image_clients.values())
    expected = single_threaded(personalize, weights, clients, fine_tune, engine=InProcessEngine(new_model()), seed=3)

    report = personalize(weights, clients, fine_tune, engine=engine, seed=3)

    assert report.clients == expected.clients


def test_a_client_the_actors_do_not_hold_is_sent_with_its_task(engine):
    stranger = image_client(99, 11)
    update = TrainingWork(local_sgd(0.1, 4))
    weights = get_weights(new_model())
    expected = single_threaded(InProcessEngine(new_model(), Execution()).map, update, weights, [stranger], [5])

    # same id as a held client, different data: the object, not the id, decides
    impostor = ClientData("client00", stranger.train, stranger.test)
    sent = engine.map(update, weights, [stranger, impostor], [5, 5])

    for result in sent:
        assert result.num_examples == 11
        assert_same_bits(result.delta, expected[0].delta)


def started_at(model, weights, client, seed):
    return client.client_id, time.monotonic_ns()


def test_the_longest_clients_run_first(local_ray, image_clients):
    clients = list(image_clients.values())
    with RayEngine(new_model(), image_clients, workers=1) as engine:
        starts = engine.map(started_at, get_weights(new_model()), clients, [0] * len(clients))

    assert [cid for cid, _ in starts] == [c.client_id for c in clients]  # results keep the caller's order
    run_order = [cid for cid, _ in sorted(starts, key=lambda s: s[1])]
    assert run_order == [c.client_id for c in sorted(clients, key=lambda c: -c.num_train)]


def no_train(image_clients) -> ClientData:
    return ClientData("no-train", Examples(torch.zeros(0, 1, 6, 6), torch.zeros(0, dtype=torch.long)),
                      image_clients["client00"].test)


def test_a_failing_client_is_named_and_the_engine_stays_usable(engine, image_clients):
    update = TrainingWork(local_sgd(0.1, 4))
    weights = get_weights(new_model())

    with pytest.raises(ValueError, match="client 'no-train': client has no training examples") as raised:
        engine.map(update, weights, [image_clients["client01"], no_train(image_clients)], [1, 2])
    again = engine.map(update, weights, [image_clients["client01"]], [1])

    assert "in a Ray actor, running client 'no-train'" in "".join(raised.value.__notes__)
    assert again[0].num_examples == 30


def test_actors_collect_a_failing_client_and_run_the_others(engine, image_clients):
    update = TrainingWork(local_sgd(0.1, 4))
    weights = get_weights(new_model())
    cohort = [image_clients["client01"], no_train(image_clients), image_clients["client02"]]
    expected = engine.map(update, weights, [cohort[0], cohort[2]], [1, 3])

    results = engine.map(update, weights, cohort, [1, 2, 3], on_error="collect")

    assert isinstance(results[1], ClientFailure) and results[1].client_id == "no-train"
    assert str(results[1].error) == "client 'no-train': client has no training examples"
    assert "Traceback" in results[1].traceback
    for ours, theirs in zip([results[0], results[2]], expected):
        assert_same_bits(ours.delta, theirs.delta)


def test_faults_on_give_the_bits_of_the_in_process_engine(engine, image_clients):
    faults = Faults(dropout=0.2, seconds_per_example=0.1, slowdown_sigma=0.5, round_deadline=1.5, min_clients=2)
    expected = single_threaded(train_rounds, InProcessEngine(new_model()), image_clients, rounds=4, faults=faults)

    rounds = train_rounds(engine, image_clients, rounds=4, faults=faults)

    assert_same_bits(rounds[0], expected[0])
    assert rounds[1] == expected[1]


@dataclass(frozen=True)
class KillsItsActorOnce:
    """Client work that kills its own actor process (SIGKILL) the first time it runs ``client_id``."""

    work: TrainingWork
    client_id: str
    marker: str

    def __call__(self, model, weights, client, seed):
        if client.client_id == self.client_id and not os.path.exists(self.marker):
            Path(self.marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return self.work(model, weights, client, seed)


class CrashingOnce(RayEngine):
    """A Ray engine whose actor running ``client04`` is killed, once."""

    marker: str

    def map(self, work, *args, **kwargs):
        return super().map(KillsItsActorOnce(work, "client04", self.marker), *args, **kwargs)


def actor_pids(engine) -> list[int]:
    return [pid for _, _, pid in ray.get([actor.ready.remote() for actor in engine._actors])]


@pytest.mark.slow
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


@pytest.mark.slow
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


def exit_on_client03(model, weights, client, seed):
    if client.client_id == "client03":
        os._exit(7)
    return client.client_id


@pytest.mark.slow
def test_a_client_that_kills_every_actor_is_given_up_on_after_its_retries(local_ray, image_clients):
    clients = list(image_clients.values())
    weights = get_weights(new_model())
    with RayEngine(new_model(), image_clients, workers=2, client_retries=1) as engine:
        with pytest.warns(RuntimeWarning, match="running the client again"), pytest.raises(
                WorkerError, match=r"Ray actor \d died \(\w+\) while running client 'client03', 2 times: "
                                   r"giving up on the client"):
            engine.map(exit_on_client03, weights, clients, [0] * len(clients))
        with pytest.warns(RuntimeWarning):
            collected = engine.map(exit_on_client03, weights, clients, [0] * len(clients), on_error="collect")
        still_usable = engine.map(exit_on_client03, weights, clients[:3], [0] * 3)

    assert [r if isinstance(r, str) else r.client_id for r in collected] == [c.client_id for c in clients]
    assert isinstance(collected[3], ClientFailure) and isinstance(collected[3].error, WorkerError)
    assert still_usable == ["client00", "client01", "client02"]


def layout_and_precision(model, weights, client, seed):
    conv = model.conv[2].weight  # 4 input channels: the layouts differ
    with torch.no_grad():
        output_dtype = model.conv(client.train.x[:1]).dtype
    return conv.is_contiguous(memory_format=torch.channels_last), output_dtype, torch.get_num_threads()


def test_actors_run_single_threaded_in_the_configured_layout_and_precision(local_ray, image_clients):
    seen = []
    for execution in (Execution(), Execution(channels_last=False, bfloat16=True)):
        with RayEngine(new_model(), image_clients, workers=1, execution=execution) as engine:
            seen += engine.map(layout_and_precision, get_weights(new_model()), [image_clients["client00"]], [0])

    assert seen == [(True, torch.float32, 1), (False, torch.bfloat16, 1)]


def test_close_stops_every_actor(local_ray, image_clients):
    engine = RayEngine(new_model(), image_clients, workers=2)
    actors = list(engine._actors)

    engine.close()

    for actor in actors:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.ready.remote(), timeout=30)
    assert ray.is_initialized()  # the instance was this module's: the engine leaves it running
    with pytest.raises(RuntimeError, match="this engine is closed"):
        engine.map(started_at, get_weights(new_model()), list(image_clients.values())[:1], [0])


def test_bad_arguments_are_refused(engine, local_ray, image_clients):
    with pytest.raises(ValueError, match="at least 1 actor, got 0"):
        RayEngine(new_model(), image_clients, workers=0)
    with pytest.raises(ValueError, match="5 Ray actors need 5 CPUs, but the Ray cluster has 4"):
        RayEngine(new_model(), image_clients, workers=5)
    with pytest.raises(ValueError, match="got 2 clients but 1 seeds"):
        engine.map(started_at, get_weights(new_model()), list(image_clients.values())[:2], [0])
