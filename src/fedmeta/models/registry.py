"""Models by the names configs use."""

from __future__ import annotations

from typing import Callable

from torch import nn

from fedmeta.models.cnn import FedAvgCNN, TFFCNN
from fedmeta.models.linear import LogisticRegression
from fedmeta.models.lstm import CharLSTM
from fedmeta.models.mlp import MLP

MODELS: dict[str, Callable[..., nn.Module]] = {
    "fedavg_cnn": lambda num_classes, input_dim: FedAvgCNN(num_classes),
    "tff_cnn": lambda num_classes, input_dim: TFFCNN(num_classes),
    "char_lstm": lambda num_classes, input_dim: CharLSTM(vocab_size=num_classes),
    "logistic_regression": lambda num_classes, input_dim: LogisticRegression(input_dim, num_classes),
    "mlp": lambda num_classes, input_dim: MLP(input_dim, num_classes),
}


def build_model(name: str, *, num_classes: int, input_dim: int = 0) -> nn.Module:
    """Builds a named model for a dataset with ``num_classes`` outputs."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if name in ("logistic_regression", "mlp") and input_dim < 1:
        raise ValueError(f"model {name!r} needs the input width, got input_dim={input_dim}")
    return MODELS[name](num_classes, input_dim)
