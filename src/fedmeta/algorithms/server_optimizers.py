"""Server optimizers: the aggregated delta Δ is a pseudo-gradient g = −Δ (Reddi et al., 2020).

Each builder returns an ``init``/``apply`` pair; state goes in and comes out as a dict
of tensors, so it checkpoints with the weights. SGD, Adam and Adagrad follow
``torch.optim`` step for step (tests compare them); Yogi follows Zaheer et al. (2018).
With lr 1 and no momentum, server SGD sets θ ← θ + Δ: plain FedAvg.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from fedmeta.params import Params

State = dict


class ServerOptimizer(NamedTuple):
    """How the server moves its weights with the round's aggregated delta.

    ``init(weights)`` gives the starting state; ``apply(weights, delta, state)`` returns
    the new weights and state, and never changes its arguments. The state is plain data
    (numbers and tensors), so it goes into checkpoints as it is.
    """

    init: Callable[[Params], State]
    apply: Callable[[Params, Params, State], tuple[Params, State]]


def _zeros(weights: Params, fill: float = 0.0) -> Params:
    return {k: torch.full_like(w, fill) for k, w in weights.items()}


def _check_lr(lr: float) -> None:
    if not lr > 0:
        raise ValueError(f"server lr must be > 0, got {lr}")


def server_sgd(lr: float = 1.0, momentum: float = 0.0) -> ServerOptimizer:
    """θ ← θ + lr·v with v ← momentum·v + Δ (heavy-ball, as ``torch.optim.SGD``)."""
    _check_lr(lr)
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"server momentum must be in [0, 1), got {momentum}")

    def init(weights: Params) -> State:
        return {"velocity": _zeros(weights)} if momentum else {}

    def apply(weights: Params, delta: Params, state: State) -> tuple[Params, State]:
        if not momentum:
            return {k: weights[k] + lr * delta[k] for k in weights}, state
        velocity = {k: momentum * state["velocity"][k] + delta[k] for k in weights}
        return {k: weights[k] + lr * velocity[k] for k in weights}, {"velocity": velocity}

    return ServerOptimizer(init, apply)


def server_adam(lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> ServerOptimizer:
    """Adam on g = −Δ with bias correction, as ``torch.optim.Adam``."""
    _check_lr(lr)

    def init(weights: Params) -> State:
        return {"step": 0, "m": _zeros(weights), "v": _zeros(weights)}

    def apply(weights: Params, delta: Params, state: State) -> tuple[Params, State]:
        step = state["step"] + 1
        m = {k: beta1 * state["m"][k] + (1 - beta1) * -delta[k] for k in weights}
        v = {k: beta2 * state["v"][k] + (1 - beta2) * delta[k] * delta[k] for k in weights}
        step_size = lr / (1 - beta1**step)
        root_correction = math.sqrt(1 - beta2**step)
        new = {k: weights[k] - step_size * m[k] / (v[k].sqrt() / root_correction + eps) for k in weights}
        return new, {"step": step, "m": m, "v": v}

    return ServerOptimizer(init, apply)


def server_adagrad(lr: float = 0.1, eps: float = 1e-10, initial_accumulator: float = 0.0) -> ServerOptimizer:
    """Adagrad on g = −Δ, as ``torch.optim.Adagrad`` without lr decay."""
    _check_lr(lr)

    def init(weights: Params) -> State:
        return {"sum": _zeros(weights, initial_accumulator)}

    def apply(weights: Params, delta: Params, state: State) -> tuple[Params, State]:
        total = {k: state["sum"][k] + delta[k] * delta[k] for k in weights}
        new = {k: weights[k] + lr * delta[k] / (total[k].sqrt() + eps) for k in weights}
        return new, {"sum": total}

    return ServerOptimizer(init, apply)


def server_yogi(lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, eps: float = 1e-3) -> ServerOptimizer:
    """Yogi (FedYogi): v ← v − (1−β2)·Δ²·sign(v − Δ²), an additive, bounded Adam."""
    _check_lr(lr)

    def init(weights: Params) -> State:
        return {"m": _zeros(weights), "v": _zeros(weights, eps * eps)}

    def apply(weights: Params, delta: Params, state: State) -> tuple[Params, State]:
        m = {k: beta1 * state["m"][k] + (1 - beta1) * delta[k] for k in weights}
        squared = {k: delta[k] * delta[k] for k in weights}
        v = {k: state["v"][k] - (1 - beta2) * squared[k] * torch.sign(state["v"][k] - squared[k]) for k in weights}
        new = {k: weights[k] + lr * m[k] / (v[k].sqrt() + eps) for k in weights}
        return new, {"m": m, "v": v}

    return ServerOptimizer(init, apply)


SERVER_OPTIMIZERS: dict[str, Callable[..., ServerOptimizer]] = {
    "sgd": server_sgd, "adam": server_adam, "adagrad": server_adagrad, "yogi": server_yogi,
}


def build_server_optimizer(name: str, lr: float, momentum: float = 0.0, **kwargs: float) -> ServerOptimizer:
    """Builds a server optimizer by name; ``momentum`` applies to SGD only."""
    if name not in SERVER_OPTIMIZERS:
        raise ValueError(f"unknown server optimizer {name!r}; choose one of {sorted(SERVER_OPTIMIZERS)}")
    if name == "sgd":
        return server_sgd(lr, momentum)
    if momentum:
        raise ValueError(f"server momentum applies to 'sgd' only, not {name!r}")
    return SERVER_OPTIMIZERS[name](lr, **kwargs)
