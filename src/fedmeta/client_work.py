"""The contract between algorithms and engines: a client's work, its update, its failure.

An algorithm hands an engine a pure function of (model, weights, client, seed); the
engine maps it over clients and returns each result, or a ``ClientFailure`` in its
place. Both sides import this module and neither imports the other, so the layers
point one way: algorithms and evaluation above, engines below.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, TypeVar

from torch import nn

from fedmeta.data.federated import ClientData
from fedmeta.params import Params

Result = TypeVar("Result")
ClientWork = Callable[[nn.Module, Params, ClientData, int], Result]
"""Client work: loads ``weights`` into the (reused) model, works on the client, returns a result."""

ON_ERROR = ("raise", "collect")


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
