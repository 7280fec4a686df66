"""LEAF's Synthetic(alpha, beta) federated data (Li et al., 2020, "Federated Optimization
in Heterogeneous Networks", Sec. 5.1; LEAF ``data/synthetic``).

Client k draws its own softmax-regression model and its own input distribution:

    u_k ~ N(0, alpha²),  W_k ~ N(u_k, 1) [d x C],  b_k ~ N(u_k, 1) [C]
    B_k ~ N(0, beta²),  v_k ~ N(B_k, 1) [d],      x ~ N(v_k, Sigma),  Sigma_jj = j^-1.2
    y = argmax(softmax(W_k^T x + b_k))

alpha and beta are standard deviations, as in LEAF's code: alpha sets how much client
models differ, beta how much their inputs differ. With ``iid=True`` every client shares
one model and one input distribution. Sample counts follow LEAF's power law,
lognormal(4, 2) + 50.
"""

from __future__ import annotations

import numpy as np
import torch

from fedmeta.data.federated import PAPER_HELD_OUT_FRACTION, ClientData, Examples, FederatedDataset, split_clients
from fedmeta.params import client_seed


def _client_examples(rng: np.random.Generator, num: int, w: np.ndarray, b: np.ndarray,
                     mean_x: np.ndarray, std_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = rng.normal(mean_x, std_x, size=(num, mean_x.shape[0]))  # Sigma is diagonal
    y = np.argmax(x @ w + b, axis=1)  # softmax is monotone: the argmax of the logits
    return x.astype(np.float32), y.astype(np.int64)


def synthetic(num_clients: int = 100, *, alpha: float = 0.5, beta: float = 0.5, iid: bool = False,
              input_dim: int = 60, num_classes: int = 10, test_fraction: float = 0.2,
              max_examples: int | None = None, held_out_fraction: float = PAPER_HELD_OUT_FRACTION,
              seed: int = 0) -> FederatedDataset:
    """Generates ``num_clients`` clients of Synthetic(alpha, beta), split into train and test.

    Client k depends only on (seed, k): adding clients leaves the first ones unchanged.
    ``max_examples`` caps the power-law sample counts (the tail reaches the thousands).
    """
    if num_clients < 2:
        raise ValueError(f"synthetic: num_clients must be >= 2, got {num_clients}")
    if alpha < 0 or beta < 0:
        raise ValueError(f"synthetic: alpha and beta must be >= 0, got alpha={alpha} beta={beta}")
    if max_examples is not None and max_examples < 2:
        raise ValueError(f"synthetic: max_examples must be >= 2 (one train, one test), got {max_examples}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"synthetic: test_fraction must be in (0, 1), got {test_fraction}")
    std_x = np.power(np.arange(1, input_dim + 1), -1.2 / 2)  # sqrt of Sigma's diagonal
    shared = np.random.default_rng(client_seed(seed, -1, "synthetic/shared"))
    shared_w = shared.normal(0, 1, (input_dim, num_classes))
    shared_b = shared.normal(0, 1, num_classes)
    clients = {}
    for k in range(num_clients):
        client_id = f"synthetic_{k:05d}"
        rng = np.random.default_rng(client_seed(seed, -1, f"synthetic/{client_id}"))
        num = int(rng.lognormal(4, 2)) + 50
        num = num if max_examples is None else min(num, max_examples)
        if iid:
            w, b, mean_x = shared_w, shared_b, np.zeros(input_dim)
        else:
            u = rng.normal(0, alpha)
            w, b = rng.normal(u, 1, (input_dim, num_classes)), rng.normal(u, 1, num_classes)
            mean_x = rng.normal(rng.normal(0, beta), 1, input_dim)
        x, y = _client_examples(rng, num, w, b, mean_x, std_x)
        num_test = max(1, int(round(test_fraction * num)))
        train = Examples(torch.from_numpy(x[num_test:]), torch.from_numpy(y[num_test:]))
        test = Examples(torch.from_numpy(x[:num_test]), torch.from_numpy(y[:num_test]))
        clients[client_id] = ClientData(client_id, train, test)
    name = "synthetic_iid" if iid else f"synthetic({alpha:g},{beta:g})"
    return split_clients(clients, num_classes=num_classes, held_out_fraction=held_out_fraction, seed=seed,
                         name=name, info={"alpha": alpha, "beta": beta, "iid": iid})
