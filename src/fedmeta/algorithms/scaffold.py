"""SCAFFOLD: local steps corrected by control variates, which the server and each client keep.

Karimireddy, Kale, Mohri, Reddi, Stich, Suresh. *SCAFFOLD: Stochastic Controlled
Averaging for Federated Learning*. ICML 2020, Algorithm 1 with option II. The server
keeps x and its control variate c; client i keeps its own c_i. In a round, each sampled
client, from y = x:

    K_i local steps      y ← y − η_l (g_i(y) + c − c_i)
    option II            c_i⁺ = c_i − c + (x − y) / (K_i η_l)
    it sends             Δy_i = y − x  and  Δc_i = c_i⁺ − c_i

and the server takes  x ← x + η_g · mean_S Δy_i  and  c ← c + (|S|/N) · mean_S Δc_i,
N the number of training clients, so that c stays the mean of every client's c_i. With
c = c_i = 0 (the first round) a client's update is FedAvg's, bit for bit.

Here c is the server optimizer's state (``with_control_variates``), checkpointed with
the rest of it; the round hands it to the clients in their work (``for_round``). A client
sends Δc_i in its delta under ``CONTROL`` + the weight's name, beside Δy_i; the aggregator
(``scaffold_mean``) averages both and scales the control part by |S|/N, so the round's
``server/delta_norm`` measures (Δx, Δc) together. c_i is the client's state: 4 bytes per
float32 weight, as Ditto's personal model (2,440 B for Synthetic's logistic regression,
6,760,184 B for FEMNIST's CNN), held by the engine (``fedmeta.engine.states``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from fedmeta.algorithms.aggregators import Aggregator, weighted_mean
from fedmeta.algorithms.client_update import ClientUpdate, LocalTraining
from fedmeta.algorithms.server_optimizers import ServerOptimizer, State
from fedmeta.client_work import ClientState
from fedmeta.data.federated import Examples
from fedmeta.params import Params

CONTROL = "control/"
"""Prefix of a client's Δc_i in its delta (``control/fc.weight``): weight names never hold a slash."""


def control_zeros(weights: Params) -> Params:
    """c = 0 or c_i = 0 for every float weight (parameters and float buffers; a buffer never has a gradient)."""
    return {k: torch.zeros_like(w) for k, w in weights.items() if w.is_floating_point()}


class _CorrectedStep:
    """The client optimizer, stepping on ∇F + (c − c_i) instead of ∇F."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
                 correction: Sequence[torch.Tensor]) -> None:
        self.optimizer, self.params, self.correction = optimizer, params, correction

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        with torch.no_grad():
            for param, correction in zip(self.params, self.correction):
                if param.grad is not None:
                    param.grad.add_(correction)
        self.optimizer.step()


@dataclass(frozen=True)
class _Corrected(LocalTraining):
    """``LocalTraining`` whose every gradient gets ``correction`` (c − c_i, in ``model.parameters()`` order)."""

    correction: tuple[torch.Tensor, ...] = field(default=(), compare=False, repr=False)

    def make_optimizer(self, model: nn.Module) -> _CorrectedStep:  # type: ignore[override]
        return _CorrectedStep(super().make_optimizer(model), list(model.parameters()), self.correction)


@dataclass(frozen=True)
class ScaffoldTraining:
    """SCAFFOLD's client: ``training`` (plain SGD) corrected by c − c_i; c_i updated by option II.

    ``control`` is the server's c for the round (``for_round``, from ``round_input``); K_i is the number of
    steps the client took, so clients of any size take their own.
    """

    training: LocalTraining
    control: Params = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.training.optimizer != "sgd":
            raise ValueError(f"SCAFFOLD's control variates assume SGD client steps, got client optimizer "
                             f"{self.training.optimizer!r}")

    @staticmethod
    def round_input(server_state: Any) -> Params:
        """What a client needs of the server's state in a round: the server's control variate c."""
        return server_state["control"]

    def for_round(self, control: Params) -> ScaffoldTraining:
        """This client update with the round's server control variate (``round_input``)."""
        return dataclasses.replace(self, control=control)

    def init_client_state(self, weights: Params) -> ClientState:
        return control_zeros(weights)

    def __call__(self, model: nn.Module, weights: Params, data: Examples, state: ClientState,
                 seed: int) -> tuple[ClientUpdate, ClientState]:
        c = self.control
        t = self.training
        corrected = _Corrected(lr=t.lr, batch_size=t.batch_size, epochs=t.epochs, steps=t.steps, loss=t.loss,
                               correction=tuple(c[name] - state[name] for name, _ in model.named_parameters()))
        update = corrected(model, weights, data, seed)
        scale = update.metrics["num_steps"] * t.lr
        # Δc_i = c_i⁺ − c_i = −c + (x − y)/(K_i η_l), with x − y = −Δy_i
        control_delta = {k: -c[k] - update.delta[k] / scale for k in state}
        delta = {**update.delta, **{CONTROL + k: d for k, d in control_delta.items()}}
        return update._replace(delta=delta), {k: state[k] + control_delta[k] for k in state}


def scaffold_mean(num_clients: int | None) -> Aggregator:
    """The uniform mean of the clients' (Δy_i, Δc_i); the control part scaled by |S|/N (N = ``num_clients``).

    ``num_clients`` is None where only the algorithm's shape is needed (checking a
    checkpoint, refusing a deployment); aggregating then raises.
    """
    if num_clients is not None and num_clients < 1:
        raise ValueError(f"SCAFFOLD needs the number of training clients N >= 1, got {num_clients}")
    mean = weighted_mean("uniform")

    def apply(updates: Sequence[ClientUpdate], state: tuple) -> tuple[Params, tuple]:
        if num_clients is None:
            raise ValueError("SCAFFOLD's server needs the number of training clients N (build_schedule's num_clients)")
        delta, state = mean.apply(updates, state)
        share = len(updates) / num_clients
        return {k: d * share if k.startswith(CONTROL) else d for k, d in delta.items()}, state

    return Aggregator(mean.init, apply)


def with_control_variates(server: ServerOptimizer) -> ServerOptimizer:
    """``server`` stepping x with Δx, and c ← c + the aggregated control delta; its state holds c and ``server``'s."""

    def init(weights: Params) -> State:
        return {"control": control_zeros(weights), "server": server.init(weights)}

    def apply(weights: Params, delta: Params, state: State) -> tuple[Params, State]:
        new_weights, server_state = server.apply(weights, {k: delta[k] for k in weights}, state["server"])
        control = {k: c + delta[CONTROL + k] for k, c in state["control"].items()}
        return new_weights, {"control": control, "server": server_state}

    return ServerOptimizer(init, apply)
