"""Models by the names configs use, or by the import path of a factory of one's own."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from fedmeta.import_path import call_with_named, is_import_path, load
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


def from_factory(factory: Callable[..., Any], *, num_classes: int, input_dim: int, where: str) -> nn.Module:
    """Calls a model factory with those of ``num_classes`` and ``input_dim`` it names; ``where`` names it in errors."""
    try:
        model = call_with_named(factory, num_classes=num_classes, input_dim=input_dim)
    except TypeError as error:  # it needs arguments it is not given
        raise ValueError(f"{where}: {error}; a model factory is called with those of num_classes and input_dim it "
                         "names") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"{where}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_model(name: str, *, num_classes: int, input_dim: int = 0) -> nn.Module:
    """Builds a named model (or one by its factory's import path) for a dataset with ``num_classes`` outputs."""
    if is_import_path(name):
        return from_factory(load(name, "model.name"), num_classes=num_classes, input_dim=input_dim,
                            where=f"model.name = {name!r}")
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if name in ("logistic_regression", "mlp") and input_dim < 1:
        raise ValueError(f"model {name!r} needs the input width, got input_dim={input_dim}")
    return MODELS[name](num_classes, input_dim)
