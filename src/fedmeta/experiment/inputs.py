"""What a run trains: its dataset, model and task, built from the config or passed from Python.

The CLI builds all three from the config. ``fedmeta.Experiment`` may pass any part
(``Given``); the config then records each as the import path that names it, so that
``fedmeta eval`` and ``fedmeta run --resume`` rebuild it, or, where no path does (an
``nn.Module`` instance, a dataset in memory, a function of ``__main__``), as
``<passed from Python: ...>``, which tells a resume or an evaluation what to pass again.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from fedmeta.algorithms.client_update import masked_cross_entropy
from fedmeta.algorithms.fedrep import personal_keys
from fedmeta.data.federated import FederatedDataset
from fedmeta.evaluation.tasks import CLASSIFICATION, Metric, Task, zero_output_loss
from fedmeta.experiment.build import (
    build_dataset, build_initial_model, build_task, federated, from_data_function, kept_training_clients, passed_again,
)
from fedmeta.experiment.config import DEFAULT_MODELS, ExperimentConfig
from fedmeta.import_path import import_path_of, is_passed_from_python, passed_from_python
from fedmeta.params import get_weights


@dataclass(frozen=True)
class Given:
    """The parts a Python caller passes in place of the config's; each left None is built from the config.

    ``model``: an ``nn.Module``, whose weights start the run (a copy; the module passed is
    left alone), or a factory, called as ``model.name``'s is. ``dataset``: a
    ``FederatedDataset``, a mapping of client ids to ``(x, y)``, a dataset of ``(x, y)``
    pairs (split by Dirichlet label skew), or a function returning one, called as
    ``data.kind``'s is. ``loss``: a loss name or a function returning the batch mean.
    ``metrics``: names or ``Metric``s, the first primary. Functions passed must be
    picklable (module-level) for engines with worker processes.
    """

    model: nn.Module | Callable[..., nn.Module] | None = None
    dataset: Any = None
    loss: str | Callable[..., Any] | None = None
    metrics: Sequence[str | Metric] | None = None


def _named(obj: Any, what: str) -> str:
    return import_path_of(obj) or passed_from_python(what)


def _dataset_name(dataset: Any) -> str:
    if inspect.isroutine(dataset):
        return _named(dataset, dataset.__qualname__)
    if isinstance(dataset, FederatedDataset):
        return passed_from_python(f"FederatedDataset {dataset.name!r}")
    return passed_from_python(type(dataset).__name__)


def recorded(config: ExperimentConfig, given: Given) -> ExperimentConfig:
    """``config`` naming the parts ``given`` passes, for ``config.toml``: by import path, or as passed from Python."""
    changes: dict[str, Any] = {}
    if given.dataset is not None:
        changes["data"] = dataclasses.replace(config.data, kind=_dataset_name(given.dataset))
    if given.model is not None:
        name = (passed_from_python(type(given.model).__name__) if isinstance(given.model, nn.Module)
                else _named(given.model, getattr(given.model, "__qualname__", type(given.model).__name__)))
        changes["model"] = dataclasses.replace(config.model, name=name)
    task = config.task
    if given.loss is not None:
        loss = given.loss if isinstance(given.loss, str) else _named(given.loss, getattr(
            given.loss, "__qualname__", type(given.loss).__name__))
        task = dataclasses.replace(task, loss=loss, metrics=task.metrics if given.metrics is None else None)
    if given.metrics is not None:
        task = dataclasses.replace(task, metrics=tuple(
            m if isinstance(m, str) else passed_from_python(f"Metric {m.name!r}") for m in given.metrics))
    if task != config.task:
        changes["task"] = task
    return dataclasses.replace(config, **changes)


@dataclass(frozen=True)
class RunInputs:
    """The dataset, the model at its initial weights, and the task of a run; checked to fit each other."""

    dataset: FederatedDataset
    model: nn.Module
    task: Task

    def divergence_yardstick(self) -> tuple[float, str]:
        """(the loss of a trivial prediction, that said in words): the run's losses are judged against it.

        Cross-entropy has ln(num_classes), a uniform guess's; another loss, that of all-zero
        outputs on the training clients' targets (ln 2 per label for BCE, the mean square of
        the targets for MSE).
        """
        if self.task.loss is masked_cross_entropy:
            classes = self.dataset.num_classes
            return math.log(classes), f"ln({classes}) = {math.log(classes):.4g}, the loss of a uniform guess"
        first = self.dataset.clients[self.dataset.train_ids[0]].train
        training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                shape = self.model(first.x[:1]).shape[1:]
        finally:
            self.model.train(training)
        value = zero_output_loss(self.task.loss, shape, (c.train.y for c in self.dataset.train_clients()))
        return value, f"{value:.4g}, the loss of all-zero outputs on the training clients"


def check_model_fits(config: ExperimentConfig, model: nn.Module, dataset: FederatedDataset,
                     task: Task = CLASSIFICATION) -> None:
    """Runs the model and its loss on two examples of the first training client; a failure is one line.

    A model that cannot take the data (``fedavg_cnn`` on Shakespeare's character ids) is
    refused here, before a run directory or a worker exists, rather than in every client
    of the first round. In eval mode and without gradients the check draws no random
    numbers and updates no statistics, so the run keeps the bits it has without it.
    """
    client = dataset.clients[dataset.train_ids[0]]
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            task.loss(model(client.train.x[:2]), client.train.y[:2])
    except Exception as error:  # whatever a model raises on inputs it was not built for
        detail = (str(error).strip().splitlines() or [""])[0]
        kind = config.data.kind
        default = (f"; data.kind = {kind!r} takes model.name = {DEFAULT_MODELS[kind]!r} by default"
                   if kind in DEFAULT_MODELS else "")
        raise ValueError(f"model.name = {config.model_name!r} does not fit data.kind = {kind!r}: on two examples of "
                         f"client {client.client_id!r} it raises {type(error).__name__}: {detail}{default}") from None
    finally:
        model.train(training)


def build_inputs(config: ExperimentConfig, given: Given = Given()) -> RunInputs:
    """The run's dataset, initial model and task: ``given``'s parts, the rest built from ``config``.

    ``config`` is the recorded one (``recorded``). Parts the config marks as passed from
    Python and ``given`` lacks are refused in one line saying what to pass.
    """
    missing = [(key, value, argument) for key, value, argument, passed in (
        ("data.kind", config.data.kind, "dataset", given.dataset),
        ("model.name", config.model_name, "model", given.model),
        ("task.loss", config.task.loss, "loss", given.loss),
        ("task.metrics", [m for m in config.task.metrics or () if is_passed_from_python(m)], "metrics", given.metrics),
    ) if passed is None and (value if isinstance(value, list) else is_passed_from_python(value))]
    if missing:
        raise passed_again(*missing)
    where = f"data.kind = {config.data.kind!r}"
    if given.dataset is None:
        dataset = build_dataset(config.data, config.seed)
    else:
        made = (from_data_function(given.dataset, config.data, config.seed, where)
                if inspect.isroutine(given.dataset) else federated(given.dataset, config.data, config.seed, where))
        dataset = kept_training_clients(made, config.data, config.seed)
    if isinstance(given.model, nn.Module):
        model = copy.deepcopy(given.model)
        if config.model.personal:
            personal_keys(get_weights(model), config.model.personal, f"model {config.model_name!r}")
    else:
        model = build_initial_model(config, dataset, given.model)
    loss = None if isinstance(given.loss, str) else given.loss
    task = build_task(config.task, loss, given.metrics)
    check_model_fits(config, model, dataset, task)
    if config.engine.kind == "ray" or config.engine.workers != 0:
        _check_picklable(task)
    return RunInputs(dataset, model, task)


def _check_picklable(task: Task) -> None:
    """Refuses, in one line, a loss or metric that cannot reach the engine's workers (a lambda, a closure)."""
    try:
        pickle.dumps(task)
    except (pickle.PicklingError, AttributeError, TypeError) as error:
        detail = (str(error).strip().splitlines() or [""])[0]
        raise ValueError(f"the task's loss or metrics cannot be sent to the engine's worker processes ({detail}); "
                         "define them at a module's top level, or set engine.workers = 0") from None
