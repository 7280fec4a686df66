"""The benchmark's systems do the same work: same cohorts, same batches, all of it, counted as trained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks.client_state import measure
from benchmarks.common import WORKLOADS, client_batches, cohorts, samples_of, sweep_workload
from benchmarks.meta_cost import updates
from benchmarks.round_tail import round_parts
from benchmarks.run import Unavailable, command
from benchmarks.stateful import Unchanged
from benchmarks.systems.fedmeta_system import algorithm
from benchmarks.systems.reference import split_evenly
from fedmeta.algorithms.client_update import ClientUpdate, local_sgd
from fedmeta.data.federated import ClientData, Examples
from fedmeta.engine import ProcessEngine
from fedmeta.models.cnn import FedAvgCNN
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


class RecordingCNN(FedAvgCNN):
    """FEMNIST's CNN that remembers which images each forward pass saw (pixel (0, 0) holds the index)."""

    def __init__(self) -> None:
        super().__init__(num_classes=62)
        self.seen: list[list[int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append([int(v) for v in x[:, 0, 0, 0]])
        return super().forward(x)


def indexed_client(n: int) -> ClientData:
    x = torch.arange(n, dtype=torch.float32)[:, None]
    return ClientData("writer-7", Examples(x, torch.zeros(n, dtype=torch.long)),
                      Examples(x[:2], torch.zeros(2, dtype=torch.long)))


def indexed_images(n: int, client_id: str = "writer-7") -> ClientData:
    x = torch.zeros(n, 1, 28, 28)
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.float32)
    y = torch.arange(n) % 62
    return ClientData(client_id, Examples(x, y), Examples(x[:2], y[:2]))


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


@pytest.mark.parametrize("name", ["W5", "W6"])
def test_stateful_workloads_train_w1s_data_model_and_cohorts(name):
    ids = [f"c{i}" for i in range(50)]
    w1, workload = WORKLOADS["W1"], WORKLOADS[name]

    same = [getattr(workload, key) == getattr(w1, key) for key in
            ("dataset", "model", "cohort_size", "epochs", "rounds", "warmup_rounds", "batch_size", "client_lr")]

    assert all(same)
    assert cohorts(workload, ids, seed=0) == cohorts(w1, ids, seed=0)
    assert workload.method != "fedavg"


def one_stateful_update(workload):
    """A 47-example client's round-3 update of the workload's method on a recording CNN, from a fresh state.

    Returns the model (which batches it saw), W1's batches of that client and round, the update and the new state.
    """
    client = indexed_images(47)
    model = RecordingCNN()
    weights = get_weights(model)
    update = algorithm(workload).client_update
    batches = [b.tolist() for b in client_batches(workload, client, seed=0, round_idx=3)]

    result, state = update(model, weights, client.train, update.init_client_state(weights),
                           client_seed(0, 3, client.client_id))
    return model, batches, result, state


def test_ditto_trains_w1s_batches_then_its_personal_model_and_both_count_as_trained():
    workload = WORKLOADS["W5"]
    model, batches, result, state = one_stateful_update(workload)
    client = indexed_images(47)

    assert model.seen[:len(batches)] == batches  # the global model: FedAvg's batches of W1
    assert sorted(i for b in model.seen[len(batches):] for i in b) == list(range(47))  # the personal model: 1 epoch
    assert sum(len(b) for b in model.seen) == samples_of(workload, [client])
    assert samples_of(workload, [client]) == 2 * samples_of(WORKLOADS["W1"], [client]) == 2 * 47
    assert result.metrics["num_samples"] == samples_of(workload, [client])


def test_fedrep_trains_its_head_then_the_body_on_w1s_batches_and_both_count_as_trained():
    workload = WORKLOADS["W6"]
    model, batches, result, state = one_stateful_update(workload)
    client = indexed_images(47)

    assert model.seen[-len(batches):] == batches  # the body, after the head's epoch
    assert sum(len(b) for b in model.seen) == samples_of(workload, [client]) == 2 * 47
    assert result.metrics["num_samples"] == samples_of(workload, [client])
    assert set(state) == {"classifier.3.weight", "classifier.3.bias"}


def test_stateful_workloads_run_on_fedmeta_alone():
    with pytest.raises(Unavailable, match="ditto is fedmeta's alone"):
        command("reference", WORKLOADS["W5"], 2, Path("data"))

    argv = command("fedmeta", WORKLOADS["W6"], 2, Path("data"))

    assert argv[argv.index("--workload") + 1] == "W6"


def test_maml_and_fomaml_are_timed_on_the_same_batches():
    client = indexed_client(47)
    seen = {}

    for name, update in updates(inner_steps=5, batch_size=20).items():
        model = RecordingModel()
        result = update(model, get_weights(model), client.train, seed=11)
        seen[name] = (model.seen, result.metrics["num_samples"])

    assert seen["maml"] == seen["fomaml"]
    assert [len(b) for b in seen["maml"][0]] == [20, 20, 7, 20, 20, 7]  # 5 support batches, then the query
    assert seen["maml"][1] == 94


def test_client_state_bytes_are_those_of_the_tensors_each_method_keeps():
    clients = {c.client_id: c for c in (indexed_images(3, "a"), indexed_images(5, "b"))}
    cnn_weights = 1 * 32 * 25 + 32 + 32 * 64 * 25 + 64 + 64 * 7 * 7 * 512 + 512 + 512 * 62 + 62  # 1,690,046
    head = 512 * 62 + 62

    sizes = {name: measure(name, WORKLOADS["W1"], clients, num_classes=62)["bytes_per_client"]
             for name in ("ditto", "fedrep", "fedper", "pfedme", "scaffold")}

    assert sizes == {"ditto": 4 * cnn_weights, "fedrep": 4 * head, "fedper": 4 * head, "pfedme": 0,
                     "scaffold": 4 * cnn_weights}
    assert sizes["ditto"] == 6_760_184


def test_the_state_benchmark_moves_states_through_a_worker_and_back_unchanged():
    """Entries shaped as a weight cross in shared memory, others in the pipe; neither may change a bit."""
    model = nn.Linear(3, 2)
    weights = get_weights(model)
    client = indexed_client(4)
    update = algorithm(WORKLOADS["W5"]).client_update
    # a weight's name and shape; its name in float64; its name, another shape; no weight's name
    state = {"weight": torch.randn(2, 3), "bias": torch.randn(2, dtype=torch.float64),
             "count": torch.tensor([7]), "weight.other": torch.randn(3, 2)}

    with ProcessEngine(model, {client.client_id: client}, workers=1) as engine:
        engine.restore_client_states({client.client_id: state})
        for _ in range(3):  # both of the worker's slots, and one again
            engine.map_stateful(Unchanged(update), weights, [client], [0])
        held = engine.client_states()[client.client_id]

    assert held.keys() == state.keys()
    assert all(torch.equal(held[k], state[k]) and held[k].dtype == state[k].dtype for k in state)


def test_a_rounds_tail_is_from_the_first_worker_out_of_clients_to_the_last_finishing():
    def ran(pid, started, finished):
        return ClientUpdate({}, 1, {"pid": pid, "started": started, "finished": finished})

    # worker 1 busy 0.1-0.5 and 0.5-0.8 (0.7 s), worker 2 busy 0.1-0.9 (0.8 s); the map took 0.0-1.0
    parts = round_parts([ran(1, 0.1, 0.5), ran(2, 0.1, 0.9), ran(1, 0.5, 0.8)], 0.0, 1.0, workers=2)

    assert parts == pytest.approx({"wall_s": 1.0, "work_s": 0.75, "tail_s": 0.1, "idle_share": 0.25})
