import pytest
import torch
from torch.utils.data import TensorDataset

from fedmeta.data.federated import Examples
from fedmeta.data.partition import dirichlet_partition, split_client_examples


def balanced(num_classes=10, per_class=100):
    y = torch.arange(num_classes).repeat_interleave(per_class)
    return Examples(torch.randn(len(y), 3, generator=torch.Generator().manual_seed(0)), y)


def classes_holding_90_percent(client):
    """How many of a client's most common classes it takes to cover 90% of its examples."""
    counts = torch.bincount(torch.cat([client.train.y, client.test.y]), minlength=10).sort(descending=True).values
    return int((counts.cumsum(0) < 0.9 * counts.sum()).sum()) + 1


def mean_classes_holding_90_percent(dataset):
    return sum(classes_holding_90_percent(c) for c in dataset.clients.values()) / len(dataset.clients)


def test_every_example_goes_to_exactly_one_client():
    data = balanced()

    dataset = dirichlet_partition(data, 10, alpha=0.5)

    rows = torch.cat([torch.cat([c.train.x, c.test.x]) for c in dataset.clients.values()])
    assert len(dataset.clients) == 10
    assert len(rows) == 1000
    assert len(torch.unique(rows, dim=0)) == 1000


def test_small_alpha_concentrates_clients_on_few_classes_and_large_alpha_spreads_them():
    skewed = dirichlet_partition(balanced(), 10, alpha=0.05)
    spread = dirichlet_partition(balanced(), 10, alpha=100.0)

    assert mean_classes_holding_90_percent(skewed) < 3
    assert mean_classes_holding_90_percent(spread) >= 8


def test_large_alpha_gives_every_client_nearly_the_pooled_label_mix():
    dataset = dirichlet_partition(balanced(per_class=200), 5, alpha=1000.0)

    shares = torch.stack([torch.bincount(torch.cat([c.train.y, c.test.y]), minlength=10) / (c.num_train + len(c.test))
                          for c in dataset.clients.values()])
    assert float((shares - 0.1).abs().max()) < 0.05


def test_a_torch_dataset_partitions_like_the_same_tensors():
    data = balanced()

    from_tensors = dirichlet_partition(data, 5, alpha=0.5, seed=1)
    from_dataset = dirichlet_partition(TensorDataset(data.x, data.y), 5, alpha=0.5, seed=1)

    for cid, client in from_tensors.clients.items():
        assert torch.equal(client.train.x, from_dataset.clients[cid].train.x)
        assert torch.equal(client.test.y, from_dataset.clients[cid].test.y)


def test_same_seed_gives_the_same_partition_and_another_seed_another():
    first, again, other = (dirichlet_partition(balanced(), 5, alpha=0.5, seed=s) for s in (2, 2, 3))

    assert all(torch.equal(first.clients[cid].train.x, again.clients[cid].train.x) for cid in first.clients)
    assert [c.num_train for c in first.clients.values()] != [c.num_train for c in other.clients.values()]


def test_every_client_gets_at_least_min_examples_with_a_test_split():
    dataset = dirichlet_partition(balanced(), 20, alpha=0.1, min_examples=10)

    assert all(c.num_train + len(c.test) >= 10 and c.num_train >= 1 and len(c.test) >= 1
               for c in dataset.clients.values())


@pytest.mark.parametrize("kwargs, message", [
    ({"alpha": 0.0}, "alpha must be > 0, got 0.0"),
    ({"num_clients": 1}, "num_clients must be >= 2, got 1"),
    ({"num_clients": 600}, "1000 examples cannot give 600 clients 2 examples each"),
    ({"test_fraction": 0.0}, r"test_fraction must be in \(0, 1\), got 0.0"),
    ({"min_examples": 1}, r"min_examples must be >= 2 \(one train, one test\), got 1"),
    ({"num_classes": 5}, r"labels must be a 1-D tensor in 0..4, got shape \(1000,\) with values 0..9"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=f"dirichlet_partition: {message}"):
        dirichlet_partition(balanced(), **{"num_clients": 10, "alpha": 0.5, **kwargs})


def test_a_split_that_cannot_reach_min_examples_says_what_to_change():
    one_class = Examples(torch.arange(30.0)[:, None], torch.zeros(30, dtype=torch.int64))

    # alpha 1e-4 gives (nearly) all 30 examples to one of the two clients in every draw
    with pytest.raises(ValueError, match=r"no draw in 1000 gave every client 14 examples; raise alpha \(0.0001\) "
                                         r"or lower num_clients \(2\)"):
        dirichlet_partition(one_class, 2, alpha=1e-4, min_examples=14)


def test_clients_given_by_their_examples_each_keep_every_example_once_split_into_train_and_test():
    clients = {f"c{k}": (torch.arange(5.0).reshape(5, 1) + 10 * k, torch.arange(5.0) * k) for k in range(4)}

    dataset = split_client_examples(clients, test_fraction=0.2, held_out_fraction=0.25, seed=3)

    assert (len(dataset.train_ids), len(dataset.held_out_ids)) == (3, 1)
    for client_id, (x, _) in clients.items():
        client = dataset.clients[client_id]
        assert (len(client.train), len(client.test)) == (4, 1)  # round(0.2 · 5) = 1 to test
        assert sorted(torch.cat([client.train.x, client.test.x]).flatten().tolist()) == x.flatten().tolist()
    assert dataset.num_classes == 1  # one regression value per example


@pytest.mark.bits
def test_clients_given_by_their_examples_split_the_same_for_the_same_seed():
    clients = {c: (torch.randn(9, 2, generator=torch.Generator().manual_seed(i)), torch.randn(9, 3))
               for i, c in enumerate("abcd")}

    first, again = (split_client_examples(clients, seed=1) for _ in range(2))

    assert first.held_out_ids == again.held_out_ids
    assert all(torch.equal(first.clients[c].test.x, again.clients[c].test.x) for c in clients)
    assert first.num_classes == 3  # three labels (or values) per example


def test_a_client_with_one_example_is_refused_naming_it():
    clients = {"a": (torch.zeros(3, 1), torch.zeros(3)), "b": (torch.zeros(1, 1), torch.zeros(1))}

    with pytest.raises(ValueError, match=r"^clients: client 'b' has 1 inputs and 1 targets; each client needs as "
                                         r"many of both, at least 2"):
        split_client_examples(clients)


def test_a_dirichlet_split_refuses_regression_targets_rather_than_truncating_them():
    data = TensorDataset(torch.randn(40, 2), torch.linspace(0, 1, 40))

    with pytest.raises(ValueError, match=r"^dirichlet_partition: labels must be integers .*a mapping of client ids "
                                         r"to \(x, y\)$"):
        dirichlet_partition(data, 4, alpha=1.0)
