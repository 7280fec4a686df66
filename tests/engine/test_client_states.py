"""Client states held by the engine: carried between maps, the same bits on every engine, restored on resume;
in memory or on disk (``DiskStates``: a new file per state, nothing on the heap)."""

from __future__ import annotations

import errno
import gc
import os
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from fedmeta.client_work import ClientFailure, ClientUpdate
from fedmeta.data.federated import ClientData, Examples
from fedmeta.engine import InProcessEngine, ProcessEngine
from fedmeta.engine.states import DiskStates, StateWriteError, state_file_name, state_file_version


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


# states on disk (DiskStates)
def disk_engines():
    yield "in-process", lambda clients: InProcessEngine(nn.Linear(2, 1))
    yield "process-2", lambda clients: ProcessEngine(nn.Linear(2, 1), clients, workers=2)


ENGINES = [make for _, make in disk_engines()]
ENGINE_NAMES = [name for name, _ in disk_engines()]


def same_states(a, b) -> bool:
    return list(a) == list(b) and all(a[c].keys() == b[c].keys() and all(torch.equal(a[c][k], b[c][k]) for k in a[c])
                                      for c in a)


@pytest.mark.parametrize("make", ENGINES, ids=ENGINE_NAMES)
@pytest.mark.bits
def test_states_on_disk_give_the_bits_of_states_in_memory(tmp_path, make):
    with make(CLIENTS) as engine:
        expected_results, expected_states = run_three_maps(engine)

    with make(CLIENTS) as engine:
        engine.restore_client_states(DiskStates(tmp_path))
        results, states = run_three_maps(engine)

    assert isinstance(states, DiskStates)
    assert [[u.metrics for u in r] for r in results] == [[u.metrics for u in r] for r in expected_results]
    assert same_states(states, expected_states)


def test_each_new_state_is_a_new_file_and_superseded_ones_go_once_removed(tmp_path):
    states = DiskStates(tmp_path)
    with InProcessEngine(nn.Linear(2, 1)) as engine:
        engine.restore_client_states(states)
        run_three_maps(engine)  # a runs twice, b three times, c twice

    written = sorted(p.name for p in tmp_path.iterdir())
    named = states.files()
    states.remove_unreferenced()

    assert written == ["a.1.pt", "a.2.pt", "b.1.pt", "b.2.pt", "b.3.pt", "c.1.pt", "c.2.pt"]
    assert named == {"a": "a.2.pt", "b": "b.3.pt", "c": "c.2.pt"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.2.pt", "b.3.pt", "c.2.pt"]
    assert float(DiskStates(tmp_path, named)["b"]["visits"]) == 3.0


@dataclass(frozen=True)
class BigState:
    """State: 64 KiB of float32 per client, its visit count in every entry; the delta is tiny."""

    def init_client_state(self, weights):
        return {"memory": torch.zeros(16384)}

    def __call__(self, model, weights, data, state, seed):
        return ClientUpdate({k: torch.zeros_like(w) for k, w in weights.items()}, data.num_train, {}), \
            {"memory": state["memory"] + 1}


def tensor_bytes() -> int:
    """Bytes of every tensor the interpreter holds (storages shared by views counted once)."""
    gc.collect()
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in gc.get_objects() if issubclass(type(t), torch.Tensor)}
    return sum(storages.values())


@pytest.mark.parametrize("make", ENGINES, ids=ENGINE_NAMES)
def test_the_process_holds_no_state_on_disk_however_many_clients_have_one(tmp_path, make):
    many = {f"c{i:02d}": ClientData(f"c{i:02d}", Examples(torch.ones(1, 2), torch.zeros(1, dtype=torch.long)),
                                    Examples(torch.ones(1, 2), torch.zeros(1, dtype=torch.long)))
            for i in range(40)}
    grown = {}
    for where in ("memory", "disk"):
        with make(many) as engine:
            if where == "disk":
                engine.restore_client_states(DiskStates(tmp_path))
            before = tensor_bytes()

            for value in (1.0, 2.0):
                engine.map_stateful(BigState(), weights_of(value), list(many.values()), [0] * 40)
            grown[where] = tensor_bytes() - before
            held = engine.client_states()["c39"]["memory"]

            assert held.nbytes == 65536 and float(held[0]) == 2.0

    assert grown["memory"] >= 40 * 65536  # the measure sees the states where they are held
    assert grown["disk"] < 65536  # not even one: each was written and let go


@given(st.text(min_size=1, max_size=40), st.integers(1, 10**6))
def test_a_state_file_name_is_safe_and_tells_its_client_and_version(client_id, version):
    name = state_file_name(client_id, version)

    assert "/" not in name and name not in (".", "..")
    assert state_file_version(client_id, name) == version
    assert state_file_version(client_id + "x", name) is None


def test_names_that_are_no_state_file_of_the_client_have_no_version():
    assert state_file_name("f0424/27", 3) == "f0424%2F27.3.pt"
    assert [state_file_version("a", n) for n in ("a.0.pt", "a.01.pt", "a.x.pt", "b.1.pt", "a.1", "../a.1.pt")] == \
        [None] * 6


def test_a_state_file_missing_or_not_its_clients_is_refused_naming_it(tmp_path):
    states = DiskStates(tmp_path)
    states["a"] = {"x": torch.ones(2)}
    states["b"] = {"x": torch.zeros(2)}
    os.replace(tmp_path / "b.1.pt", tmp_path / "a.1.pt")

    with pytest.raises(ValueError) as wrong:
        states["a"]
    with pytest.raises(FileNotFoundError) as missing:
        states["b"]

    assert str(wrong.value) == f"{tmp_path / 'a.1.pt'}: not state 1 of client 'a': it holds state 1 of client 'b'"
    assert str(missing.value) == f"{tmp_path / 'b.1.pt'}: missing: state 1 of client 'b'"


def test_a_state_that_cannot_be_written_stops_the_map_and_the_client_keeps_its_old_one(tmp_path, monkeypatch):
    states = DiskStates(tmp_path)
    with InProcessEngine(nn.Linear(2, 1)) as engine:
        engine.restore_client_states(states)
        engine.map_stateful(CountVisits(), weights_of(1.0), [CLIENTS["a"]], [0])

        def full_disk(obj, file):
            file.write(b"partly")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(torch, "save", full_disk)
        with pytest.raises(StateWriteError) as error:  # not a ClientFailure: the client did nothing wrong
            engine.map_stateful(CountVisits(), weights_of(1.0), [CLIENTS["a"]], [0], on_error="collect")
        monkeypatch.undo()

        assert str(error.value) == f"{tmp_path / 'a.2.pt'}: cannot write the state of client 'a' " \
                                   "(No space left on device)"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.1.pt"]
        assert float(engine.client_states()["a"]["visits"]) == 1.0


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


@pytest.mark.slow  # starts Ray
@pytest.mark.bits
def test_ray_actors_with_states_on_disk_give_the_bits_of_states_in_memory(tmp_path, local_ray):
    from fedmeta.engine.ray_engine import RayEngine

    with InProcessEngine(nn.Linear(2, 1)) as engine:
        expected_results, expected_states = run_three_maps(engine)

    with RayEngine(nn.Linear(2, 1), CLIENTS, workers=2) as engine:
        engine.restore_client_states(DiskStates(tmp_path))
        results, states = run_three_maps(engine)

    assert [[u.metrics for u in r] for r in results] == [[u.metrics for u in r] for r in expected_results]
    assert same_states(states, expected_states)
