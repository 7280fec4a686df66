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


def test_map_gives_the_same_bits_as_a_direct_loop(initial_weights, clients):
    update = local_sgd(0.3, batch_size=1, epochs=2)
    seeds = [11, 12, 13, 14]
    direct = [update(nn.Linear(2, 2), initial_weights, c.train, s) for c, s in zip(clients, seeds)]

    mapped = InProcessEngine(nn.Linear(2, 2)).map(TrainingWork(update), initial_weights, clients, seeds)

    assert [u.num_examples for u in mapped] == [2, 3, 4, 3]
    for ours, theirs in zip(mapped, direct):
        assert ours.metrics == theirs.metrics
        assert all(torch.equal(ours.delta[k], theirs.delta[k]) for k in theirs.delta)
