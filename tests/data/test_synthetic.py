import numpy as np
import pytest
import torch

from fedmeta.data.synthetic import synthetic


def label_histograms(dataset):
    return np.stack([np.bincount(torch.cat([c.train.y, c.test.y]).numpy(), minlength=dataset.num_classes)
                     for c in dataset.clients.values()])


def mean_distance_from_pooled_labels(dataset):
    """Average total-variation distance between a client's label mix and the pooled mix."""
    counts = label_histograms(dataset)
    shares = counts / counts.sum(1, keepdims=True)
    pooled = counts.sum(0) / counts.sum()
    return float(np.mean(0.5 * np.abs(shares - pooled).sum(1)))


def test_shapes_and_dtypes_follow_the_arguments():
    dataset = synthetic(20, input_dim=7, num_classes=4, held_out_fraction=0.25)

    client = dataset.train_clients()[0]
    assert len(dataset.clients) == 20 and len(dataset.held_out_ids) == 5
    assert client.train.x.shape[1] == 7 and client.train.x.dtype == torch.float32
    assert client.train.y.dtype == torch.int64 and int(client.train.y.max()) < 4
    assert all(c.num_train >= 1 and len(c.test) >= 1 for c in dataset.clients.values())


def test_every_client_has_at_least_50_examples_and_a_fifth_of_them_for_test():
    dataset = synthetic(30)

    sizes = np.array([len(c.train) + len(c.test) for c in dataset.clients.values()])
    assert sizes.min() >= 50
    for client in dataset.clients.values():
        assert len(client.test) == round(0.2 * (len(client.train) + len(client.test)))


def test_same_seed_gives_the_same_bits_and_another_seed_other_data():
    first, second, other = synthetic(10, seed=3), synthetic(10, seed=3), synthetic(10, seed=4)

    for cid in first.clients:
        assert torch.equal(first.clients[cid].train.x, second.clients[cid].train.x)
    assert not torch.equal(first.clients["synthetic_00000"].train.x, other.clients["synthetic_00000"].train.x)


def test_adding_clients_leaves_the_earlier_clients_unchanged():
    small, large = synthetic(5), synthetic(8)

    for cid in small.clients:
        assert torch.equal(small.clients[cid].train.x, large.clients[cid].train.x)
        assert torch.equal(small.clients[cid].test.y, large.clients[cid].test.y)


def test_non_iid_clients_have_label_mixes_far_from_the_pooled_one_and_iid_clients_do_not():
    heterogeneous = synthetic(40, alpha=1.0, beta=1.0)
    iid = synthetic(40, iid=True)

    assert mean_distance_from_pooled_labels(heterogeneous) > 0.5
    assert mean_distance_from_pooled_labels(iid) < 0.15


def test_max_examples_caps_the_power_law_tail():
    dataset = synthetic(50, max_examples=80)

    assert max(len(c.train) + len(c.test) for c in dataset.clients.values()) == 80


@pytest.mark.parametrize("kwargs, message", [
    ({"num_clients": 1}, "num_clients must be >= 2, got 1"),
    ({"alpha": -1.0}, "alpha and beta must be >= 0"),
    ({"test_fraction": 1.0}, r"test_fraction must be in \(0, 1\)"),
    ({"max_examples": 1}, "max_examples must be >= 2"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        synthetic(**{"num_clients": 5, **kwargs})
