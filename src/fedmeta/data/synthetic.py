"""LEAF's Synthetic(alpha, beta) federated data (Li et al., 2020, "Federated Optimization
in Heterogeneous Networks", Sec. 5.1 and its ``generate_synthetic.py``).

Client k draws its own softmax-regression model and its own input distribution:

    u_k ~ N(0, alpha²),  W_k ~ N(u_k, 1) [d x C],  b_k ~ N(u_k, 1) [C]
    B_k ~ N(0, beta²),   v_k ~ N(B_k, 1) [d],      x ~ N(v_k, Sigma),  Sigma_jj = j^-1.2
    y = argmax(softmax(W_k^T x + b_k))

alpha and beta are standard deviations, as in the reference code. beta spreads the
clients' input means, and with them their label mixes. alpha is meant to make client
models differ, but u_k adds the same amount to every class's logit, which the argmax
ignores: as in the reference, alpha leaves the data unchanged (same seed, same x and y);
clients differ in model through their own W_k, b_k for every alpha. With ``iid=True``
every client shares one model (W, b ~ N(0, 1)) and x ~ N(0, Sigma), the paper's
Synthetic-IID. Sample counts follow the reference power law, ``int(lognormal(4, 2)) + 50``.
"""

from __future__ import annotations

import numpy as np
import torch

from fedmeta.data.federated import PAPER_HELD_OUT_FRACTION, ClientData, Examples, FederatedDataset, split_clients
from fedmeta.params import client_seed


def _check(num_clients: int, alpha: float, beta: float, input_dim: int, num_classes: int, test_fraction: float,
           min_examples: int, max_examples: int | None) -> None:
    problems = [
        (num_clients < 2, f"num_clients must be >= 2, got {num_clients}"),
        (alpha < 0 or beta < 0, f"alpha and beta must be >= 0, got alpha={alpha} beta={beta}"),
        (input_dim < 1, f"input_dim must be >= 1, got {input_dim}"),
        (num_classes < 2, f"num_classes must be >= 2, got {num_classes}"),
        (not 0 < test_fraction < 1, f"test_fraction must be in (0, 1), got {test_fraction}"),
        (min_examples < 2, f"min_examples must be >= 2 (one train, one test), got {min_examples}"),
        (max_examples is not None and max_examples < min_examples,
         f"max_examples must be >= min_examples ({min_examples}), got {max_examples}"),
    ]
    for failed, message in problems:
        if failed:
            raise ValueError(f"synthetic: {message}")


def synthetic(num_clients: int = 100, *, alpha: float = 0.5, beta: float = 0.5, iid: bool = False,
              input_dim: int = 60, num_classes: int = 10, test_fraction: float = 0.2,
              min_examples: int = 50, max_examples: int | None = None,
              held_out_fraction: float = PAPER_HELD_OUT_FRACTION, seed: int = 0) -> FederatedDataset:
    """Generates ``num_clients`` clients of Synthetic(alpha, beta), each split into train and test.

    Client ``k`` is ``synthetic_<k:05d>`` and depends only on (seed, k), so adding clients
    leaves the earlier ones unchanged. Its first ``round(test_fraction * n)`` examples
    (at least one, at most n - 1) are its test split.

    Args:
        num_clients: how many clients to generate.
        alpha: standard deviation of the client models' means (no effect on the data;
            see the module docstring).
        beta: standard deviation of the client inputs' means (input heterogeneity).
        iid: one model and one input distribution for all clients (alpha, beta unused).
        input_dim: d, the width of x (60 in the paper).
        num_classes: C, the number of labels (10 in the paper).
        test_fraction: share of each client's examples in its test split.
        min_examples: the power law's offset, so each client has at least this many
            examples (50 in the paper).
        max_examples: caps each client's count (the power law's tail reaches thousands);
            ``None`` for no cap.
        held_out_fraction: share of clients only evaluated (see ``split_clients``).
        seed: the only source of randomness.

    Returns:
        The dataset: x float32 ``[n, input_dim]``, y int64 in ``0..num_classes-1``, named
        ``synthetic(alpha,beta)`` or ``synthetic_iid``, with the arguments in ``info``.
    """
    _check(num_clients, alpha, beta, input_dim, num_classes, test_fraction, min_examples, max_examples)
    std_x = np.power(np.arange(1, input_dim + 1), -1.2 / 2)  # Sigma is diagonal: x = v + std * noise
    shared = np.random.default_rng(client_seed(seed, -1, "synthetic/shared"))
    shared_w, shared_b = shared.normal(0, 1, (input_dim, num_classes)), shared.normal(0, 1, num_classes)
    clients = {}
    for k in range(num_clients):
        client_id = f"synthetic_{k:05d}"
        rng = np.random.default_rng(client_seed(seed, -1, f"synthetic/{client_id}"))
        num = int(rng.lognormal(4, 2)) + min_examples
        num = num if max_examples is None else min(num, max_examples)
        if iid:
            w, b, mean_x = shared_w, shared_b, np.zeros(input_dim)
        else:
            u = rng.normal(0, alpha)
            w, b = rng.normal(u, 1, (input_dim, num_classes)), rng.normal(u, 1, num_classes)
            mean_x = rng.normal(rng.normal(0, beta), 1, input_dim)
        x = (mean_x + std_x * rng.standard_normal((num, input_dim))).astype(np.float32)
        y = np.argmax(x @ w + b, axis=1).astype(np.int64)  # softmax is monotone: the argmax of the logits
        num_test = min(max(1, round(test_fraction * num)), num - 1)
        train = Examples(torch.from_numpy(x[num_test:]), torch.from_numpy(y[num_test:]))
        test = Examples(torch.from_numpy(x[:num_test]), torch.from_numpy(y[:num_test]))
        clients[client_id] = ClientData(client_id, train, test)
    name = "synthetic_iid" if iid else f"synthetic({alpha:g},{beta:g})"
    info = {"alpha": alpha, "beta": beta, "iid": iid,
            "num_train_examples": sum(len(c.train) for c in clients.values()),
            "num_test_examples": sum(len(c.test) for c in clients.values())}
    return split_clients(clients, num_classes=num_classes, held_out_fraction=held_out_fraction, seed=seed,
                         name=name, info=info)
