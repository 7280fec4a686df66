"""Aggregation of client deltas into one pseudo-gradient for the server optimizer."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

from fedmeta.client_work import ClientUpdate
from fedmeta.params import Params


class Aggregator(NamedTuple):
    """How the clients' updates become one delta for the server optimizer.

    ``init()`` gives the starting state; ``apply(updates, state)`` returns the delta and
    the next state. Updates arrive in cohort order, whatever engine ran them, so a sum
    taken in that order has the same bits on every engine.
    """

    init: Callable[[], Any]
    apply: Callable[[Sequence[ClientUpdate], Any], tuple[Params, Any]]


def weighted_mean(by: str = "examples") -> Aggregator:
    """Mean of client deltas, weighted by train examples (FedAvg) or uniformly (Reptile).

    The result is Σ_i w_i Δ_i with Σ_i w_i = 1, so a server step of lr 1 lands on the
    weighted mean of the client models.
    """
    if by not in ("examples", "uniform"):
        raise ValueError(f"aggregation must be 'examples' or 'uniform', got {by!r}")

    def init() -> tuple:
        return ()

    def apply(updates: Sequence[ClientUpdate], state: tuple) -> tuple[Params, tuple]:
        if not updates:
            raise ValueError("cannot aggregate an empty list of client updates")
        raw = [float(u.num_examples) if by == "examples" else 1.0 for u in updates]
        total = sum(raw)
        weights = [w / total for w in raw]
        delta = {}
        for key, first in updates[0].delta.items():
            total_k = first * weights[0]  # accumulated in place, in client order: one pass per client
            for w, u in zip(weights[1:], updates[1:]):
                total_k.add_(u.delta[key], alpha=w)
            delta[key] = total_k
        return delta, state

    return Aggregator(init, apply)
