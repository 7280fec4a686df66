import pytest
import torch
from torch import nn

from fedmeta.algorithms.algorithm import TrainingWork
from fedmeta.algorithms.client_update import local_sgd
from fedmeta.engine.local import InProcessEngine


def test_map_returns_results_in_client_order_with_each_clients_seed(initial_weights, clients):
    engine = InProcessEngine(nn.Linear(2, 2))
    seeds = [40, 30, 20, 10]

    results = engine.map(lambda model, weights, client, seed: (client.client_id, seed), initial_weights,
                         clients, seeds)

    assert results == [("a", 40), ("b", 30), ("c", 20), ("d", 10)]


def test_map_hands_the_same_model_object_to_every_client(initial_weights, clients):
    model = nn.Linear(2, 2)
    engine = InProcessEngine(model)

    seen = engine.map(lambda m, weights, client, seed: m, initial_weights, clients, [0] * len(clients))

    assert all(m is model for m in seen)


@pytest.mark.bits
def test_map_gives_the_same_bits_as_a_direct_loop(initial_weights, clients):
    update = local_sgd(0.3, batch_size=1, epochs=2)
    seeds = [11, 12, 13, 14]
    direct = [update(nn.Linear(2, 2), initial_weights, c.train, s) for c, s in zip(clients, seeds)]

    mapped = InProcessEngine(nn.Linear(2, 2)).map(TrainingWork(update), initial_weights, clients, seeds)

    assert [u.num_examples for u in mapped] == [2, 3, 4, 3]
    for ours, theirs in zip(mapped, direct):
        assert ours.metrics == theirs.metrics
        assert all(torch.equal(ours.delta[k], theirs.delta[k]) for k in theirs.delta)


def test_collect_puts_a_failure_at_the_failing_clients_position_and_runs_the_others(initial_weights, clients):
    def work(model, weights, client, seed):
        if client.client_id == "b":
            raise KeyError("no label map")
        return client.client_id

    results = InProcessEngine(nn.Linear(2, 2)).map(work, initial_weights, clients, [0] * 4, on_error="collect")

    assert [r if isinstance(r, str) else type(r).__name__ for r in results] == ["a", "ClientFailure", "c", "d"]
    assert results[1].client_id == "b" and results[1].error.args == ("no label map",)
    assert 'raise KeyError("no label map")' in results[1].traceback


def test_raise_lets_the_first_error_through(initial_weights, clients):
    def work(model, weights, client, seed):
        raise KeyError(client.client_id)

    with pytest.raises(KeyError, match="'a'"):
        InProcessEngine(nn.Linear(2, 2)).map(work, initial_weights, clients, [0] * 4)


def test_an_unknown_on_error_is_refused(initial_weights, clients):
    with pytest.raises(ValueError, match=r"on_error must be one of \('raise', 'collect'\), got 'skip'"):
        InProcessEngine(nn.Linear(2, 2)).map(TrainingWork(local_sgd(0.1)), initial_weights, clients, [0] * 4,
                                             on_error="skip")


def test_client_work_runs_on_one_thread_and_the_callers_thread_count_comes_back(initial_weights, clients):
    # a reduction split over threads rounds differently: one thread is what workers and actors use
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = InProcessEngine(nn.Linear(2, 2)).map(lambda *_: torch.get_num_threads(), initial_weights, clients,
                                                    [0] * 4)
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)

    assert seen == [1, 1, 1, 1]
    assert after == 2
