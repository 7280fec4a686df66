"""Aggregation of client deltas into one pseudo-gradient for the server optimizer."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import torch

from fedmeta.algorithms.client_update import ClientUpdate
from fedmeta.params import Params


class Aggregator(NamedTuple):
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
        delta = {k: sum(w * u.delta[k] for w, u in zip(weights, updates)) for k in updates[0].delta}
        return {k: torch.as_tensor(v) for k, v in delta.items()}, state

    return Aggregator(init, apply)
