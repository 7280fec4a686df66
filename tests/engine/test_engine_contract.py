"""Every engine gives the in-process engine's results: one contract, run on each kind of engine.

The kinds are the in-process engine, worker processes and Ray actors (skipped without the
``ray`` extra). Tests are grouped by kind (a module-scoped parameter), so Ray starts only
after the last worker process has forked and stops before the next module. What only one
engine has (killing one of its workers, fork and spawn, Ray clusters) is tested in its own module.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import re
from typing import Iterator

import pytest
import torch

from fedmeta.algorithms.algorithm import TrainingWork
from fedmeta.algorithms.client_update import local_sgd
from fedmeta.algorithms.faults import Faults
from fedmeta.data.federated import ClientData
from fedmeta.engine import ClientFailure, Execution, InProcessEngine, ProcessEngine, WorkerError
from fedmeta.evaluation.personalization import personalize
from fedmeta.experiment.run import run_experiment
from fedmeta.params import get_weights

from engine_cases import (
    assert_same_bits, broken_image_client, device_probe, exit_on_client03, image_client, image_clients_by_id,
    new_model, no_train,
    running_ray, started_at, train_rounds,
)
from run_cases import without_times

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs the ray extra")
RAY = pytest.param("ray", marks=[needs_ray, pytest.mark.slow])  # starting Ray takes seconds: the slow tier


def kinds(*kinds):
    """Runs the test once per engine kind, grouped by kind across the module."""
    return pytest.mark.parametrize("kind", [RAY if kind == "ray" else kind for kind in kinds], indirect=True,
                                   scope="module")


every_engine = kinds("in_process", "process", "ray")
every_parallel_engine = kinds("process", "ray")  # the in-process engine has no workers: it runs clients in order
# where a failing client's error says it ran
RAN_IN = {"in_process": [], "process": ["in a worker, running client 'no-train'"],
          "ray": ["in a Ray actor, running client 'no-train'"]}


@pytest.fixture(scope="module")
def kind(request) -> Iterator[str]:
    """The kind of engine under test; with "ray", a local Ray instance runs meanwhile."""
    # 5 logical CPUs on however many cores: the shared engines hold 3 actors while a test starts up to 2 more
    with running_ray(5, __name__) if request.param == "ray" else contextlib.nullcontext():
        yield request.param


@pytest.fixture(scope="module")
def image_clients() -> dict[str, ClientData]:
    return image_clients_by_id()


def start_engine(kind: str, clients: dict[str, ClientData], workers: int = 2, execution: Execution = Execution(),
                 model: torch.nn.Module | None = None, **parallel):
    """An engine of ``kind`` holding ``clients`` (the in-process engine holds none and has no workers).

    ``parallel`` goes to a parallel engine alone (``client_retries``).
    """
    model = new_model() if model is None else model
    if kind == "in_process":
        return InProcessEngine(model, execution)
    if kind == "process":
        return ProcessEngine(model, clients, workers=workers, execution=execution, **parallel)
    from fedmeta.engine import RayEngine

    return RayEngine(model, clients, workers=workers, execution=execution, **parallel)


@pytest.fixture(scope="module")
def engine(kind, image_clients):
    """Two workers holding the image clients, shared by the tests of one kind."""
    with start_engine(kind, image_clients) as engine:
        yield engine


@pytest.fixture(scope="module")
def one_worker(kind, image_clients):
    """One worker holding the image clients, shared by the tests of one kind."""
    with start_engine(kind, image_clients, workers=1) as engine:
        yield engine


@every_engine
@pytest.mark.bits
def test_the_engine_gives_the_bits_of_the_in_process_engine_on_one_thread(engine, image_clients):
    expected = train_rounds(InProcessEngine(new_model()), image_clients)

    rounds = train_rounds(engine, image_clients)

    assert_same_bits(rounds[0], expected[0])
    assert rounds[1] == expected[1]


@every_engine
@pytest.mark.bits
def test_personalization_through_the_engine_matches_the_in_process_engine(engine, image_clients):
    fine_tune = local_sgd(0.1, 4, epochs=2)
    weights = get_weights(new_model())
    clients = list(image_clients.values())
    expected = personalize(weights, clients, fine_tune, engine=InProcessEngine(new_model()), seed=3)

    report = personalize(weights, clients, fine_tune, engine=engine, seed=3)

    assert report.clients == expected.clients


@every_engine
def test_client_work_finds_model_weights_and_data_on_the_device_with_each_client_moved_once_per_worker(
        kind, image_clients):
    # "meta" stands in for a GPU on any machine: tensors move there and keep their shapes, without values
    model = new_model()
    clients = list(image_clients.values())
    with start_engine(kind, image_clients, workers=1, execution=Execution(device="meta"), model=model) as engine:
        rounds = [engine.map(device_probe, get_weights(new_model()), clients, [0] * len(clients)) for _ in range(2)]

    for first, second in zip(*rounds):
        assert first[:3] == ("meta", ["meta"], "meta")
        assert (first[3], first[4]) == (second[3], second[4])  # the same moved data, in the same worker
    assert all(p.device.type == "cpu" for p in model.parameters())  # the caller's model stays where it was


@every_parallel_engine
def test_a_client_the_workers_do_not_hold_is_sent_with_its_task(engine):
    stranger = image_client(99, 11)
    update = TrainingWork(local_sgd(0.1, 4))
    weights = get_weights(new_model())
    expected = InProcessEngine(new_model(), Execution()).map(update, weights, [stranger], [5])

    # same id as a held client, different data: the object, not the id, decides
    impostor = ClientData("client00", stranger.train, stranger.test)
    sent = engine.map(update, weights, [stranger, impostor], [5, 5])

    for result in sent:
        assert result.num_examples == 11
        assert_same_bits(result.delta, expected[0].delta)


@every_parallel_engine
def test_the_longest_clients_run_first(one_worker, image_clients):
    clients = list(image_clients.values())

    starts = one_worker.map(started_at, get_weights(new_model()), clients, [0] * len(clients))

    assert [cid for cid, _ in starts] == [c.client_id for c in clients]  # results keep the caller's order
    run_order = [cid for cid, _ in sorted(starts, key=lambda s: s[1])]
    assert run_order == [c.client_id for c in sorted(clients, key=lambda c: -c.num_train)]


@every_engine
def test_a_failing_client_is_named_and_the_engine_stays_usable(kind, engine, image_clients):
    update = TrainingWork(local_sgd(0.1, 4))
    weights = get_weights(new_model())

    with pytest.raises(ValueError, match="client 'no-train': client has no training examples") as raised:
        engine.map(update, weights, [image_clients["client01"], no_train(image_clients["client00"].test)], [1, 2])
    again = engine.map(update, weights, [image_clients["client01"]], [1])

    notes = getattr(raised.value, "__notes__", [])
    assert [note.split(":\n")[0] for note in notes] == RAN_IN[kind]
    assert again[0].num_examples == 30


@every_engine
def test_the_engine_collects_a_failing_client_and_runs_the_others(engine, image_clients):
    update = TrainingWork(local_sgd(0.1, 4))
    weights = get_weights(new_model())
    cohort = [image_clients["client01"], no_train(image_clients["client00"].test), image_clients["client02"]]
    expected = engine.map(update, weights, [cohort[0], cohort[2]], [1, 3])

    results = engine.map(update, weights, cohort, [1, 2, 3], on_error="collect")

    assert isinstance(results[1], ClientFailure) and results[1].client_id == "no-train"
    assert str(results[1].error) == "client 'no-train': client has no training examples"
    assert "Traceback" in results[1].traceback
    for ours, theirs in zip([results[0], results[2]], expected):
        assert_same_bits(ours.delta, theirs.delta)


# how each kind says that the worker running a client ended: exit code 7 (``exit_on_client03``), or Ray's cause
DIED = {"process": r"worker \d died \(exit code 7\)", "ray": r"Ray actor \d died \(\w+\)"}


@every_parallel_engine
def test_a_client_that_kills_every_worker_is_given_up_on_after_its_retries(kind, image_clients):
    clients = list(image_clients.values())
    weights = get_weights(new_model())
    with start_engine(kind, image_clients, client_retries=1) as engine:
        with pytest.warns(RuntimeWarning, match="running the client again"), pytest.raises(
                WorkerError, match=DIED[kind] + " while running client 'client03', 2 times: giving up on the client"):
            engine.map(exit_on_client03, weights, clients, [0] * len(clients))
        with pytest.warns(RuntimeWarning):
            collected = engine.map(exit_on_client03, weights, clients, [0] * len(clients), on_error="collect")
        still_usable = engine.map(exit_on_client03, weights, clients[:3], [0] * 3)

    assert [r if isinstance(r, str) else r.client_id for r in collected] == [c.client_id for c in clients]
    assert isinstance(collected[3], ClientFailure) and isinstance(collected[3].error, WorkerError)
    assert still_usable == ["client00", "client01", "client02"]


@pytest.fixture(scope="module")
def faulty_clients(image_clients) -> dict[str, ClientData]:
    """The image clients and two broken ones; sorted ids put both in the first rounds' cohorts."""
    return {**image_clients, "broken": broken_image_client("broken", (1, 5, 5)),
            "client00nan": broken_image_client("client00nan", (1, 6, 6), math.nan)}


FAULTS = Faults(dropout=0.2, seconds_per_example=0.1, slowdown_sigma=0.5, round_deadline=1.5, min_clients=2)


def faulty_rounds(engine, clients):
    with pytest.warns(RuntimeWarning, match="client 'broken' failed and is left out: RuntimeError"):
        return train_rounds(engine, clients, rounds=4, faults=FAULTS)


@every_engine
@pytest.mark.bits
def test_faults_on_give_the_bits_of_the_in_process_engine(engine, faulty_clients):
    expected = faulty_rounds(InProcessEngine(new_model()), faulty_clients)

    rounds = faulty_rounds(engine, faulty_clients)

    assert_same_bits(rounds[0], expected[0])
    assert rounds[1] == expected[1]
    totals = {k: sum(m[k] for m in rounds[1]) for k in ("faults/dropped", "faults/stragglers", "faults/failed",
                                                        "faults/rejected")}
    assert all(totals.values()), totals  # every kind of fault happened


@every_parallel_engine
@pytest.mark.bits
def test_one_worker_gives_the_bits_of_two_with_faults_on(engine, one_worker, faulty_clients):
    expected = faulty_rounds(engine, faulty_clients)

    rounds = faulty_rounds(one_worker, faulty_clients)

    assert_same_bits(rounds[0], expected[0])
    assert rounds[1] == expected[1]


def layout_and_precision(model, weights, client, seed):
    conv = model.conv[2].weight  # 4 input channels: the layouts differ
    with torch.no_grad():
        output_dtype = model.conv(client.train.x[:1]).dtype
    return conv.is_contiguous(memory_format=torch.channels_last), output_dtype, torch.get_num_threads()


@every_engine
def test_client_work_runs_single_threaded_in_channels_last_and_float32_by_default(one_worker, image_clients):
    seen = one_worker.map(layout_and_precision, get_weights(new_model()), [image_clients["client00"]], [0])

    assert seen == [(True, torch.float32, 1)]


@every_engine
@pytest.mark.parametrize("execution, expected", [
    (Execution(channels_last=False), (False, torch.float32, 1)),
    (Execution(bfloat16=True), (True, torch.bfloat16, 1)),
], ids=["nchw", "bfloat16"])
def test_client_work_runs_single_threaded_in_the_configured_layout_and_precision(kind, image_clients, execution,
                                                                                 expected):
    with start_engine(kind, image_clients, workers=1, execution=execution) as engine:
        seen = engine.map(layout_and_precision, get_weights(new_model()), [image_clients["client00"]], [0])

    assert seen == [expected]


@every_parallel_engine
def test_as_many_seeds_as_clients_are_required(engine, image_clients):
    with pytest.raises(ValueError, match="got 2 clients but 1 seeds"):
        engine.map(started_at, get_weights(new_model()), list(image_clients.values())[:2], [0])


@kinds("process", pytest.param("ray", marks=[needs_ray, pytest.mark.slow]))  # a whole run on Ray: slow
@pytest.mark.bits
def test_a_run_on_the_engine_has_the_bits_of_one_in_process(kind, tmp_path, capsys, tiny_config):
    in_process = run_experiment(tiny_config(tmp_path / "a"), progress=False)

    run = run_experiment(tiny_config(tmp_path / "b", f"engine.kind={kind}", "engine.workers=2"), progress=False)

    assert without_times(run.history) == without_times(in_process.history)
    assert_same_bits(run.weights, in_process.weights)
    assert run.report == in_process.report
    announced = re.findall(r"^fedmeta: ray engine: (\d+ actors? on \d+ nodes?):", capsys.readouterr().err, re.M)
    assert announced == {"process": [], "ray": ["2 actors on 1 node"]}[kind]
