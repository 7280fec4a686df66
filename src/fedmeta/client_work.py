"""The contract between algorithms and engines: a client's work, its update, its failure.

An algorithm hands an engine a pure function of (model, weights, client, seed); the
engine maps it over clients and returns each result, or a ``ClientFailure`` in its
place. Both sides import this module and neither imports the other, so the layers
point one way: algorithms and evaluation above, engines below.

A method whose clients keep state between rounds (Ditto's personal model, FedRep's
head) hands over ``StatefulWork``: a pure function of (model, weights, client, client
state, seed) returning (result, new client state), and ``init_client_state`` for a client
never seen. The state is data (``dict[str, Tensor]``, checkpointed like weights); the
engine keeps it (``map_stateful``), so the algorithm never owns storage.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Protocol, Sequence, TypeVar

import torch
from torch import nn

from fedmeta.data.federated import ClientData
from fedmeta.params import Params

Result = TypeVar("Result")
ClientWork = Callable[[nn.Module, Params, ClientData, int], Result]
"""Client work: loads ``weights`` into the (reused) model, works on the client, returns a result."""

ClientState = dict[str, torch.Tensor]
"""What a client keeps between rounds; empty for a client that keeps nothing."""
ON_ERROR = ("raise", "collect")


class StatefulWork(Protocol):
    """Client work with state: the engine passes the client's state in and keeps the one returned."""

    def init_client_state(self, weights: Params) -> ClientState:
        """The state of a client never seen before, given the weights of the round it is first in."""

    def __call__(self, model: nn.Module, weights: Params, client: ClientData, state: ClientState,
                 seed: int) -> tuple[Result, ClientState]:
        """Works on the client from ``state``; returns (result, new state), leaving ``state`` unchanged."""


class CohortWork(Protocol):
    """Client work that can also run a whole cohort as one batched computation (``map_cohort``)."""

    def map_cohort(self, model: nn.Module, weights: Params, clients: Sequence[ClientData],
                   seeds: Sequence[int]) -> list | None:
        """One result per client, in order, or None where this cohort cannot be batched."""


def run_stateful(work: StatefulWork, model: nn.Module, weights: Params, client: ClientData,
                 state: ClientState | None, seed: int) -> tuple[Result, ClientState]:
    """Runs ``work`` on the client from its state; ``None`` is a client never seen (its state is made here)."""
    return work(model, weights, client, work.init_client_state(weights) if state is None else state, seed)


class ClientUpdate(NamedTuple):
    """What a client sends back: its delta (client minus server weights) and metrics.

    Engines move ``delta`` through shared memory or object stores rather than pipes, so
    they know this one result type.
    """

    delta: Params
    num_examples: int
    metrics: dict[str, float]


class ClientFailure(NamedTuple):
    """Stands at a client's position in ``map(..., on_error="collect")`` when its work raised.

    ``traceback`` is where it raised (in the worker, for a worker process).
    """

    client_id: str
    error: Exception
    traceback: str


def check_on_error(on_error: str) -> None:
    """Refuses an ``on_error`` other than ``"raise"`` or ``"collect"``."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
