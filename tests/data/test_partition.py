import pytest
import torch
from torch.utils.data import TensorDataset

from fedmeta.data.federated import Examples
from fedmeta.data.partition import dirichlet_partition


def balanced(num_classes=10, per_class=100):
    y = torch.arange(num_classes).repeat_interleave(per_class)
    return Examples(torch.randn(len(y), 3, generator=torch.Generator().manual_seed(0)), y)


def classes_holding_90_percent(client):
    counts = torch.bincount(torch.cat([client.train.y, client.test.y]), minlength=10).sort(descending=True).values
    return int((counts.cumsum(0) < 0.9 * counts.sum()).sum()) + 1


def test_every_example_goes_to_exactly_one_client():
    data = balanced()

    dataset = dirichlet_partition(data, 10, alpha=0.5)

    rows = torch.cat([torch.cat([c.train.x, c.test.x]) for c in dataset.clients.values()])
    assert len(rows) == 1000
    assert len(torch.unique(rows, dim=0)) == 1000


def test_small_alpha_concentrates_clients_on_few_classes_and_large_alpha_spreads_them():
    skewed = dirichlet_partition(balanced(), 10, alpha=0.05)
    spread = dirichlet_partition(balanced(), 10, alpha=100.0)

    skewed_classes = sum(classes_holding_90_percent(c) for c in skewed.clients.values()) / 10
    spread_classes = sum(classes_holding_90_percent(c) for c in spread.clients.values()) / 10
    assert skewed_classes < 3
    assert spread_classes >= 8


def test_a_torch_dataset_partitions_like_the_same_tensors():
    data = balanced()

    from_tensors = dirichlet_partition(data, 5, alpha=0.5, seed=1)
    from_dataset = dirichlet_partition(TensorDataset(data.x, data.y), 5, alpha=0.5, seed=1)

    for cid, client in from_tensors.clients.items():
        assert torch.equal(client.train.x, from_dataset.clients[cid].train.x)


def test_every_client_gets_at_least_min_examples_with_a_test_split():
    dataset = dirichlet_partition(balanced(), 20, alpha=0.1, min_examples=10)

    assert all(c.num_train + len(c.test) >= 10 and len(c.test) >= 1 for c in dataset.clients.values())


@pytest.mark.parametrize("kwargs, message", [
    ({"alpha": 0.0}, "alpha must be > 0, got 0.0"),
    ({"num_clients": 1}, "num_clients must be >= 2, got 1"),
    ({"num_clients": 600}, "1000 examples cannot give 600 clients 2 examples each"),
    ({"test_fraction": 0.0}, r"test_fraction must be in \(0, 1\)"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dirichlet_partition(balanced(), **{"num_clients": 10, "alpha": 0.5, **kwargs})
