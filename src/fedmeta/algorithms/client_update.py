"""Client updates: E epochs or K steps of a client optimizer from the server weights.

A client starts at θ and takes local steps θ_{j+1} = θ_j − β ∇L(θ_j); its update is
Δ = θ_K − θ_0 (Jiang et al., 2019, Sec. 2). FedSGD is K = 1 on the full client batch,
FedAvg(E) is E epochs, Reptile(K) is K steps.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fedmeta.client_work import ClientUpdate
from fedmeta.data.federated import IGNORE_INDEX, Examples
from fedmeta.params import Params, set_weights, subtract

CLIENT_OPTIMIZERS = ("sgd", "adam")
_OPTIMIZERS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, float], torch.optim.Optimizer]] = (
    weakref.WeakKeyDictionary()
)


Loss = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, int]]
"""(model outputs, targets) → (summed loss, counted targets); ``fedmeta.evaluation.tasks`` holds the named ones."""


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Returns (summed loss, number of counted targets), skipping ``IGNORE_INDEX``.

    Works for classification (``[N, C]`` logits) and sequences (``[N, T, C]``); summing
    rather than averaging lets callers weight batches that hold padding correctly.
    """
    flat_targets = targets.reshape(-1)
    loss = F.cross_entropy(
        logits.reshape(flat_targets.shape[0], -1), flat_targets,
        ignore_index=IGNORE_INDEX, reduction="sum",
    )
    return loss, int((flat_targets != IGNORE_INDEX).sum())


def batch_order(
    num_examples: int, batch_size: int | None, generator: torch.Generator,
    *, epochs: int | None = None, steps: int | None = None,
) -> Iterator[list[torch.Tensor]]:
    """Yields, per epoch, the index batches of a fresh shuffle.

    With ``steps`` the epochs repeat until exactly ``steps`` batches were yielded (the
    last epoch cut short), so Reptile(K) takes K steps whatever the client's size.
    ``batch_size=None`` means one batch holding every example (FedSGD).
    """
    size = num_examples if batch_size is None else batch_size
    remaining = steps
    epoch = 0
    while (epochs is not None and epoch < epochs) or (remaining is not None and remaining > 0):
        batches = list(torch.randperm(num_examples, generator=generator).split(size))
        if remaining is not None:
            batches = batches[:remaining]
            remaining -= len(batches)
        epoch += 1
        yield batches


@dataclass(frozen=True)
class LocalTraining:
    """E epochs (``epochs``) or K steps (``steps``) of a client optimizer on ``loss``.

    The model passed in is a reusable worker model: weights are loaded into it, never
    deep-copied. Randomness (shuffling, dropout) comes only from ``seed``.
    """

    lr: float
    batch_size: int | None = 20
    epochs: int | None = 1
    steps: int | None = None
    optimizer: str = "sgd"
    loss: Loss = masked_cross_entropy

    def __post_init__(self) -> None:
        if (self.epochs is None) == (self.steps is None):
            raise ValueError(f"give exactly one of epochs or steps, got epochs={self.epochs} steps={self.steps}")
        for name in ("epochs", "steps", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"client {name} must be >= 1, got {value}")
        if not self.lr > 0:
            raise ValueError(f"client lr must be > 0, got {self.lr}")
        if self.optimizer not in CLIENT_OPTIMIZERS:
            raise ValueError(f"client optimizer must be one of {CLIENT_OPTIMIZERS}, got {self.optimizer!r}")

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The model's optimizer of this kind, made once per model and reset for each client.

        Engines reuse one model per worker; its parameters stay the same objects (weights
        are copied into them), so the optimizer can be kept and only its state cleared.
        """
        per_model = _OPTIMIZERS.setdefault(model, {})
        key = (self.optimizer, self.lr)
        if key not in per_model:
            make = torch.optim.Adam if self.optimizer == "adam" else torch.optim.SGD
            per_model[key] = make(model.parameters(), lr=self.lr)
        optimizer = per_model[key]
        optimizer.state.clear()  # Adam's moments and step count start afresh, as for a new optimizer
        return optimizer

    def train_epochs(self, model: nn.Module, data: Examples, seed: int) -> Iterator[dict[str, float]]:
        """Trains ``model`` in place, yielding metrics after each (possibly partial) epoch."""
        with torch.random.fork_rng(devices=[]):  # dropout draws from the global stream; leave the caller's alone
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            optimizer = self.make_optimizer(model)
            model.train()
            for batches in batch_order(len(data), self.batch_size, generator, epochs=self.epochs, steps=self.steps):
                loss_sum, counted, samples = 0.0, 0, 0
                for index in batches:
                    optimizer.zero_grad(set_to_none=True)
                    loss, count = self.loss(model(data.x[index]), data.y[index])
                    (loss / max(count, 1)).backward()
                    optimizer.step()
                    loss_sum += float(loss.detach())
                    counted += count
                    samples += len(index)
                yield {"train_loss": loss_sum / max(counted, 1), "num_steps": len(batches), "num_samples": samples}

    def __call__(self, model: nn.Module, weights: Params, data: Examples, seed: int) -> ClientUpdate:
        """Runs the whole local training from ``weights``; returns the client's delta."""
        if len(data) == 0:
            raise ValueError("client has no training examples")
        set_weights(model, weights)
        epochs = list(self.train_epochs(model, data, seed))
        # one new tensor per entry: the difference itself, no intermediate copy of the weights
        delta = subtract(model.state_dict(), weights)
        metrics = {
            # weighted by samples, so a short last epoch (steps mode) counts for what it holds
            "train_loss": (sum(e["train_loss"] * e["num_samples"] for e in epochs)
                           / sum(e["num_samples"] for e in epochs)),
            "num_steps": sum(e["num_steps"] for e in epochs),
            "num_samples": sum(e["num_samples"] for e in epochs),
        }
        return ClientUpdate(delta, len(data), metrics)


def _masked_loss(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``masked_cross_entropy`` with its count as a tensor, as ``vmap`` needs (padding is ``IGNORE_INDEX``)."""
    flat = targets.reshape(-1)
    loss = F.cross_entropy(outputs.reshape(flat.shape[0], -1), flat, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (flat != IGNORE_INDEX).sum()


def can_train_cohort(update: LocalTraining, model: nn.Module) -> bool:
    """Whether ``train_cohort`` can run this client update on this model.

    Plain SGD on the default loss (padding must be maskable), and a model without
    buffers or dropout, whose forward pass is then a pure function of its weights.
    """
    return (update.optimizer == "sgd" and update.loss is masked_cross_entropy and not list(model.buffers())
            and not any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules()))


def train_cohort(update: LocalTraining, model: nn.Module, weights: Params, datas: list[Examples],
                 seeds: list[int]) -> list[ClientUpdate]:
    """``update`` on every client at once: one batched step of every client per step (``torch.func.vmap``).

    Each client takes the batches ``update`` would take alone, in the same order (its own
    seeded shuffle); at each step every client's batch is padded to the longest with
    ignored targets, and a client with no batch left takes a step of zero. The updates
    equal the clients' own up to float rounding (a batched kernel sums in another order).
    """
    from torch.func import functional_call, grad_and_value, vmap

    plans = []
    for data, seed in zip(datas, seeds, strict=True):
        generator = torch.Generator().manual_seed(seed)
        plans.append([(epoch, index) for epoch, batches in enumerate(
            batch_order(len(data), update.batch_size, generator, epochs=update.epochs, steps=update.steps))
            for index in batches])

    def client_loss(params: Params, x: torch.Tensor, y: torch.Tensor):
        loss, count = _masked_loss(functional_call(model, params, (x,)), y)
        return loss / count.clamp(min=1), (loss, count)

    step = vmap(grad_and_value(client_loss, has_aux=True))
    params = {k: w.detach().unsqueeze(0).repeat(len(datas), *([1] * w.dim())) for k, w in weights.items()}
    losses, counts = [], []  # per step, per client: read once at the end, not synced step by step
    model.train()
    for t in range(max(len(plan) for plan in plans)):
        width = max(len(plan[t][1]) if t < len(plan) else 0 for plan in plans)
        x = datas[0].x.new_zeros((len(datas), width, *datas[0].x.shape[1:]))
        y = torch.full((len(datas), width, *datas[0].y.shape[1:]), IGNORE_INDEX, dtype=datas[0].y.dtype,
                       device=datas[0].y.device)
        for c, (plan, data) in enumerate(zip(plans, datas)):
            if t < len(plan):
                index = plan[t][1]
                x[c, :len(index)], y[c, :len(index)] = data.x[index], data.y[index]
        grads, (_, (loss, count)) = step(params, x, y)
        with torch.no_grad():
            for k in params:
                params[k] -= update.lr * grads[k]
        losses.append(loss.detach())
        counts.append(count)
    losses, counts = torch.stack(losses).tolist(), torch.stack(counts).tolist()
    epochs = [[[0.0, 0, 0] for _ in range(plan[-1][0] + 1)] for plan in plans]  # loss sum, counted, samples
    for c, plan in enumerate(plans):
        for t, (epoch, index) in enumerate(plan):
            epochs[c][epoch][0] += losses[t][c]
            epochs[c][epoch][1] += int(counts[t][c])
            epochs[c][epoch][2] += len(index)
    updates = []
    for c, (plan, data) in enumerate(zip(plans, datas)):
        samples = sum(e[2] for e in epochs[c])
        metrics = {"train_loss": sum(e[0] / max(e[1], 1) * e[2] for e in epochs[c]) / samples,
                   "num_steps": len(plan), "num_samples": samples}
        updates.append(ClientUpdate({k: params[k][c] - weights[k] for k in weights}, len(data), metrics))
    return updates


def local_sgd(lr: float, batch_size: int | None = 20, *, epochs: int | None = None,
              steps: int | None = None, optimizer: str = "sgd", loss: Loss = masked_cross_entropy) -> LocalTraining:
    """Builds a client update of ``epochs`` epochs or ``steps`` steps (default 1 epoch)."""
    if epochs is None and steps is None:
        epochs = 1
    return LocalTraining(lr=lr, batch_size=batch_size, epochs=epochs, steps=steps, optimizer=optimizer, loss=loss)
