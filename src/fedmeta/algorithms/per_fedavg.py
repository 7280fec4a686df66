"""Per-FedAvg's client update and its personalization rule.

Fallah, Mokhtari, Ozdaglar. *Personalized Federated Learning with Theoretical
Guarantees: A Model-Agnostic Meta-Learning Approach*. NeurIPS 2020, Algorithm 1. A client
takes τ local steps on the MAML objective F(w) = f(w − α∇f(w)), each on three
minibatches D, D′, D″:

    w̃ = w − α ∇f(w, D)
    FO: w ← w − β ∇f(w̃, D′)
    HF: w ← w − β (I − α ∇²f(w, D″)) ∇f(w̃, D′)

and sends Δ = w_τ − w; the server averages the models (weighted mean, server SGD lr 1).
The paper's HF approximates the Hessian-vector product ∇²f(w, D″)·u by a finite
difference of two gradients; here it is computed exactly by double backward (the limit
of that difference). A held-out client personalizes as the paper evaluates: a few SGD
steps of lr α on its own data (``AdaptationSteps``), tested after each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from fedmeta.algorithms.client_update import ClientUpdate, LocalTraining, Loss, masked_cross_entropy
from fedmeta.algorithms.maml import check_inner, gradient, mean_loss, seeded_batches
from fedmeta.data.federated import Examples
from fedmeta.params import Params, set_weights

VARIANTS = ("fo", "hf")


@dataclass(frozen=True)
class PerFedAvgTraining:
    """τ (``steps``) Per-FedAvg local steps of size β (``lr``) with inner step α (``inner_lr``).

    Each step draws its batches in a row from the seeded shuffle: D, D′ (and D″ for HF).
    ``train_loss`` is f(w̃, D′), the loss after the inner step, weighted by targets.
    """

    lr: float
    inner_lr: float
    steps: int
    batch_size: int | None = 20
    variant: str = "fo"
    loss: Loss = masked_cross_entropy

    def __post_init__(self) -> None:
        if not 0 < self.lr < math.inf:
            raise ValueError(f"client lr must be > 0 and finite, got {self.lr}")
        check_inner(self.inner_lr, 1)
        if self.steps < 1:
            raise ValueError(f"client steps must be >= 1, got {self.steps}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"client batch_size must be >= 1, got {self.batch_size}")
        if self.variant not in VARIANTS:
            raise ValueError(f"Per-FedAvg variant must be one of {VARIANTS}, got {self.variant!r}")

    def __call__(self, model: nn.Module, weights: Params, data: Examples, seed: int) -> ClientUpdate:
        if len(data) == 0:
            raise ValueError("client has no training examples")
        set_weights(model, weights)
        per_step = 3 if self.variant == "hf" else 2
        with torch.random.fork_rng(devices=[]):  # dropout draws from the global stream; leave the caller's alone
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            model.train()
            batches = seeded_batches(len(data), self.batch_size, generator, self.steps * per_step)
            buffers = dict(model.named_buffers())
            w = {n: p.detach().clone() for n, p in model.named_parameters()}
            loss_sum, counted = 0.0, 0
            for step in range(self.steps):
                inner, outer, *hessian = batches[step * per_step: (step + 1) * per_step]
                w = {n: t.requires_grad_() for n, t in w.items()}
                loss, _, _ = mean_loss(model, w, buffers, data, inner, self.loss)
                adapted = {n: (t - self.inner_lr * g).detach().requires_grad_()
                           for (n, t), g in zip(w.items(), gradient(loss, w))}
                loss, outer_sum, outer_count = mean_loss(model, adapted, buffers, data, outer, self.loss)
                direction = gradient(loss, adapted)
                if hessian:
                    loss, _, _ = mean_loss(model, w, buffers, data, hessian[0], self.loss)
                    grads = gradient(loss, w, create_graph=True)
                    products = torch.autograd.grad(grads, list(w.values()), grad_outputs=direction,
                                                   allow_unused=True, materialize_grads=True)
                    direction = [u - self.inner_lr * h for u, h in zip(direction, products)]
                w = {n: (t - self.lr * d).detach() for (n, t), d in zip(w.items(), direction)}
                loss_sum += outer_sum
                counted += outer_count
        delta = {k: w[k] - t if k in w else torch.zeros_like(t) for k, t in weights.items()}
        metrics = {"train_loss": loss_sum / max(counted, 1), "num_steps": self.steps,
                   "num_samples": sum(len(index) for index in batches)}
        return ClientUpdate(delta, len(data), metrics)


@dataclass(frozen=True)
class AdaptationSteps:
    """A personalization rule: ``steps`` SGD steps of lr α, one minibatch each, tested after each.

    The rule MAML and Per-FedAvg train the global model for (Fallah et al. 2020, Sec. 5:
    one step of SGD on the client's data). Its stages are steps, not epochs, so a client's
    report holds ``steps`` personalized numbers whatever its size.
    """

    lr: float
    steps: int = 1
    batch_size: int | None = 20
    loss: Loss = masked_cross_entropy

    def __post_init__(self) -> None:
        check_inner(self.lr, self.steps)

    def train_epochs(self, model: nn.Module, data: Examples, seed: int) -> Iterator[dict[str, float]]:
        """Trains ``model`` in place, yielding metrics after each step."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            optimizer = LocalTraining(self.lr, self.batch_size, epochs=None, steps=self.steps).make_optimizer(model)
            model.train()
            for index in seeded_batches(len(data), self.batch_size, generator, self.steps):
                optimizer.zero_grad(set_to_none=True)
                loss, count = self.loss(model(data.x[index]), data.y[index])
                (loss / max(count, 1)).backward()
                optimizer.step()
                yield {"train_loss": float(loss.detach()) / max(count, 1), "num_steps": 1, "num_samples": len(index)}
