"""pFedMe's client update: local steps on the Moreau envelope of the client's loss.

Dinh, Tran, Nguyen. *Personalized Federated Learning with Moreau Envelopes*. NeurIPS
2020, Eq. (2)-(3) and Algorithm 1. Client i's objective is the Moreau envelope
F_i(w) = min_θ f_i(θ) + λ/2 ‖θ − w‖², whose minimizer θ̂_i(w) is its personal model. From
the global weights, for each of R (``local_steps``) minibatches D:

    θ ← w, then K (``inner_steps``) steps  θ ← θ − α (∇f_i(θ; D) + λ(θ − w))   (α: ``inner_lr``)
    w ← w − η λ (w − θ)                                                        (η: ``lr``)

and it sends Δ = w_R − w^t. The server takes w ← (1 − β) w + β · mean_i w_i, which is
server SGD of lr β on the uniform mean of the Δ.

The personal model is a function of the local model at every step, so a client keeps
nothing between rounds: 0 bytes of state. A held-out client personalizes by computing its
personal model θ̂(w) from the global weights: epochs of SGD on f + λ/2 ‖θ − w‖²
(``ProximalTraining`` with μ = λ, as Ditto's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fedmeta.algorithms.client_update import ClientUpdate, Loss, masked_cross_entropy
from fedmeta.algorithms.maml import check_inner, seeded_batches
from fedmeta.data.federated import Examples
from fedmeta.params import Params, set_weights


def check_lam(lam: float) -> None:
    if not 0 < lam < math.inf:
        raise ValueError(f"pFedMe lam must be > 0 and finite, got {lam}")


@dataclass(frozen=True)
class MoreauEnvelopeTraining:
    """R (``steps``) pFedMe local steps of size η (``lr``), each solving for θ with K steps of α (``inner_lr``).

    ``train_loss`` is f(θ; D) at the last inner step of each minibatch, weighted by targets.
    """

    lr: float
    lam: float
    inner_lr: float
    inner_steps: int
    steps: int
    batch_size: int | None = 20
    loss: Loss = masked_cross_entropy

    def __post_init__(self) -> None:
        if not 0 < self.lr < math.inf:
            raise ValueError(f"client lr must be > 0 and finite, got {self.lr}")
        check_lam(self.lam)
        check_inner(self.inner_lr, self.inner_steps)
        if self.steps < 1:
            raise ValueError(f"client steps must be >= 1, got {self.steps}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"client batch_size must be >= 1, got {self.batch_size}")

    def __call__(self, model: nn.Module, weights: Params, data: Examples, seed: int) -> ClientUpdate:
        if len(data) == 0:
            raise ValueError("client has no training examples")
        set_weights(model, weights)
        params = dict(model.named_parameters())
        with torch.random.fork_rng(devices=[]):  # dropout draws from the global stream; leave the caller's alone
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            model.train()
            batches = seeded_batches(len(data), self.batch_size, generator, self.steps)
            local = {n: p.detach().clone() for n, p in params.items()}
            loss_sum, counted = 0.0, 0
            for index in batches:
                with torch.no_grad():
                    for n, p in params.items():
                        p.copy_(local[n])
                for _ in range(self.inner_steps):
                    model.zero_grad(set_to_none=True)
                    loss, count = self.loss(model(data.x[index]), data.y[index])
                    (loss / max(count, 1)).backward()
                    with torch.no_grad():
                        for n, p in params.items():
                            if p.grad is not None:
                                p.sub_(self.inner_lr * (p.grad + self.lam * (p - local[n])))
                loss_sum += float(loss.detach())
                counted += count
                with torch.no_grad():
                    for n, p in params.items():
                        local[n] = local[n] - self.lr * self.lam * (local[n] - p)
        delta = {k: local[k] - w if k in local else torch.zeros_like(w) for k, w in weights.items()}
        metrics = {"train_loss": loss_sum / max(counted, 1), "num_steps": self.steps * self.inner_steps,
                   "num_samples": self.inner_steps * sum(len(index) for index in batches)}
        return ClientUpdate(delta, len(data), metrics)
