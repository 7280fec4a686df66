"""Any labelled dataset, split across clients with Dirichlet(alpha) label skew.

For each class, the shares of its examples that go to each client are drawn from
Dirichlet(alpha) (Hsu et al., 2019, "Measuring the Effects of Non-Identical Data
Distribution for Federated Visual Classification"): small alpha gives each client few
classes, large alpha approaches an iid split.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from fedmeta.data.federated import PAPER_HELD_OUT_FRACTION, ClientData, Examples, FederatedDataset, split_clients
from fedmeta.params import client_seed

MAX_DRAWS = 1000
"""Dirichlet draws tried before giving up on giving every client ``min_examples``."""


def _as_examples(dataset: Any) -> Examples:
    """Stacks an indexable dataset of (x, y) pairs (e.g. a torch Dataset) into tensors."""
    if isinstance(dataset, Examples):
        return dataset
    pairs = [dataset[i] for i in range(len(dataset))]
    x = torch.stack([torch.as_tensor(p[0]) for p in pairs])
    y = torch.stack([torch.as_tensor(p[1]) for p in pairs])
    if y.is_floating_point() and not bool((y == y.round()).all()):
        raise ValueError("dirichlet_partition: labels must be integers (the split skews each class's share); for "
                         "regression targets, give each client's examples: a mapping of client ids to (x, y)")
    return Examples(x, y.to(torch.int64))


def _owners(labels: np.ndarray, num_clients: int, num_classes: int, alpha: float, min_examples: int,
            seed: int) -> tuple[list[np.ndarray], np.random.Generator]:
    """Each client's example indices; redraws (seeded by attempt) until all hold ``min_examples``."""
    for attempt in range(MAX_DRAWS):
        rng = np.random.default_rng(client_seed(seed, attempt, "dirichlet partition"))
        owned: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for label in range(num_classes):
            members = rng.permutation(np.flatnonzero(labels == label))
            cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha)))[:-1] * len(members)).astype(int)
            for client, part in enumerate(np.split(members, cuts)):
                owned[client].append(part)
        owners = [np.concatenate(parts) for parts in owned]
        if min(len(o) for o in owners) >= min_examples:
            return owners, rng
    raise ValueError(f"dirichlet_partition: no draw in {MAX_DRAWS} gave every client {min_examples} examples; "
                     f"raise alpha ({alpha}) or lower num_clients ({num_clients})")


def dirichlet_partition(dataset: Any, num_clients: int, *, alpha: float, test_fraction: float = 0.2,
                        min_examples: int = 2, held_out_fraction: float = PAPER_HELD_OUT_FRACTION,
                        num_classes: int | None = None, seed: int = 0) -> FederatedDataset:
    """Partitions ``dataset`` over ``num_clients`` clients, each split into train and test.

    Every example goes to exactly one client. Client ``k`` is ``client_<k:05d>``; its
    examples are shuffled and the last ``round(test_fraction * n)`` (at least one, at
    most n - 1) are its test split.

    Args:
        dataset: ``Examples``, or anything indexable with ``len`` whose items are
            ``(x, y)`` with x a tensor or array and y an integer label (a torch Dataset).
        num_clients: how many clients to make.
        alpha: the Dirichlet concentration (> 0); 0.1 is very skewed, 100 nearly iid.
        test_fraction: share of each client's examples in its test split.
        min_examples: the fewest examples a client may get; the Dirichlet draw is
            repeated (with derived seeds) until every client has them.
        held_out_fraction: share of clients only evaluated (see ``split_clients``).
        num_classes: the label space; ``None`` infers the largest label plus one.
        seed: the only source of randomness.

    Returns:
        The dataset, named ``dirichlet(alpha)``, with ``alpha`` in ``info``.
    """
    if alpha <= 0:
        raise ValueError(f"dirichlet_partition: alpha must be > 0, got {alpha}")
    if num_clients < 2:
        raise ValueError(f"dirichlet_partition: num_clients must be >= 2, got {num_clients}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"dirichlet_partition: test_fraction must be in (0, 1), got {test_fraction}")
    if min_examples < 2:
        raise ValueError(f"dirichlet_partition: min_examples must be >= 2 (one train, one test), got {min_examples}")
    examples = _as_examples(dataset)
    labels = examples.y.numpy()
    if len(labels) < num_clients * min_examples:
        raise ValueError(f"dirichlet_partition: {len(labels)} examples cannot give {num_clients} clients "
                         f"{min_examples} examples each")
    classes = num_classes if num_classes is not None else int(labels.max()) + 1
    if labels.ndim != 1 or labels.min() < 0 or labels.max() >= classes:
        raise ValueError(f"dirichlet_partition: labels must be a 1-D tensor in 0..{classes - 1}, "
                         f"got shape {tuple(labels.shape)} with values {labels.min()}..{labels.max()}")
    owners, rng = _owners(labels, num_clients, classes, alpha, min_examples, seed)
    clients = {}
    for k, owned in enumerate(owners):
        index = torch.from_numpy(rng.permutation(owned))
        num_test = min(max(1, round(test_fraction * len(index))), len(index) - 1)
        train, test = index[:-num_test], index[-num_test:]
        client_id = f"client_{k:05d}"
        clients[client_id] = ClientData(client_id, Examples(examples.x[train], examples.y[train]),
                                        Examples(examples.x[test], examples.y[test]))
    return split_clients(clients, num_classes=classes, held_out_fraction=held_out_fraction, seed=seed,
                         name=f"dirichlet({alpha:g})", info={"alpha": alpha})


def output_width(targets: torch.Tensor) -> int:
    """The model's output width the targets ask for: classes for integer labels, else values per example."""
    if not targets.is_floating_point() and targets.dim() == 1:
        return int(targets.max()) + 1
    return 1 if targets.dim() == 1 else int(targets[0].numel())


def split_client_examples(clients: Mapping[str, Any], *, test_fraction: float = 0.2,
                          held_out_fraction: float = PAPER_HELD_OUT_FRACTION, seed: int = 0,
                          name: str = "clients") -> FederatedDataset:
    """Clients given by their examples, each split into train and test, then into training and held-out clients.

    ``clients`` maps each client id to its ``(x, y)`` (tensors, arrays, or ``Examples``),
    for data already federated by its source (a user, a sensor, a hospital) and any target:
    class labels, regression values, 0/1 label vectors. A client's examples are shuffled
    and the last ``round(test_fraction * n)`` (at least one, at most n - 1) are its test
    split; a client with fewer than two examples is refused. ``num_classes`` is the output
    width the targets ask for (``output_width``).
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"{name}: test_fraction must be in (0, 1), got {test_fraction}")
    split, targets = {}, []
    for client_id in sorted(clients):
        x, y = (torch.as_tensor(part) for part in clients[client_id])
        if len(x) != len(y) or len(x) < 2:
            raise ValueError(f"{name}: client {client_id!r} has {len(x)} inputs and {len(y)} targets; each client "
                             "needs as many of both, at least 2 (one to train on, one to test)")
        order = torch.from_numpy(np.random.default_rng(client_seed(seed, -1, f"test split/{client_id}"))
                                 .permutation(len(x)))
        num_test = min(max(1, round(test_fraction * len(x))), len(x) - 1)
        train, test = order[:-num_test], order[-num_test:]
        split[client_id] = ClientData(client_id, Examples(x[train], y[train]), Examples(x[test], y[test]))
        targets.append(y)
    if not split:
        raise ValueError(f"{name}: no clients")
    width = max(output_width(y) for y in targets)
    return split_clients(split, num_classes=width, held_out_fraction=held_out_fraction, seed=seed, name=name)
