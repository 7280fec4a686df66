"""Turns a config into the library objects it names: dataset, model, task, schedule, personalization, engine."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
from torch import nn

from fedmeta.algorithms import presets
from fedmeta.algorithms.algorithm import Schedule
from fedmeta.algorithms.client_update import LocalTraining, Loss, local_sgd, masked_cross_entropy
from fedmeta.algorithms.ditto import personal_fine_tuning
from fedmeta.algorithms.fedrep import HeadFineTuning, personal_keys
from fedmeta.algorithms.per_fedavg import AdaptationSteps
from fedmeta.algorithms.server_optimizers import build_server_optimizer
from fedmeta.data.download import dataset_paths, default_cache_dir
from fedmeta.data.federated import ClientData, FederatedDataset
from fedmeta.data.leaf_json import load_leaf_json
from fedmeta.data.partition import dirichlet_partition, split_client_examples
from fedmeta.data.synthetic import synthetic
from fedmeta.data.tff_h5 import EMNIST_CLASSES, load_emnist_h5, load_shakespeare_h5
from fedmeta.engine import Execution, InProcessEngine, ProcessEngine
from fedmeta.engine.execution import resolve_bfloat16, resolve_device
from fedmeta.evaluation.personalization import Personalization
from fedmeta.evaluation.tasks import LOSSES, METRICS, MeanLoss, Metric, Task
from fedmeta.experiment.config import (
    AlgorithmConfig, DataConfig, EngineConfig, EvaluationConfig, ExperimentConfig, TaskConfig,
)
from fedmeta.import_path import call_with_named, is_import_path, is_passed_from_python, load
from fedmeta.models.registry import build_model, from_factory
from fedmeta.params import client_seed, get_weights

if TYPE_CHECKING:
    from fedmeta.engine.ray_engine import RayEngine

H5_LOADERS = {"emnist": load_emnist_h5, "shakespeare": load_shakespeare_h5}


def passed_again(*parts: tuple[str, str, str]) -> ValueError:
    """The error for config values that mark parts passed from Python, each (key, value, argument): what to pass."""
    settings = ", ".join(f"{key} = {value!r}" for key, value, _ in parts)
    arguments = [argument for _, _, argument in parts]
    named = " and ".join(arguments)
    given = ", ".join(f"{argument}=..." for argument in arguments)
    were, them = ("was", "it") if len(parts) == 1 else ("were", "them")
    return ValueError(f"{settings}: this run's {named} {were} passed from Python, which config.toml cannot hold; "
                      f"pass {them} again: fedmeta.Experiment.resume(RUN_DIR, {given}) or "
                      f"fedmeta.Experiment.evaluate(RUN_DIR, {given})")


def federated(data: Any, config: DataConfig, seed: int, where: str) -> FederatedDataset:
    """A dataset of one's own as a ``FederatedDataset`` (which is taken as it is, with its own client split).

    A mapping of client ids to ``(x, y)`` keeps its clients; a dataset of ``(x, y)`` pairs
    with integer labels is split over ``data.num_clients`` clients by Dirichlet(``data.alpha``).
    """
    if isinstance(data, FederatedDataset):
        return data
    if isinstance(data, Mapping):
        return split_client_examples(data, held_out_fraction=config.held_out_fraction, seed=seed)
    if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        raise ValueError(f"{where}: got a {type(data).__name__}; expected a FederatedDataset, a mapping of client ids "
                         "to (x, y), or a dataset of (x, y) pairs")
    return dirichlet_partition(data, config.num_clients, alpha=config.alpha, held_out_fraction=config.held_out_fraction,
                               seed=seed)


def from_data_function(function: Callable[..., Any], config: DataConfig, seed: int, where: str) -> FederatedDataset:
    """Calls a function of one's own that makes the dataset (``data.kind`` by import path), then ``federated``."""
    try:
        made = call_with_named(function, seed=seed, path=config.path, num_clients=config.num_clients,
                               held_out_fraction=config.held_out_fraction)
    except TypeError as error:  # it needs arguments it is not given
        raise ValueError(f"{where}: {error}; a dataset function is called with those of seed, path, num_clients "
                         "and held_out_fraction it names") from None
    return federated(made, config, seed, where)


def build_dataset(config: DataConfig, seed: int) -> FederatedDataset:
    """Loads or generates the configured federated dataset with its client split."""
    return kept_training_clients(_load_dataset(config, seed), config, seed)


def kept_training_clients(dataset: FederatedDataset, config: DataConfig, seed: int) -> FederatedDataset:
    """``dataset`` with ``data.max_train_clients`` of its training clients (all of them when unset)."""
    if config.max_train_clients is None:
        return dataset
    try:
        return dataset.with_training_clients(config.max_train_clients, seed)
    except ValueError as error:
        raise ValueError(f"data.max_train_clients = {config.max_train_clients}: {error}") from None


def _load_dataset(config: DataConfig, seed: int) -> FederatedDataset:
    if is_passed_from_python(config.kind):
        raise passed_again(("data.kind", config.kind, "dataset"))
    if is_import_path(config.kind):
        return from_data_function(load(config.kind, "data.kind"), config, seed, f"data.kind = {config.kind!r}")
    split = {"held_out_fraction": config.held_out_fraction, "seed": seed}
    if config.kind == "synthetic":
        return synthetic(config.num_clients, alpha=config.alpha, beta=config.beta, **split)
    if config.kind == "leaf_json":
        if config.path is None:
            raise ValueError("data.path: leaf_json needs the directory holding the LEAF FEMNIST json shards")
        return load_leaf_json(Path(config.path), max_clients=config.max_clients, num_classes=EMNIST_CLASSES, **split)
    data_dir = Path(config.path) if config.path is not None else default_cache_dir() / config.kind
    train, test = dataset_paths(config.kind, data_dir)
    return H5_LOADERS[config.kind](train, test, max_clients=config.max_clients, **split)


def input_dim(dataset: FederatedDataset) -> int:
    """Width of one flat input vector (what a linear model needs)."""
    first = next(iter(dataset.clients.values()))
    return int(first.train.x[0].numel())


def build_initial_model(config: ExperimentConfig, dataset: FederatedDataset,
                        factory: Callable[..., nn.Module] | None = None) -> nn.Module:
    """The model, initialised from the run's seed alone; ``model.personal`` names the modules it lacks are refused.

    ``factory`` (passed from Python) builds it in place of ``model.name``, in the same way.
    """
    if factory is None and is_passed_from_python(config.model_name):
        raise passed_again(("model.name", config.model_name, "model"))
    torch.manual_seed(client_seed(config.seed, -1, "model init"))
    shape = {"num_classes": dataset.num_classes, "input_dim": input_dim(dataset)}
    model = (build_model(config.model_name, **shape) if factory is None
             else from_factory(factory, **shape, where=f"model.name = {config.model_name!r}"))
    if config.model.personal:
        personal_keys(get_weights(model), config.model.personal, f"model {config.model_name!r}")
    return model


def _metric(name: str, key: str) -> Metric:
    if is_passed_from_python(name):
        raise passed_again((key, name, "metrics"))
    if name in METRICS:
        return METRICS[name]
    metric = load(name, key)
    if not isinstance(metric, Metric):
        raise ValueError(f"{key} = {name!r}: a {type(metric).__name__}, not a fedmeta Metric (name, function, "
                         "higher_is_better)")
    return metric


def build_task(config: TaskConfig, loss: Callable[..., Any] | None = None,
               metrics: Sequence[str | Metric] | None = None) -> Task:
    """The loss and metrics ``[task]`` names; ``loss`` (a function returning the batch mean) and ``metrics``
    (names or ``Metric``s), passed from Python, take the place of its own."""
    if loss is None:
        if is_passed_from_python(config.loss):
            raise passed_again(("task.loss", config.loss, "loss"))
        loss = config.loss if config.loss in LOSSES else load(config.loss, "task.loss")
    chosen = LOSSES[loss] if isinstance(loss, str) else MeanLoss(loss)
    names = config.metric_names if metrics is None else metrics
    return Task(chosen, tuple(m if isinstance(m, Metric) else _metric(m, f"task.metrics[{i}]")
                              for i, m in enumerate(names)))


def build_schedule(config: AlgorithmConfig, personal: tuple[str, ...] = (), num_clients: int | None = None,
                   loss: Loss = masked_cross_entropy) -> Schedule:
    """The named algorithm (or two-stage schedule) with the configured hyperparameters, training on ``loss``.

    ``personal`` is ``model.personal``, the modules FedRep and FedPer keep on the client;
    ``num_clients`` is the number of training clients, SCAFFOLD's N (a run cannot train
    SCAFFOLD without it; its shape, for checks, needs none).
    """
    client = {"client_lr": config.client_lr, "client_batch_size": config.client_batch_size, "loss": loss}
    if config.name == "two_stage":
        return presets.two_stage(
            config.switch_round, local_epochs=config.local_epochs, local_steps=config.local_steps,
            server_lr=config.server_lr, server_momentum=config.server_momentum,
            reptile_server_lr=config.reptile_server_lr, **client,
        )
    if config.name == "centralized":
        return presets.centralized(config.local_steps, **client)
    server = build_server_optimizer(config.server_optimizer, config.server_lr, config.server_momentum)
    if config.name == "fedsgd":
        return presets.fedsgd(config.client_lr, server, loss)
    if config.name == "reptile":
        return presets.reptile(config.local_steps, server_optimizer=server,
                               client_optimizer=config.client_optimizer, **client)
    if config.name == "fedprox":
        return presets.fedprox(config.mu, config.local_epochs, server_optimizer=server,
                               client_optimizer=config.client_optimizer, **client)
    if config.name in ("fomaml", "maml"):
        return presets.maml(config.inner_steps, config.inner_lr, config.client_batch_size, server,
                            second_order=config.name == "maml", loss=loss)
    if config.name == "perfedavg":
        return presets.perfedavg(config.local_steps, inner_lr=config.inner_lr, variant=config.variant,
                                 server_optimizer=server, **client)
    if config.name == "local_only":
        return presets.local_only(loss)
    if config.name == "ditto":
        return presets.ditto(config.lam, config.local_epochs, server_optimizer=server,
                             client_optimizer=config.client_optimizer, **client)
    if config.name == "fedrep":
        return presets.fedrep(personal, config.head_epochs, config.local_epochs, server_optimizer=server,
                              client_optimizer=config.client_optimizer, **client)
    if config.name == "pfedme":
        return presets.pfedme(config.lam, config.local_steps, config.inner_steps, config.client_lr, config.inner_lr,
                              config.client_batch_size, server, loss)
    if config.name == "scaffold":
        return presets.scaffold(num_clients, config.local_epochs, server_optimizer=server, **client)
    if config.name == "fedper":
        return presets.fedper(personal, config.local_epochs, server_optimizer=server,
                              client_optimizer=config.client_optimizer, **client)
    return presets.fedavg(config.local_epochs, server_optimizer=server,
                          client_optimizer=config.client_optimizer, **client)


def build_fine_tuning(config: EvaluationConfig, loss: Loss = masked_cross_entropy) -> LocalTraining:
    """The client optimizer that personalizes a held-out client on ``loss``, epoch by epoch."""
    return local_sgd(config.fine_tune_lr, config.fine_tune_batch_size, epochs=config.fine_tune_epochs,
                     optimizer=config.fine_tune_optimizer, loss=loss)


def build_personalization(config: ExperimentConfig, loss: Loss = masked_cross_entropy) -> Personalization:
    """The algorithm's own personalization rule for a held-out client, training on ``loss``.

    MAML and FOMAML adapt as they trained, ``inner_steps`` SGD steps of ``inner_lr``;
    Per-FedAvg takes ``personalization_steps`` such steps (Fallah et al. 2020, Sec. 5);
    Ditto and pFedMe train the personal model from the global weights, pulled toward them by ``lam``;
    FedRep and FedPer fine-tune the personal modules alone; every other method fine-tunes
    everything; the last three as ``[evaluation]`` says.
    """
    algorithm, evaluation = config.algorithm, config.evaluation
    if algorithm.name in ("fomaml", "maml", "perfedavg"):
        steps = algorithm.personalization_steps if algorithm.name == "perfedavg" else algorithm.inner_steps
        return AdaptationSteps(algorithm.inner_lr, steps, algorithm.client_batch_size, loss)
    if algorithm.name in ("ditto", "pfedme"):
        return personal_fine_tuning(algorithm.lam, evaluation.fine_tune_lr, evaluation.fine_tune_batch_size,
                                    evaluation.fine_tune_epochs, evaluation.fine_tune_optimizer, loss)
    if config.model.personal:
        return HeadFineTuning(evaluation.fine_tune_lr, evaluation.fine_tune_batch_size,
                              epochs=evaluation.fine_tune_epochs, optimizer=evaluation.fine_tune_optimizer,
                              loss=loss, personal=config.model.personal)
    return build_fine_tuning(evaluation, loss)


def describe_personalization(config: ExperimentConfig) -> tuple[str, str]:
    """(what one stage of the personalization rule is, the rule in words), for reports."""
    rule = build_personalization(config)
    if isinstance(rule, AdaptationSteps):
        return "step", f"{rule.steps} step(s) of sgd lr {rule.lr:g}, batch {rule.batch_size}"
    evaluation = config.evaluation
    which = (f" of {', '.join(config.model.personal)} alone" if config.model.personal
             else f", pulled toward the global weights by lam {config.algorithm.lam:g}"
             if config.algorithm.name in ("ditto", "pfedme") else "")
    return "epoch", (f"{evaluation.fine_tune_epochs} epoch(s) of {evaluation.fine_tune_optimizer} "
                     f"lr {evaluation.fine_tune_lr:g}, batch {evaluation.fine_tune_batch_size}{which}")


def build_execution(config: EngineConfig) -> Execution:
    """How client work runs (layout, precision, device), the device and ``"auto"`` precision resolved on this
    machine."""
    device = resolve_device(config.device)
    return Execution(channels_last=config.channels_last, bfloat16=resolve_bfloat16(config.bfloat16, device),
                     device=device)


def build_engine(config: EngineConfig, model: nn.Module,
                 clients: Mapping[str, ClientData]) -> InProcessEngine | ProcessEngine | RayEngine:
    """The configured engine; its workers start now and hold ``clients`` from then on.

    ``kind = "ray"`` gives a ``RayEngine`` (Ray is imported only then).
    """
    execution = build_execution(config)
    if config.kind == "ray":
        from fedmeta.engine.ray_engine import RayEngine

        return RayEngine(model, clients, workers=config.workers, address=config.address, execution=execution,
                         announce=True)
    if config.workers == 0 or config.batched:
        return InProcessEngine(model, execution, batched=config.batched)
    workers = torch.cuda.device_count() if execution.device == "cuda" and config.workers is None else config.workers
    return ProcessEngine(model, clients, workers=workers, execution=execution)
