"""Clients, a model and a training loop shared by the engine tests.

Small enough to run in milliseconds; a convolution (so the memory layout matters),
dropout (so the seed matters) and clients of uneven size (so scheduling matters).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from fedmeta.algorithms.algorithm import TrainingWork, init_state, run_round
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


def broken_image_client(client_id: str, shape: tuple[int, ...], fill: float | None = None) -> ClientData:
    """Five examples of ``shape`` (a wrong one makes the model raise), filled with ``fill`` if given."""
    x = torch.rand(5, *shape) if fill is None else torch.full((5, *shape), fill)
    return ClientData(client_id, Examples(x, torch.zeros(5, dtype=torch.long)), Examples(x[:2], torch.zeros(2)))


def no_train(test: Examples) -> ClientData:
    """A client without training examples: its training work raises."""
    return ClientData("no-train", Examples(torch.zeros(0, 1, 6, 6), torch.zeros(0, dtype=torch.long)), test)


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


def assert_same_bits(a: Params, b: Params) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def started_at(model, weights, client, seed):
    """Client work that says when it started."""
    return client.client_id, time.monotonic_ns()


def exit_on_client03(model, weights, client, seed):
    """Client work that ends its worker's process whenever it runs ``client03``."""
    if client.client_id == "client03":
        os._exit(7)
    return client.client_id


@dataclass(frozen=True)
class KillsItsWorkerOnce:
    """Client work that kills its own worker process (SIGKILL) the first time it runs ``client_id``."""

    work: TrainingWork
    client_id: str
    marker: str

    def __call__(self, model, weights, client, seed):
        if client.client_id == self.client_id and not os.path.exists(self.marker):
            Path(self.marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return self.work(model, weights, client, seed)


@contextlib.contextmanager
def running_ray(cpus: int, *by_value: str) -> Iterator[None]:
    """A new local Ray instance with ``cpus`` logical CPUs, whatever the cores and other Ray instances.

    The modules named in ``by_value`` (and this one) travel to the actors by value, so
    test functions defined there run on them.
    """
    import ray

    modules = [sys.modules[name] for name in (__name__, *by_value)]
    for module in modules:
        ray.cloudpickle.register_pickle_by_value(module)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()
        for module in modules:
            ray.cloudpickle.unregister_pickle_by_value(module)


def device_probe(model, weights, client, seed):
    """Where client work finds its inputs: (model's device, weights' devices, data's device, data's id, pid)."""
    return (str(next(model.parameters()).device), sorted({str(w.device) for w in weights.values()}),
            str(client.train.x.device), id(client.train.x), os.getpid())
