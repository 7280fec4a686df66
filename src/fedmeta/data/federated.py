"""Federated data: clients, each with its own train and test split.

The paper evaluates on clients that never trained the model (held-out clients), so the
client split is part of the dataset, seeded, and cohorts are derived from (seed, round).
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np
import torch

from fedmeta.params import client_seed

IGNORE_INDEX = -100
"""Target value that losses and accuracies skip (padding in sequence tasks)."""


class Examples(NamedTuple):
    """Inputs ``x`` and targets ``y`` with the same first dimension."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass(frozen=True)
class ClientData:
    """One client's examples, already split into train and test."""

    client_id: str
    train: Examples
    test: Examples

    @property
    def num_train(self) -> int:
        return len(self.train)


@dataclass(frozen=True)
class FederatedDataset:
    """Clients by id, with a seeded split into training and held-out clients.

    Attributes:
        clients: every client, by id.
        train_ids: clients the global model trains on.
        held_out_ids: clients only ever evaluated (initial and personalized accuracy).
        num_classes: size of the label space (the model's output width).
        name: where the data came from, for reports.
    """

    clients: dict[str, ClientData]
    train_ids: tuple[str, ...]
    held_out_ids: tuple[str, ...]
    num_classes: int
    name: str = "federated"
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [c for c in (*self.train_ids, *self.held_out_ids) if c not in self.clients]
        if missing:
            raise ValueError(f"{self.name}: client ids not in the dataset: {missing[:5]}")
        if set(self.train_ids) & set(self.held_out_ids):
            raise ValueError(f"{self.name}: a client is both training and held-out")

    def train_clients(self) -> list[ClientData]:
        return [self.clients[c] for c in self.train_ids]

    def held_out_clients(self) -> list[ClientData]:
        return [self.clients[c] for c in self.held_out_ids]

    def sample_cohort(self, size: int, seed: int, round_idx: int) -> list[ClientData]:
        """Draws ``size`` distinct training clients for a round, from (seed, round) only."""
        if not 0 < size <= len(self.train_ids):
            raise ValueError(
                f"{self.name}: cohort size {size} must be in 1..{len(self.train_ids)} "
                "(the number of training clients)"
            )
        rng = np.random.default_rng(client_seed(seed, round_idx, "cohort"))
        picked = rng.choice(len(self.train_ids), size=size, replace=False)
        return [self.clients[self.train_ids[i]] for i in sorted(picked)]

    def with_training_clients(self, count: int, seed: int) -> FederatedDataset:
        """The first ``count`` training clients of a shuffle drawn from ``seed``; the held-out clients untouched.

        A smaller count keeps a subset of a larger one's clients at the same seed, so a
        study over the number of training clients changes nothing else.
        """
        if not 1 <= count <= len(self.train_ids):
            raise ValueError(f"{count} training clients asked for: {self.name} has {len(self.train_ids)} "
                             f"(and {len(self.held_out_ids)} held-out, which stay as they are)")
        kept, _ = seeded_draw(self.train_ids, count, seed, "training clients")
        return FederatedDataset({c: self.clients[c] for c in (*kept, *self.held_out_ids)}, kept, self.held_out_ids,
                                self.num_classes, f"{self.name}, {count} of its {len(self.train_ids)} training clients",
                                dict(self.info))

    def validation_split(self, seed: int) -> FederatedDataset:
        """The training clients alone, split again (seeded, as the held-out split) into fitting and validation ones.

        The validation clients come back as ``held_out_ids``, so that choices made on them
        (hyperparameters, how to fine-tune) never read a held-out client.
        """
        ids = self.train_ids
        if len(ids) < 2:
            raise ValueError(f"{self.name}: a validation split needs at least 2 training clients, not {len(ids)}")
        validation, fitting = seeded_draw(ids, held_out_count(PAPER_HELD_OUT_FRACTION, len(ids)), seed,
                                          "validation split")
        return FederatedDataset({c: self.clients[c] for c in ids}, fitting, validation, self.num_classes,
                                f"{self.name} (validation split of the training clients)")

    def pooled_train(self) -> ClientData:
        """All training clients' train examples as one client (the centralized baseline)."""
        parts = self.train_clients()
        x = torch.cat([c.train.x for c in parts])
        y = torch.cat([c.train.y for c in parts])
        empty = Examples(x[:0], y[:0])
        return ClientData("pooled", Examples(x, y), empty)


def pack(clients: dict[str, ClientData]) -> dict[str, ClientData]:
    """The same clients, their tensors now views into one block per split and field.

    Four large blocks instead of thousands of small tensors, each in shared anonymous
    memory (see ``shared_block``): forked worker processes map the data without a copy
    and count in their memory only the clients they touch.
    """
    ids = list(clients)

    def packed(split: str, field: str) -> list[torch.Tensor]:
        parts = [getattr(getattr(clients[c], split), field) for c in ids]
        return list(shared_block(parts).split([len(t) for t in parts])) if parts else []

    columns = {(split, field): packed(split, field) for split in ("train", "test") for field in ("x", "y")}
    return {
        c: ClientData(c, Examples(columns["train", "x"][i], columns["train", "y"][i]),
                      Examples(columns["test", "x"][i], columns["test", "y"][i]))
        for i, c in enumerate(ids)
    }


def shared_block(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts)``, stored in a shared anonymous mapping rather than the heap.

    A fork copies the page tables of private memory, so every worker would be charged
    the whole dataset at once; a shared mapping is mapped in lazily, page by page. It
    needs no /dev/shm space (container limits do not apply) and is freed with the tensor.
    """
    shape = (sum(len(t) for t in parts), *parts[0].shape[1:])
    count = math.prod(shape)
    if count == 0:
        return torch.cat(parts)
    buffer = mmap.mmap(-1, count * parts[0].element_size())
    block = torch.frombuffer(buffer, dtype=parts[0].dtype, count=count).view(shape)
    return torch.cat(parts, out=block)


PAPER_HELD_OUT_FRACTION = 900 / 3400
"""The paper trains on 2,500 EMNIST writers and holds out 900."""


def seeded_draw(ids: Sequence[str], count: int, seed: int, purpose: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(``count`` of ``ids`` drawn from (seed, purpose), the others), each sorted.

    The draw is a prefix of one seeded shuffle, so a smaller count keeps a subset of a larger one's.
    """
    order = np.random.default_rng(client_seed(seed, -1, purpose)).permutation(len(ids))
    return tuple(sorted(ids[i] for i in order[:count])), tuple(sorted(ids[i] for i in order[count:]))


def held_out_count(fraction: float, total: int) -> int:
    """``fraction`` of ``total`` clients, rounded, leaving at least one on each side."""
    return min(max(1, round(fraction * total)), total - 1)


def split_clients(
    clients: dict[str, ClientData],
    *,
    num_classes: int,
    held_out_fraction: float = PAPER_HELD_OUT_FRACTION,
    seed: int = 0,
    name: str = "federated",
    info: dict | None = None,
) -> FederatedDataset:
    """Splits clients into training and held-out clients, seeded and order-independent.

    Clients with no train examples cannot train or be fine-tuned, and those with no
    test examples cannot be evaluated; both are dropped and counted in ``info``.
    """
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"{name}: held_out_fraction must be in (0, 1), got {held_out_fraction}")
    usable = {c: d for c, d in clients.items() if len(d.train) > 0 and len(d.test) > 0}
    if len(usable) < 2:
        raise ValueError(f"{name}: need at least 2 clients with train and test data, got {len(usable)}")
    ids = sorted(usable)
    held_out, train = seeded_draw(ids, held_out_count(held_out_fraction, len(ids)), seed, "held-out split")
    meta = dict(info or {})
    meta["dropped_clients"] = len(clients) - len(usable)
    return FederatedDataset(pack(usable), train, held_out, num_classes, name, meta)
