import multiprocessing

import pytest
import torch

from fedmeta.data.federated import ClientData, Examples, FederatedDataset, pack, shared_block, split_clients


def numbered_clients(count, *, empty_train=(), empty_test=()):
    def part(n):
        return Examples(torch.arange(n, dtype=torch.float32)[:, None], torch.zeros(n, dtype=torch.int64))

    return {f"c{i:02d}": ClientData(f"c{i:02d}", part(0 if i in empty_train else 3), part(0 if i in empty_test else 1))
            for i in range(count)}


def test_split_is_seeded_disjoint_and_covers_every_client():
    first = split_clients(numbered_clients(40), num_classes=2, held_out_fraction=0.25, seed=7)
    again = split_clients(numbered_clients(40), num_classes=2, held_out_fraction=0.25, seed=7)
    other = split_clients(numbered_clients(40), num_classes=2, held_out_fraction=0.25, seed=8)

    assert len(first.held_out_ids) == 10 and len(first.train_ids) == 30
    assert set(first.held_out_ids).isdisjoint(first.train_ids)
    assert set(first.held_out_ids) | set(first.train_ids) == set(first.clients)
    assert first.held_out_ids == again.held_out_ids
    assert first.held_out_ids != other.held_out_ids


def test_split_does_not_depend_on_the_order_clients_arrive_in():
    clients = numbered_clients(20)
    reversed_clients = dict(reversed(list(clients.items())))

    assert (split_clients(clients, num_classes=2, seed=1).held_out_ids
            == split_clients(reversed_clients, num_classes=2, seed=1).held_out_ids)


def test_clients_without_train_or_test_examples_are_dropped_and_counted():
    dataset = split_clients(numbered_clients(10, empty_train=[1], empty_test=[2, 3]), num_classes=2)

    assert sorted(dataset.clients) == ["c00", "c04", "c05", "c06", "c07", "c08", "c09"]
    assert dataset.info["dropped_clients"] == 3


def test_cohort_depends_on_seed_and_round_only():
    dataset = split_clients(numbered_clients(50), num_classes=2, seed=0)

    cohort = [c.client_id for c in dataset.sample_cohort(5, seed=3, round_idx=4)]
    again = [c.client_id for c in dataset.sample_cohort(5, seed=3, round_idx=4)]
    next_round = [c.client_id for c in dataset.sample_cohort(5, seed=3, round_idx=5)]

    assert cohort == again
    assert cohort != next_round
    assert len(set(cohort)) == 5 and set(cohort) <= set(dataset.train_ids)


def test_cohort_larger_than_the_training_clients_is_refused():
    dataset = split_clients(numbered_clients(8), num_classes=2, held_out_fraction=0.25, seed=0)

    with pytest.raises(ValueError, match=r"cohort size 7 must be in 1..6 \(the number of training clients\)"):
        dataset.sample_cohort(7, seed=0, round_idx=0)


def test_fewer_training_clients_keep_the_held_out_ones_and_a_seeded_subset_of_a_larger_counts():
    full = split_clients(numbered_clients(40), num_classes=2, held_out_fraction=0.25, seed=7)
    five, twelve = full.with_training_clients(5, seed=7), full.with_training_clients(12, seed=7)

    assert five.held_out_ids == twelve.held_out_ids == full.held_out_ids
    assert (len(five.train_ids), len(twelve.train_ids)) == (5, 12)
    assert set(five.train_ids) < set(twelve.train_ids) < set(full.train_ids)
    assert set(five.clients) == set(five.train_ids) | set(five.held_out_ids)
    assert five.train_ids == full.with_training_clients(5, seed=7).train_ids
    assert five.train_ids != full.with_training_clients(5, seed=8).train_ids
    assert full.with_training_clients(30, seed=7).train_ids == full.train_ids


@pytest.mark.parametrize("count", [0, 31])
def test_more_training_clients_than_there_are_or_none_are_refused(count):
    full = split_clients(numbered_clients(40), num_classes=2, held_out_fraction=0.25, seed=7)
    with pytest.raises(ValueError, match=rf"{count} training clients asked for: federated has 30 \(and 10 held-out"):
        full.with_training_clients(count, seed=7)


def test_pooled_train_concatenates_the_training_clients_only():
    dataset = split_clients(numbered_clients(8), num_classes=2, held_out_fraction=0.25, seed=0)

    pooled = dataset.pooled_train()

    assert pooled.client_id == "pooled"
    assert len(pooled.train) == 3 * len(dataset.train_ids)
    assert len(pooled.test) == 0


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_held_out_fraction_outside_the_open_unit_interval_is_refused(fraction):
    with pytest.raises(ValueError, match=rf"held_out_fraction must be in \(0, 1\), got {fraction}"):
        split_clients(numbered_clients(4), num_classes=2, held_out_fraction=fraction)


def test_a_client_both_training_and_held_out_is_refused():
    clients = numbered_clients(2)

    with pytest.raises(ValueError, match="a client is both training and held-out"):
        FederatedDataset(clients, ("c00", "c01"), ("c01",), num_classes=2)


@pytest.mark.parametrize("fraction", [0.01, 0.99])
def test_extreme_held_out_fractions_still_leave_one_client_on_each_side(fraction):
    dataset = split_clients(numbered_clients(3), num_classes=2, held_out_fraction=fraction)

    assert 1 <= len(dataset.held_out_ids) <= 2
    assert len(dataset.held_out_ids) + len(dataset.train_ids) == 3


def test_fewer_than_two_usable_clients_are_refused():
    with pytest.raises(ValueError, match="need at least 2 clients with train and test data, got 1"):
        split_clients(numbered_clients(2, empty_test=[1]), num_classes=2, name="tiny")


def test_ids_not_in_the_dataset_are_refused_by_name():
    with pytest.raises(ValueError, match=r"tiny: client ids not in the dataset: \['c09'\]"):
        FederatedDataset(numbered_clients(2), ("c00",), ("c09",), num_classes=2, name="tiny")


def test_shared_block_holds_the_concatenation_even_after_its_parts_are_gone():
    parts = [torch.arange(6.0).view(3, 2), torch.full((1, 2), 7.0)]
    expected = torch.cat(parts)

    block = shared_block(parts)
    del parts

    torch.testing.assert_close(block, expected, rtol=0, atol=0)
    assert shared_block([torch.zeros(0, 3)]).shape == (0, 3)


def _write_into(block: torch.Tensor) -> None:
    block[0] = 42


def test_a_shared_block_is_one_memory_for_a_forked_process_and_its_parent():
    block = shared_block([torch.zeros(4, dtype=torch.int64)])

    child = multiprocessing.get_context("fork").Process(target=_write_into, args=(block,))
    child.start()
    child.join()

    assert block.tolist() == [42, 0, 0, 0]  # private memory would have kept the parent's zeros


def test_packed_clients_keep_their_examples_and_split_sizes():
    clients = numbered_clients(3)
    clients["c01"] = ClientData("c01", Examples(torch.randn(5, 1), torch.arange(5)),
                                Examples(torch.randn(2, 1), torch.arange(2)))

    packed = pack(clients)

    for cid, original in clients.items():
        for split in ("train", "test"):
            for field in ("x", "y"):
                torch.testing.assert_close(getattr(getattr(packed[cid], split), field),
                                           getattr(getattr(original, split), field), rtol=0, atol=0)
