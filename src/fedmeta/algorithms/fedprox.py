"""FedProx's client update: local training on the loss plus a proximal term.

Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith. *Federated Optimization in Heterogeneous
Networks*. MLSys 2020, Eq. (2): client k minimizes h_k(θ) = F_k(θ) + μ/2 ‖θ − θ^t‖²,
where θ^t are the server weights the round started from. The term's gradient is
μ(θ − θ^t), added to each minibatch gradient before the client optimizer steps; μ = 0
is FedAvg, bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fedmeta.algorithms.client_update import LocalTraining, Loss, masked_cross_entropy


class _ProximalStep:
    """The client optimizer, stepping on ∇F + μ(θ − θ_start) instead of ∇F.

    ``θ_start`` is ``start`` if given (Ditto pulls a personal model toward the global
    one), else what the model holds when the optimizer is made, which ``LocalTraining``
    does right after loading the server weights.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, mu: float, params: list[nn.Parameter],
                 start: list[torch.Tensor] | None = None) -> None:
        self.optimizer, self.mu, self.params = optimizer, mu, params
        self.start = [p.detach().clone() for p in params] if start is None else start

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        with torch.no_grad():
            for param, start in zip(self.params, self.start):
                # a parameter without a gradient is skipped by the optimizer, so it is still at θ_start
                if param.grad is not None:
                    param.grad.add_(param - start, alpha=self.mu)
        self.optimizer.step()


@dataclass(frozen=True)
class ProximalTraining(LocalTraining):
    """``LocalTraining`` on F + μ/2 ‖θ − θ_server‖²; its ``train_loss`` is F alone.

    Reporting F keeps the loss comparable with every other method's (and the run's
    divergence check meaningful).
    """

    mu: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.mu < math.inf:
            raise ValueError(f"FedProx mu must be >= 0 and finite, got {self.mu}")

    def make_optimizer(self, model: nn.Module) -> _ProximalStep:  # type: ignore[override]
        return _ProximalStep(super().make_optimizer(model), self.mu, list(model.parameters()))


def proximal_sgd(lr: float, mu: float, batch_size: int | None = 20, *, epochs: int | None = None,
                 steps: int | None = None, optimizer: str = "sgd", loss: Loss = masked_cross_entropy,
                 ) -> ProximalTraining:
    """Builds FedProx's client update of ``epochs`` epochs or ``steps`` steps (default 1 epoch)."""
    if epochs is None and steps is None:
        epochs = 1
    return ProximalTraining(lr=lr, batch_size=batch_size, epochs=epochs, steps=steps, optimizer=optimizer, mu=mu,
                            loss=loss)
