"""Model weights as data: a ``dict[str, Tensor]`` and the few operations on it.

One ``nn.Module`` is reused for every client: weights are loaded into it and read out
again, so no client ever deep-copies a model.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

Params = dict[str, torch.Tensor]


def get_weights(model: nn.Module) -> Params:
    """Returns a detached copy of the model's trainable parameters and buffers."""
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def set_weights(model: nn.Module, weights: Params) -> None:
    """Copies ``weights`` into ``model`` in place (no reallocation)."""
    with torch.no_grad():
        for name, t in model.state_dict().items():
            t.copy_(weights[name])


def subtract(a: Params, b: Params) -> Params:
    """Returns ``a - b`` key by key."""
    return {k: a[k] - b[k] for k in a}


def norm(params: Params) -> float:
    """Returns the global L2 norm over all tensors."""
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in params.values())))


def client_seed(seed: int, round_idx: int, client_id: str) -> int:
    """Derives the seed of one client's work in one round.

    Stable across processes and Python runs (unlike ``hash``), so any engine backend
    gives every client the same random stream.
    """
    digest = hashlib.sha256(f"{seed}/{round_idx}/{client_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
