"""Client states held by the engine: carried between maps, the same bits on every engine, restored on resume."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from fedmeta.client_work import ClientFailure, ClientUpdate
from fedmeta.data.federated import ClientData, Examples
from fedmeta.engine import InProcessEngine, ProcessEngine


def client(client_id: str, n: int) -> ClientData:
    x = torch.arange(n * 2, dtype=torch.float32).reshape(n, 2) / 10
    return ClientData(client_id, Examples(x, torch.zeros(n, dtype=torch.long)), Examples(x[:1], torch.zeros(1)))


CLIENTS = {c.client_id: c for c in (client("a", 1), client("b", 2), client("c", 3))}


@dataclass(frozen=True)
class CountVisits:
    """State: how often the client ran, and the sum of its weights' first entry over its runs.

    A client named ``fails`` raises; its update's delta is its visit count.
    """

    fails: str = ""

    def init_client_state(self, weights):
        return {"visits": torch.zeros(()), "seen": torch.zeros(()) + weights["weight"][0, 0]}

    def __call__(self, model, weights, data, state, seed):
        if data.client_id == self.fails:
            raise ValueError("this client fails")
        visits = state["visits"] + 1
        seen = state["seen"] + weights["weight"][0, 0]
        delta = {k: torch.full_like(w, float(visits)) for k, w in weights.items()}
        return ClientUpdate(delta, data.num_train, {"visits": float(visits)}), {"visits": visits, "seen": seen}


def weights_of(value: float) -> dict[str, torch.Tensor]:
    return {"weight": torch.full((1, 2), value), "bias": torch.full((1,), value)}


def run_three_maps(engine) -> tuple[list, dict]:
    """Three maps: a and b, then b and c, then a, b and c; weights 1, 2, 3."""
    results = []
    for value, ids in [(1.0, "ab"), (2.0, "bc"), (3.0, "abc")]:
        results.append(engine.map_stateful(CountVisits(), weights_of(value), [CLIENTS[i] for i in ids],
                                           [0] * len(ids)))
    return results, engine.client_states()


def engines():
    yield "in-process", lambda: InProcessEngine(nn.Linear(2, 1))
    for workers in (1, 2):
        yield f"process-{workers}", lambda workers=workers: ProcessEngine(nn.Linear(2, 1), CLIENTS, workers=workers)


@pytest.mark.parametrize("make", [make for _, make in engines()], ids=[name for name, _ in engines()])
def test_each_client_starts_from_the_state_its_last_run_left(make):
    with make() as engine:
        results, states = run_three_maps(engine)

    assert [[u.metrics["visits"] for u in r] for r in results] == [[1, 1], [2, 1], [2, 3, 2]]
    assert list(states) == ["a", "b", "c"]
    # a: init at 1 (first seen with weights 1), then ran with 1 and 3
    assert {k: float(s["seen"]) for k, s in states.items()} == {"a": 1 + 1 + 3, "b": 1 + 1 + 2 + 3, "c": 2 + 2 + 3}
    assert float(results[2][1].delta["weight"][0, 1]) == 3.0


@pytest.mark.parametrize("make", [make for _, make in engines()], ids=[name for name, _ in engines()])
def test_a_client_whose_work_raised_keeps_its_old_state(make):
    with make() as engine:
        engine.map_stateful(CountVisits(), weights_of(1.0), [CLIENTS["a"], CLIENTS["b"]], [0, 0])
        before = engine.client_states()["b"]

        results = engine.map_stateful(CountVisits(fails="b"), weights_of(5.0), [CLIENTS["a"], CLIENTS["b"]], [0, 0],
                                      on_error="collect")
        after = engine.client_states()

    assert isinstance(results[1], ClientFailure)
    assert float(after["a"]["visits"]) == 2.0
    assert torch.equal(after["b"]["visits"], before["visits"]) and torch.equal(after["b"]["seen"], before["seen"])


@pytest.mark.parametrize("make", [make for _, make in engines()], ids=[name for name, _ in engines()])
def test_restored_states_continue_as_if_the_maps_that_made_them_had_run_there(make):
    with InProcessEngine(nn.Linear(2, 1)) as first:
        first.map_stateful(CountVisits(), weights_of(1.0), [CLIENTS["a"], CLIENTS["b"]], [0, 0])
        saved = first.client_states()
        expected = first.map_stateful(CountVisits(), weights_of(2.0), [CLIENTS["a"], CLIENTS["c"]], [0, 0])

    with make() as engine:
        engine.restore_client_states(saved)
        resumed = engine.map_stateful(CountVisits(), weights_of(2.0), [CLIENTS["a"], CLIENTS["c"]], [0, 0])

    assert [u.metrics for u in resumed] == [u.metrics for u in expected] == [{"visits": 2.0}, {"visits": 1.0}]


def num_train(model, weights, data, seed):
    return data.num_train


def test_stateless_maps_leave_the_states_alone():
    with ProcessEngine(nn.Linear(2, 1), CLIENTS, workers=2) as engine:
        engine.map_stateful(CountVisits(), weights_of(1.0), [CLIENTS["a"]], [0])

        sizes = engine.map(num_train, weights_of(1.0), list(CLIENTS.values()), [0, 0, 0])

        assert sizes == [1, 2, 3]
        assert list(engine.client_states()) == ["a"]


@pytest.mark.slow  # starts Ray
def test_ray_actors_carry_states_as_the_in_process_engine_does(local_ray):
    from fedmeta.engine.ray_engine import RayEngine

    with InProcessEngine(nn.Linear(2, 1)) as engine:
        expected_results, expected_states = run_three_maps(engine)

    with RayEngine(nn.Linear(2, 1), CLIENTS, workers=2) as engine:
        results, states = run_three_maps(engine)

    assert [[u.metrics for u in r] for r in results] == [[u.metrics for u in r] for r in expected_results]
    assert states.keys() == expected_states.keys()
    assert all(torch.equal(states[c][k], expected_states[c][k]) for c in states for k in states[c])
