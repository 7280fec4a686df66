"""Clients, a model and a training loop shared by the engine tests.

Small enough to run in milliseconds; a convolution (so the memory layout matters),
dropout (so the seed matters) and clients of uneven size (so scheduling matters).
"""

from __future__ import annotations

import torch
from torch import nn

from fedmeta.algorithms.algorithm import init_state, run_round
from fedmeta.algorithms.faults import Faults
from fedmeta.algorithms.presets import fedavg
from fedmeta.algorithms.server_optimizers import server_sgd
from fedmeta.data.federated import ClientData, Examples
from fedmeta.params import Params, get_weights

IMAGE_CLIENT_SIZES = (7, 30, 3, 12, 25, 9, 16, 5)


class TinyCNN(nn.Module):
    """A convolution (so the memory layout matters) and dropout (so the seed matters)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.3), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x))


def image_client(index: int, num_train: int) -> ClientData:
    generator = torch.Generator().manual_seed(index)

    def split(n: int) -> Examples:
        return Examples(torch.rand(n, 1, 6, 6, generator=generator), torch.randint(0, 3, (n,), generator=generator))

    return ClientData(f"client{index:02d}", split(num_train), split(4))


def image_clients_by_id() -> dict[str, ClientData]:
    return {c.client_id: c for c in (image_client(i, n) for i, n in enumerate(IMAGE_CLIENT_SIZES))}


def new_model() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN()


def train_rounds(engine, clients: dict[str, ClientData], rounds: int = 3, faults: Faults | None = None):
    """FedAvg rounds over sliding cohorts of 5; returns the weights and the metrics without ``time/``."""
    schedule = fedavg(2, client_lr=0.1, client_batch_size=4, server_optimizer=server_sgd(1.0, momentum=0.9))
    state = init_state(schedule, get_weights(new_model()))
    ids = sorted(clients)
    history = []
    for round_idx in range(rounds):
        cohort = [clients[c] for c in ids[round_idx: round_idx + 5]]
        state, metrics = run_round(schedule, state, cohort, engine=engine, seed=7, round_idx=round_idx,
                                   faults=faults)
        history.append({k: v for k, v in metrics.items() if not k.startswith("time/")})
    return state.weights, history


def single_threaded(function, *args, **kwargs):
    """Runs in this process on one thread, as a worker does: kernels may reduce differently on more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return function(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


def assert_same_bits(a: Params, b: Params) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
