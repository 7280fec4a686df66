"""Federated MAML and first-order MAML (FOMAML) as client updates.

Finn, Abbeel, Levine. *Model-Agnostic Meta-Learning for Fast Adaptation of Deep
Networks*. ICML 2017, Eq. (1); federated as in Chen et al. 2018 and Fallah, Mokhtari,
Ozdaglar 2020 (Sec. 3), one client being one task. A client adapts from θ with K
support steps θ_{j+1} = θ_j − α ∇L_s(θ_j) (each on its own minibatch), then returns the
negative meta-gradient on a query minibatch:

    MAML:   g = Π_{j=0}^{K−1} (I − α ∇²L_s(θ_j)) · ∇L_q(θ_K)
    FOMAML: g = ∇L_q(θ_K)                      (the Hessian terms dropped)

The delta is Δ = −g, unscaled: the server optimizer's lr is the meta step size β
(server SGD with lr β gives θ ← θ − β·mean_i g_i). MAML differentiates through the K
inner steps with ``torch.func.functional_call`` on parameter tensors.
A held-out client personalizes the way the method trained it: K steps of SGD with lr α
(``fedmeta.algorithms.per_fedavg.AdaptationSteps``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from fedmeta.algorithms.client_update import ClientUpdate, Loss, batch_order, masked_cross_entropy
from fedmeta.data.federated import Examples
from fedmeta.params import Params, set_weights


def mean_loss(model: nn.Module, params: Params, buffers: Params, data: Examples, index: torch.Tensor,
              loss_fn: Loss = masked_cross_entropy) -> tuple[torch.Tensor, float, int]:
    """(mean loss as a differentiable function of ``params``, summed loss, counted targets) on one batch."""
    logits = functional_call(model, {**params, **buffers}, (data.x[index],))
    loss, count = loss_fn(logits, data.y[index])
    return loss / max(count, 1), float(loss.detach()), count


def gradient(loss: torch.Tensor, params: Params, *, create_graph: bool = False) -> list[torch.Tensor]:
    """∇loss for each of ``params`` (zeros where the loss does not depend on one)."""
    return list(torch.autograd.grad(loss, list(params.values()), create_graph=create_graph, allow_unused=True,
                                    materialize_grads=True))


def seeded_batches(num_examples: int, batch_size: int | None, generator: torch.Generator,
                   count: int) -> list[torch.Tensor]:
    """``count`` index batches in a row, each epoch a fresh shuffle (``batch_order`` in steps mode)."""
    return [index for epoch in batch_order(num_examples, batch_size, generator, steps=count) for index in epoch]


def check_inner(inner_lr: float, inner_steps: int) -> None:
    if not 0 < inner_lr < math.inf:
        raise ValueError(f"inner lr must be > 0 and finite, got {inner_lr}")
    if inner_steps < 1:
        raise ValueError(f"inner steps must be >= 1, got {inner_steps}")


@dataclass(frozen=True)
class MetaGradient:
    """One client's MAML (``second_order=True``) or FOMAML meta-gradient, as Δ = −g.

    Batches: K support batches, then one query batch, drawn in a row from the seeded
    shuffle (``batch_size=None``: every example in each). ``train_loss`` is the query
    loss after adaptation, the meta-objective.
    """

    inner_lr: float
    inner_steps: int
    batch_size: int | None = 20
    second_order: bool = True
    loss: Loss = masked_cross_entropy

    def __post_init__(self) -> None:
        check_inner(self.inner_lr, self.inner_steps)
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"client batch_size must be >= 1, got {self.batch_size}")

    def __call__(self, model: nn.Module, weights: Params, data: Examples, seed: int) -> ClientUpdate:
        if len(data) == 0:
            raise ValueError("client has no training examples")
        set_weights(model, weights)
        with torch.random.fork_rng(devices=[]):  # dropout draws from the global stream; leave the caller's alone
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            model.train()
            *support, query = seeded_batches(len(data), self.batch_size, generator, self.inner_steps + 1)
            start = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
            buffers = dict(model.named_buffers())
            fast = start
            for index in support:
                loss, _, _ = mean_loss(model, fast, buffers, data, index, self.loss)
                # without the graph of the gradient, dθ_K/dθ = I: exactly the first-order approximation
                grads = gradient(loss, fast, create_graph=self.second_order)
                fast = {n: w - self.inner_lr * g for (n, w), g in zip(fast.items(), grads)}
            query_loss, query_sum, counted = mean_loss(model, fast, buffers, data, query, self.loss)
            meta_gradient = dict(zip(start, gradient(query_loss, start)))
        delta = {k: -meta_gradient[k] if k in meta_gradient else torch.zeros_like(w) for k, w in weights.items()}
        metrics = {"train_loss": query_sum / max(counted, 1), "num_steps": self.inner_steps + 1,
                   "num_samples": sum(len(index) for index in (*support, query))}
        return ClientUpdate(delta, len(data), metrics)
