import numpy as np
import pytest
import torch

from fedmeta.data.synthetic import synthetic


def all_examples(client):
    return torch.cat([client.train.x, client.test.x]), torch.cat([client.train.y, client.test.y])


def mean_distance_from_pooled_labels(dataset):
    """Average total-variation distance between a client's label mix and the pooled mix."""
    counts = np.stack([np.bincount(all_examples(c)[1].numpy(), minlength=dataset.num_classes)
                       for c in dataset.clients.values()])
    shares = counts / counts.sum(1, keepdims=True)
    pooled = counts.sum(0) / counts.sum()
    return float(np.mean(0.5 * np.abs(shares - pooled).sum(1)))


def spread_of_client_input_means(dataset):
    """Standard deviation over clients of the mean of all a client's input values."""
    return float(np.std([float(all_examples(c)[0].mean()) for c in dataset.clients.values()]))


def test_shapes_and_dtypes_follow_the_arguments():
    dataset = synthetic(20, input_dim=7, num_classes=4, held_out_fraction=0.25)

    client = dataset.train_clients()[0]
    assert len(dataset.clients) == 20 and len(dataset.held_out_ids) == 5
    assert client.train.x.shape[1] == 7 and client.train.x.dtype == torch.float32
    assert client.train.y.dtype == torch.int64 and 0 <= int(client.train.y.min()) and int(client.train.y.max()) < 4
    assert dataset.num_classes == 4


def test_every_client_has_min_examples_and_a_rounded_test_fraction():
    dataset = synthetic(30, min_examples=50, test_fraction=0.2)

    sizes = {cid: len(c.train) + len(c.test) for cid, c in dataset.clients.items()}
    assert min(sizes.values()) >= 50
    assert all(len(c.test) == round(0.2 * sizes[cid]) for cid, c in dataset.clients.items())
    assert dataset.info["num_train_examples"] + dataset.info["num_test_examples"] == sum(sizes.values())


def test_tiny_clients_still_get_one_train_and_one_test_example():
    dataset = synthetic(10, min_examples=2, max_examples=2, test_fraction=0.9)

    assert all(len(c.train) == 1 and len(c.test) == 1 for c in dataset.clients.values())


def test_max_examples_caps_the_power_law_tail():
    dataset = synthetic(50, max_examples=80)

    assert max(len(c.train) + len(c.test) for c in dataset.clients.values()) == 80


@pytest.mark.bits
def test_same_seed_gives_the_same_bits_and_another_seed_other_data():
    first, second, other = synthetic(10, seed=3), synthetic(10, seed=3), synthetic(10, seed=4)

    assert all(torch.equal(first.clients[cid].train.x, second.clients[cid].train.x)
               and torch.equal(first.clients[cid].test.y, second.clients[cid].test.y) for cid in first.clients)
    assert not torch.equal(first.clients["synthetic_00000"].train.x[:5], other.clients["synthetic_00000"].train.x[:5])


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


def test_beta_spreads_the_client_input_means():
    # each client's mean input is about B_k ~ N(0, beta²) plus noise of std 1/sqrt(60)
    none, some, one = (spread_of_client_input_means(synthetic(40, alpha=0, beta=b)) for b in (0.0, 0.5, 1.0))

    assert none < 0.25
    assert 0.3 < some < 0.8
    assert one > 0.7 and one > 4 * none


def test_alpha_leaves_the_data_unchanged_as_in_the_reference_generator():
    # u_k adds the same amount to every class's logit, so the argmax ignores it
    low, high = synthetic(20, alpha=0.0, beta=0.5), synthetic(20, alpha=3.0, beta=0.5)

    for cid in low.clients:
        assert torch.equal(low.clients[cid].train.x, high.clients[cid].train.x)
        assert torch.equal(low.clients[cid].train.y, high.clients[cid].train.y)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_clients": 1}, "num_clients must be >= 2, got 1"),
    ({"alpha": -1.0}, "alpha and beta must be >= 0, got alpha=-1.0 beta=0.5"),
    ({"input_dim": 0}, "input_dim must be >= 1, got 0"),
    ({"num_classes": 1}, "num_classes must be >= 2, got 1"),
    ({"test_fraction": 1.0}, r"test_fraction must be in \(0, 1\), got 1.0"),
    ({"min_examples": 1}, r"min_examples must be >= 2 \(one train, one test\), got 1"),
    ({"max_examples": 10}, r"max_examples must be >= min_examples \(50\), got 10"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=f"synthetic: {message}"):
        synthetic(**{"num_clients": 5, **kwargs})
