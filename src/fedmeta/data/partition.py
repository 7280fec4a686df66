"""Any labelled dataset, split across clients with Dirichlet(alpha) label skew.

For each class, the shares of its examples that go to each client are drawn from
Dirichlet(alpha) (Hsu et al., 2019): small alpha gives clients few classes each, large
alpha approaches an iid split.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedmeta.data.federated import PAPER_HELD_OUT_FRACTION, ClientData, Examples, FederatedDataset, split_clients
from fedmeta.params import client_seed


def _as_examples(dataset: Any) -> Examples:
    """Stacks an indexable dataset of (x, y) pairs (e.g. a torch Dataset) into tensors."""
    if isinstance(dataset, Examples):
        return dataset
    pairs = [dataset[i] for i in range(len(dataset))]
    x = torch.stack([torch.as_tensor(p[0]) for p in pairs])
    y = torch.as_tensor([int(p[1]) for p in pairs], dtype=torch.int64)
    return Examples(x, y)


def dirichlet_partition(dataset: Any, num_clients: int, *, alpha: float, test_fraction: float = 0.2,
                        min_examples: int = 2, held_out_fraction: float = PAPER_HELD_OUT_FRACTION,
                        num_classes: int | None = None, seed: int = 0) -> FederatedDataset:
    """Partitions ``dataset`` over ``num_clients`` clients, each split into train and test.

    Draws are repeated (with derived seeds) until every client holds ``min_examples``;
    each client's test split is its last ``test_fraction`` (at least one example).
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
    for attempt in range(1000):
        rng = np.random.default_rng(client_seed(seed, attempt, "dirichlet partition"))
        owners: list[list[int]] = [[] for _ in range(num_clients)]
        for label in range(classes):
            members = rng.permutation(np.flatnonzero(labels == label))
            cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha)))[:-1] * len(members)).astype(int)
            for client, part in enumerate(np.split(members, cuts)):
                owners[client].extend(part.tolist())
        if min(len(o) for o in owners) >= min_examples:
            break
    else:
        raise ValueError(f"dirichlet_partition: no draw in 1000 gave every client {min_examples} examples; "
                         f"raise alpha ({alpha}) or lower num_clients ({num_clients})")
    clients = {}
    for k, owned in enumerate(owners):
        index = torch.as_tensor(rng.permutation(owned))
        num_test = min(max(1, int(round(test_fraction * len(index)))), len(index) - 1)
        train, test = index[:-num_test], index[-num_test:]
        client_id = f"client_{k:05d}"
        clients[client_id] = ClientData(client_id, Examples(examples.x[train], examples.y[train]),
                                        Examples(examples.x[test], examples.y[test]))
    return split_clients(clients, num_classes=classes, held_out_fraction=held_out_fraction, seed=seed,
                         name=f"dirichlet({alpha:g})", info={"alpha": alpha})
