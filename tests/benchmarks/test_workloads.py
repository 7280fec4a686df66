"""The benchmark's systems do the same work: same cohorts, same batches, all of it."""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.common import WORKLOADS, client_batches, cohorts, sweep_workload
from benchmarks.systems.reference import split_evenly
from fedmeta.algorithms.client_update import local_sgd
from fedmeta.data.federated import ClientData, Examples
from fedmeta.params import client_seed, get_weights


class RecordingModel(nn.Module):
    """Remembers which examples each forward pass saw (inputs hold their own index)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(1, 2)
        self.seen: list[list[int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append([int(v) for v in x[:, 0]])
        return self.linear(x)


def indexed_client(n: int) -> ClientData:
    x = torch.arange(n, dtype=torch.float32)[:, None]
    return ClientData("writer-7", Examples(x, torch.zeros(n, dtype=torch.long)),
                      Examples(x[:2], torch.zeros(2, dtype=torch.long)))


def test_client_batches_are_the_batches_fedmetas_client_update_trains_on():
    workload = WORKLOADS["W2"]  # 10 epochs of batch 20
    client = indexed_client(47)
    model = RecordingModel()
    update = local_sgd(workload.client_lr, workload.batch_size, epochs=workload.epochs)

    update(model, get_weights(model), client.train, client_seed(0, 3, client.client_id))

    assert model.seen == [b.tolist() for b in client_batches(workload, client, seed=0, round_idx=3)]
    assert sum(len(b) for b in model.seen) == 10 * 47


def test_cohorts_are_seeded_distinct_and_of_the_workload_size():
    ids = [f"c{i}" for i in range(50)]
    rounds = cohorts(WORKLOADS["W1"], ids, seed=0)

    assert len(rounds) == WORKLOADS["W1"].warmup_rounds + WORKLOADS["W1"].rounds
    assert all(len(set(r)) == 10 and set(r) <= set(ids) for r in rounds)
    assert rounds == cohorts(WORKLOADS["W1"], list(reversed(ids)), seed=0)
    assert rounds != cohorts(WORKLOADS["W1"], ids, seed=1)
    assert [len(r) for r in cohorts(WORKLOADS["W3"], [f"c{i}" for i in range(300)])] == [100]
    assert sweep_workload(400).num_clients == 400


def test_the_reference_splits_all_the_work_evenly_and_in_order():
    clients = {"a": indexed_client(40), "b": indexed_client(40)}
    jobs = [("a", torch.arange(20))] * 7 + [("b", torch.arange(5))] * 4

    shares = split_evenly(jobs, clients, 2)

    assert [j for share in shares for j in share] == jobs
    work = [sum(len(b) for _, b in share) for share in shares]
    assert abs(work[0] - work[1]) <= 20
