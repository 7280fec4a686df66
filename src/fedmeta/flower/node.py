"""What a SuperNode does for fedmeta's ClientApps (``fedmeta.flower.client``): client update and personalization.

A SuperNode holds one partition of a fedmeta dataset: partition ``p`` of ``n`` (Flower's
node config ``partition-id`` and ``num-partitions``) holds every ``n``-th client of the
sorted client ids, starting at the ``p``-th, training and held-out clients alike; with
as many partitions as clients, each SuperNode is one client. The node builds the dataset
from the experiment config the server sends (``data-path`` in the node config points at
its own copy of the files) and keeps only its partition.

A round sends each SuperNode one message naming its cohort clients and the seed of each
one's work (one ClientApp process per message, so not one per client); the node runs them
one after another and replies with each one's result, or the error it raised, which the
server counts as a failed client. The seeds come back too, so the server can check them
against the ones fedmeta derives.

A method with client state (Ditto, FedRep, FedPer, SCAFFOLD) keeps each client's state on
the node that holds the client, in Flower's ``Context.state``, which the SuperNode keeps
between the messages of a run; a state never leaves its node. SCAFFOLD's clients get the
server's control variate of the round in the message (``ROUND_INPUT``).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.compat.common import recorddict_compat as compat

from fedmeta.algorithms.algorithm import Schedule, StatefulTrainingWork, TrainingWork, is_stateful
from fedmeta.algorithms.client_update import ClientUpdate
from fedmeta.data.federated import ClientData, FederatedDataset
from fedmeta.engine import ClientFailure, InProcessEngine
from fedmeta.evaluation.personalization import ClientPersonalization, Personalization, PersonalizationWork
from fedmeta.experiment.build import (
    build_dataset, build_execution, build_initial_model, build_personalization, build_schedule,
)
from fedmeta.experiment.config import ExperimentConfig, config_from_dict
from fedmeta.flower.secagg import check_in_range, fit_result, node_metrics, node_share, read_instructions
from fedmeta.params import Params, get_weights

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

EXPERIMENT = "experiment"
"""The key of the experiment config (TOML text) in every message the server sends."""
ROUND_INPUT = "round-input"
"""The key of the server's tensors a client update needs in its round (``round_input``), when it has one."""
STATE = "fedmeta-state/"
"""The prefix of each client's state in the node's ``Context.state``."""


def partition(client_ids: list[str], partition_id: int, num_partitions: int) -> list[str]:
    """The clients of partition ``partition_id``: every ``num_partitions``-th sorted id from it on."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"node config partition-id = {partition_id}: expected 0 to num-partitions - 1 "
                         f"= {num_partitions - 1}")
    if num_partitions > len(client_ids):
        raise ValueError(f"node config num-partitions = {num_partitions}: the dataset has only "
                         f"{len(client_ids)} clients, so some partitions would be empty")
    return sorted(client_ids)[partition_id::num_partitions]


def _node_int(node_config: Mapping[str, Any], key: str) -> int:
    if key not in node_config:
        raise ValueError(f"node config has no {key}; start the SuperNode with "
                         "--node-config 'partition-id=0 num-partitions=2' (one partition id per node)")
    value = node_config[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"node config {key} = {value!r}: expected an integer")
    return value


@dataclass(frozen=True)
class Node:
    """What one SuperNode holds: its partition's clients, a reusable engine, the algorithm's parts."""

    partition_id: int
    num_partitions: int
    dataset: FederatedDataset
    clients: dict[str, ClientData]
    engine: InProcessEngine
    schedule: Schedule
    fine_tune: Personalization
    initial_weights: Params


@functools.lru_cache(maxsize=2)
def load_node(experiment: str, partition_id: int, num_partitions: int, data_path: str | None) -> Node:
    """Builds the node's partition once per process (Flower may reuse a ClientApp process)."""
    config: ExperimentConfig = config_from_dict(tomllib.loads(experiment))
    if data_path is not None:
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, path=data_path))
    dataset = build_dataset(config.data, config.seed)
    mine = partition(list(dataset.clients), partition_id, num_partitions)
    model = build_initial_model(config, dataset)
    initial_weights = get_weights(model)  # before the engine converts the layout, as the local run's
    return Node(partition_id, num_partitions, dataset, {c: dataset.clients[c] for c in mine},
                InProcessEngine(model, build_execution(config.engine)),
                build_schedule(config.algorithm, config.model.personal, len(dataset.train_ids)),
                build_personalization(config), initial_weights)


def node_of(message: Message, context: Context) -> Node:
    """The node's partition for the experiment the message names."""
    return node_for(str(message.content["config"][EXPERIMENT]), context)


def node_for(experiment: str, context: Context) -> Node:
    """The node's partition for ``experiment`` (TOML text), as its node config says."""
    node_config = context.node_config
    data_path = node_config.get("data-path")
    return load_node(experiment, _node_int(node_config, "partition-id"), _node_int(node_config, "num-partitions"),
                     None if data_path is None else str(data_path))


def describe(message: Message, context: Context) -> Message:
    """Tells the server which clients this node holds, and the experiment's initial model."""
    try:
        node = node_of(message, context)
    except Exception as error:  # noqa: BLE001 - sent back to the server, which stops the run with it
        return Message(RecordDict({"config": ConfigRecord({"error": f"{type(error).__name__}: {error}"})}),
                       reply_to=message)
    dataset = node.dataset
    info = ConfigRecord({
        "partition-id": node.partition_id,
        "num-partitions": node.num_partitions,
        "train-ids": [c for c in dataset.train_ids if c in node.clients],
        "held-out-ids": [c for c in dataset.held_out_ids if c in node.clients],
        "num-classes": dataset.num_classes,
        "dataset": dataset.name,
    })
    return Message(RecordDict({"config": info, "arrays": ArrayRecord(torch_state_dict=node.initial_weights)}),
                   reply_to=message)


def _run_clients(message: Message, context: Context, work_of: Callable[[Node, int], Any],
                 records_of: Callable[[str, Any], dict[str, Any]]) -> Message:
    """Runs the round's work for each client the message names, in order, on this node's engine.

    The reply's ``config`` lists the clients, the seeds they ran with and, per client, the
    error it raised ("" for none); each client's records are keyed by its id. Stateful
    work starts each client from its state in ``context.state`` and stores the new one there.
    """
    request = message.content["config"]
    client_ids, seeds = [str(c) for c in request["client-ids"]], [int(s) for s in request["seeds"]]
    errors, records = [""] * len(client_ids), {}
    try:
        node = node_of(message, context)
        weights = dict(message.content["arrays"].to_torch_state_dict())
        work = work_of(node, int(request["round"]))
        for i, client_id in enumerate(client_ids):
            if client_id not in node.clients:
                errors[i] = (f"ValueError: client {client_id!r} is not in partition {node.partition_id} of "
                             f"{node.num_partitions}, which this SuperNode holds")
        mine = [i for i, error in enumerate(errors) if not error]
        clients = [node.clients[client_ids[i]] for i in mine]
        if isinstance(work, StatefulTrainingWork):
            results = _map_stateful(node.engine, context, work, weights, clients, [seeds[i] for i in mine])
        else:
            results = node.engine.map(work, weights, clients, [seeds[i] for i in mine], on_error="collect")
        for i, result in zip(mine, results):
            if isinstance(result, ClientFailure):
                errors[i] = f"{type(result.error).__name__}: {result.error}"
            else:
                records |= records_of(client_ids[i], result)
    except Exception as error:  # noqa: BLE001 - the server counts these clients as failed, with this reason
        errors, records = [f"{type(error).__name__}: {error}"] * len(client_ids), {}
    records["config"] = ConfigRecord({"client-ids": client_ids, "seeds": seeds, "errors": errors})
    return Message(RecordDict(records), reply_to=message)


def _map_stateful(engine: InProcessEngine, context: Context, work: StatefulTrainingWork, weights: Params,
                  clients: list[ClientData], seeds: list[int]) -> list[Any]:
    """``map_stateful`` from the clients' states kept in ``context.state``; the new states are kept there."""
    stored = {c.client_id: f"{STATE}{c.client_id}" for c in clients}
    engine.restore_client_states({client_id: dict(context.state[key].to_torch_state_dict())
                                  for client_id, key in stored.items() if key in context.state})
    results = engine.map_stateful(work, weights, clients, seeds, on_error="collect")
    for client_id, state in engine.client_states().items():
        context.state[stored[client_id]] = ArrayRecord(torch_state_dict=state)
    return results


def training_work(node: Node, message: Message, round_idx: int) -> Any:
    """The engine's work for the round's client update, with the server's round input where it takes one."""
    update = node.schedule.at(round_idx)[1].client_update
    if hasattr(update, "round_input"):
        update = update.for_round(dict(message.content[ROUND_INPUT].to_torch_state_dict()))
    return StatefulTrainingWork(update) if is_stateful(update) else TrainingWork(update)


def train(message: Message, context: Context) -> Message:
    """Each named client's update for the round's stage, from the server weights: its delta and metrics."""

    def update_records(client_id: str, update: ClientUpdate) -> dict[str, Any]:
        return {f"arrays/{client_id}": ArrayRecord(torch_state_dict=update.delta),
                f"metrics/{client_id}": MetricRecord({**update.metrics, "num-examples": update.num_examples})}

    return _run_clients(message, context, lambda node, round_idx: training_work(node, message, round_idx),
                        update_records)


def personalize(message: Message, context: Context) -> Message:
    """Each named client's initial accuracy, then after each fine-tuning epoch on its train split."""

    def personalization_records(client_id: str, result: ClientPersonalization) -> dict[str, Any]:
        return {f"metrics/{client_id}": MetricRecord({
            "initial-loss": result.initial_loss,
            "initial-accuracy": result.initial_accuracy,
            "personalized-loss": list(result.personalized_loss),
            "personalized-accuracy": list(result.personalized_accuracy),
            "num-train": result.num_train,
        })}

    return _run_clients(message, context, lambda node, round_idx: PersonalizationWork(node.fine_tune),
                        personalization_records)


def train_securely(message: Message, context: Context) -> Message:
    """The node's part of the round's secure sum: its cohort clients' mean delta and weight (``node_share``).

    Reads and answers in Flower's legacy FitIns/FitRes form, which ``secaggplus_mod`` reads;
    the mod masks the vector before it leaves the node. A client that fails fails the node,
    which SecAgg+ then counts as dropped.
    """
    fitins = compat.recorddict_to_fitins(message.content, keep_input=True)
    experiment = str(fitins.config["experiment"])
    node = node_for(experiment, context)
    weights, _, round_idx, client_ids, seeds = read_instructions(fitins, node.initial_weights)
    strangers = [c for c in client_ids if c not in node.clients]
    if strangers:
        raise ValueError(f"clients {strangers} are not in partition {node.partition_id} of {node.num_partitions}, "
                         "which this SuperNode holds")
    clients = [node.clients[c] for c in client_ids]
    work = training_work(node, message, round_idx)
    if isinstance(work, StatefulTrainingWork):
        updates = _map_stateful(node.engine, context, work, weights, clients, seeds)
    else:
        updates = node.engine.map(work, weights, clients, seeds) if clients else []
    config = config_from_dict(tomllib.loads(experiment))
    share, weight = node_share(updates, weights, config.privacy.clip if config.privacy.enabled else None)
    check_in_range(share, weight, config.flower)
    return Message(compat.fitres_to_recorddict(fit_result(share, weight, node_metrics(updates)), keep_input=True),
                   reply_to=message)
