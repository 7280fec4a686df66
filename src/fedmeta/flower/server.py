"""fedmeta's server side as a Flower strategy and ServerApp.

The strategy does no aggregation of its own. Its ``aggregate_train`` hands the replies
to fedmeta's ``run_round`` and its ``aggregate_evaluate`` to ``personalize``, through an
engine whose clients have already run (``Replies``): the aggregator, the server
optimizer, the two-stage switch, the fault rules and the metrics are fedmeta's own, and
a Flower run ends with the weights a local run of the same config ends with.

Before the first round the ServerApp asks every SuperNode which clients it holds
(``fedmeta.flower.client``), waits until every partition has joined, and then draws each
round's cohort with ``FederatedDataset.sample_cohort`` over the union: the cohorts of a
local run of the same config. The server never holds client data; the initial model
comes from the nodes, which all build it from the config.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp.strategy import Strategy

from fedmeta.algorithms.algorithm import ServerState, init_state, round_start, run_round
from fedmeta.client_work import ClientFailure, ClientUpdate, check_on_error
from fedmeta.data.federated import ClientData, Examples, FederatedDataset
from fedmeta.evaluation.personalization import ClientPersonalization, PersonalizationReport, personalize
from fedmeta.experiment.build import build_fine_tuning, build_schedule
from fedmeta.experiment.checkpoint import Checkpoint, save_checkpoint
from fedmeta.experiment.config import ExperimentConfig, config_to_toml, resolved
from fedmeta.experiment.privacy import PrivateTraining, private_schedule
from fedmeta.experiment.provenance import provenance, utc_now
from fedmeta.experiment.run import evaluated_clients, threshold_rounds
from fedmeta.experiment.run_dir import (
    add_provenance, append_evaluation, checkpoint_path, locked, new_run_dir, write_config, write_evaluation,
    write_metrics,
)
from fedmeta.flower.app import check_deployable, experiment_config
from fedmeta.flower.node import EXPERIMENT, ROUND_INPUT
from fedmeta.flower.secagg import SecureRound, fit_instructions, noised_mean, quantization_bound, secagg_workflow
from fedmeta.params import Params, client_seed, norm

JOIN_TIMEOUT = 300.0
"""Seconds the ServerApp waits for every partition's SuperNode to join."""
REPLY_TIMEOUT = 3600.0
"""Seconds a round waits for its clients' replies (Flower's default); late ones count as failed."""
REPLY_POLL = 0.1
"""Seconds between the server's polls for replies."""

logger = logging.getLogger("flwr")


class Federation(NamedTuple):
    """The clients as the server sees them: ids, where each is, no data."""

    roster: FederatedDataset
    node_of: dict[str, int]
    initial_weights: Params


def _roster(train_ids: Iterable[str], held_out_ids: Iterable[str], num_classes: int, name: str) -> FederatedDataset:
    """A FederatedDataset of ids without examples: what ``sample_cohort`` needs, and nothing the server lacks."""
    empty = Examples(torch.empty(0), torch.empty(0, dtype=torch.long))
    train, held_out = tuple(sorted(train_ids)), tuple(sorted(held_out_ids))
    return FederatedDataset({c: ClientData(c, empty, empty) for c in train + held_out}, train, held_out,
                            num_classes, name)


def _query_error(reply: Message) -> str | None:
    """Why a node could not describe itself: Flower's error, or the one fedmeta's ClientApp sent back."""
    if reply.has_error():
        return f"Flower error {reply.error.code}: {reply.error.reason}"
    return str(reply.content["config"]["error"]) if "error" in reply.content["config"] else None


def discover(grid: Grid, experiment: str, *, timeout: float = JOIN_TIMEOUT, poll: float = 1.0) -> Federation:
    """Asks each SuperNode which clients it holds, until partitions 0 to n-1 have all answered.

    Raises ValueError when a node reports an error (a bad ``partition-id``, missing data),
    two nodes claim the same partition, nodes disagree on the number of partitions or the
    initial model, or not every partition joined within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    described: dict[int, ConfigRecord] = {}
    weights: dict[int, Params] = {}
    while True:
        new = [n for n in grid.get_node_ids() if n not in described]
        queries = [Message(RecordDict({"config": ConfigRecord({EXPERIMENT: experiment})}), dst_node_id=n,
                           message_type=MessageType.QUERY) for n in new]
        for reply in grid.send_and_receive(queries, timeout=max(deadline - time.monotonic(), poll)) if new else ():
            node = reply.metadata.src_node_id
            if (error := _query_error(reply)) is not None:
                raise ValueError(f"SuperNode {node}: {error}")
            described[node] = reply.content["config"]
            weights[node] = dict(reply.content["arrays"].to_torch_state_dict())
        by_partition: dict[int, int] = {}
        for node, info in described.items():
            other = by_partition.setdefault(int(info["partition-id"]), node)
            if other != node:
                raise ValueError(f"SuperNodes {other} and {node} both hold partition-id {info['partition-id']}; "
                                 "give each SuperNode its own --node-config partition-id")
        counts = {int(info["num-partitions"]) for info in described.values()}
        if len(counts) > 1:
            raise ValueError(f"SuperNodes disagree on num-partitions: {sorted(counts)}")
        if counts and len(by_partition) == next(iter(counts)):
            break
        if time.monotonic() > deadline:
            expected = next(iter(counts)) if counts else None
            missing = sorted(set(range(expected)) - set(by_partition)) if expected else "all"
            raise ValueError(f"partitions {missing} of num-partitions = {expected} did not join within "
                             f"{timeout:g} s; start a SuperNode for each")
        time.sleep(poll)
    first = weights[by_partition[0]]
    for node, other in weights.items():
        if other.keys() != first.keys() or not all(torch.equal(other[k], first[k]) for k in first):
            raise ValueError(f"SuperNode {node} built another initial model than partition 0's; every node "
                             "must load the same data")
    infos = [described[by_partition[p]] for p in sorted(by_partition)]
    ids = [(list(info.get("train-ids", [])), list(info.get("held-out-ids", []))) for info in infos]  # [] may not travel
    node_of = {c: by_partition[int(info["partition-id"])] for info, (train, held_out) in zip(infos, ids)
               for c in (*train, *held_out)}
    roster = _roster((c for train, _ in ids for c in train), (c for _, held_out in ids for c in held_out),
                     int(infos[0]["num-classes"]), str(infos[0]["dataset"]))
    return Federation(roster, node_of, first)


class PromptGrid(Grid):
    """A deployment's grid whose ``send_and_receive`` polls for replies every ``poll`` seconds.

    Flower's grid for deployments sleeps 3 s whenever a poll finds a reply missing, so every
    exchange of a round (train, evaluate, each stage of SecAgg+) took at least 3 s however fast
    its clients were. Everything but that wait is the wrapped grid's.
    """

    def __init__(self, grid: Grid, poll: float = REPLY_POLL) -> None:
        self.grid, self.poll = grid, poll

    @property
    def run(self) -> Any:
        return self.grid.run

    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Flower's contract: the replies that arrived within ``timeout`` seconds (None: all of them)."""
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting:
            arrived = list(self.pull_messages(waiting))
            replies += arrived
            waiting -= {reply.metadata.reply_to_message_id for reply in arrived}
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.poll)
        return replies


class Replies:
    """An engine whose clients already ran on Flower: ``map`` returns their replies in client order.

    ``results`` maps a client id to (the seed its node used, its result) or to the reason
    it failed; a client without an entry never replied. A seed other than the one fedmeta
    derives for the client is a bug, not a faulty client, and raises.
    """

    def __init__(self, results: dict[str, tuple[int, Any] | str]) -> None:
        self.results = results

    def map(self, work: Any, weights: Params, clients: Sequence[ClientData], seeds: Sequence[int], *,
            on_error: str = "raise") -> list[Any]:
        check_on_error(on_error)
        out = []
        for client, seed in zip(clients, seeds, strict=True):
            result = self.results.get(client.client_id, "no reply from its SuperNode")
            if isinstance(result, str):
                error = RuntimeError(f"client {client.client_id!r}: {result}")
                if on_error == "raise":
                    raise error
                out.append(ClientFailure(client.client_id, error, ""))
                continue
            used_seed, value = result
            if used_seed != seed:
                raise RuntimeError(f"client {client.client_id!r} ran with seed {used_seed}, expected {seed}")
            out.append(value)
        return out

    def map_stateful(self, work: Any, weights: Params, clients: Sequence[ClientData], seeds: Sequence[int], *,
                     on_error: str = "raise") -> list[Any]:
        """``map``: the clients' states stayed on their SuperNodes, which kept the new ones."""
        return self.map(work, weights, clients, seeds, on_error=on_error)


def replies_by_client(replies: Iterable[Message], batches: dict[int, list[str]],
                      parse: Callable[[str, RecordDict], Any]) -> Replies:
    """Each client's result from its node's reply; a Flower error fails every client sent to that node."""
    results: dict[str, tuple[int, Any] | str] = {}
    for reply in replies:
        if reply.has_error():
            node = reply.metadata.src_node_id
            reason = f"SuperNode {node}: Flower error {reply.error.code}: {reply.error.reason}"
            results |= {c: reason for c in batches.get(node, ())}
            continue
        config = reply.content["config"]
        for client_id, seed, error in zip(config["client-ids"], config["seeds"], config["errors"], strict=True):
            results[client_id] = error or (int(seed), parse(client_id, reply.content))
    return Replies(results)


def _update(client_id: str, content: RecordDict) -> ClientUpdate:
    metrics = dict(content[f"metrics/{client_id}"])
    num_examples = int(metrics.pop("num-examples"))
    return ClientUpdate(dict(content[f"arrays/{client_id}"].to_torch_state_dict()), num_examples, metrics)


def _personalization(client_id: str, content: RecordDict) -> ClientPersonalization:
    metrics = content[f"metrics/{client_id}"]
    return ClientPersonalization(client_id, metrics["initial-loss"], {"accuracy": metrics["initial-accuracy"]},
                                 tuple(metrics["personalized-loss"]),
                                 tuple({"accuracy": a} for a in metrics["personalized-accuracy"]),
                                 int(metrics["num-train"]))


def _metric_record(metrics: dict[str, Any]) -> MetricRecord:
    """The numbers of a metrics row (Flower's MetricRecord holds no strings)."""
    def numeric(value: Any) -> bool:
        if isinstance(value, list):
            return bool(value) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    return MetricRecord({k: v for k, v in metrics.items() if numeric(v)})


class FedmetaStrategy(Strategy):
    """A Flower strategy whose server side is fedmeta's: cohorts, run_round, personalize.

    Flower's round ``r`` (from 1) is fedmeta's round ``r - 1``. Every cohort client gets
    a message; with simulated faults (``[faults]``), ``run_round`` then uses the replies of
    the clients its fault draws keep, as in a local run. After ``start`` returns,
    ``state`` is the final ServerState, ``history`` holds one metrics row per round (as
    ``metrics.jsonl``), ``report`` the last personalization evaluation and ``evaluations``
    each one's per-client numbers (as ``evaluations.jsonl``).
    """

    def __init__(self, config: ExperimentConfig, federation: Federation) -> None:
        check_deployable(config)
        self.config = config
        self.federation = federation
        self.schedule = build_schedule(config.algorithm, config.model.personal, len(federation.roster.train_ids))
        self.fine_tune = build_fine_tuning(config.evaluation)
        self.state = init_state(self.schedule, federation.initial_weights)
        self.history: list[dict[str, Any]] = []
        self.report: PersonalizationReport | None = None
        self.evaluations: list[dict[str, Any]] = []
        self.experiment = config_to_toml(config)
        self.batches: dict[int, list[str]] = {}  # the clients of this round's message to each node
        self.privacy: PrivateTraining | None = None

    def cohort(self, round_idx: int) -> list[ClientData]:
        return self.federation.roster.sample_cohort(self.config.algorithm.cohort_size, self.config.seed, round_idx)

    def evaluates(self, round_idx: int) -> bool:
        return round_idx == self.config.rounds - 1 or (round_idx + 1) % self.config.evaluation.every == 0

    def _messages(self, message_type: str, arrays: ArrayRecord, round_idx: int,
                  seeds: dict[str, int], extra: dict[str, ArrayRecord] | None = None) -> list[Message]:
        """One message per node, naming its clients among ``seeds`` in their order there, with ``extra`` records."""
        self.batches = {}
        for client_id in seeds:
            self.batches.setdefault(self.federation.node_of[client_id], []).append(client_id)
        return [
            Message(RecordDict({**(extra or {}), "arrays": arrays, "config": ConfigRecord({
                EXPERIMENT: self.experiment, "round": round_idx, "client-ids": clients,
                "seeds": [seeds[c] for c in clients]})}),
                dst_node_id=node, message_type=message_type, group_id=str(round_idx))
            for node, clients in self.batches.items()
        ]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        round_idx = server_round - 1
        seeds = {c.client_id: client_seed(self.config.seed, round_idx, c.client_id) for c in self.cohort(round_idx)}
        algo, state, _ = round_start(self.schedule, self.state, round_idx)
        update = algo.client_update
        extra = ({ROUND_INPUT: ArrayRecord(torch_state_dict=update.round_input(state.server))}
                 if hasattr(update, "round_input") else None)  # SCAFFOLD's server control variate
        return self._messages(MessageType.TRAIN, arrays, round_idx, seeds, extra)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        round_idx = server_round - 1
        replied = replies_by_client(replies, self.batches, _update)
        self.state, metrics = run_round(self.schedule, self.state, self.cohort(round_idx), engine=replied,
                                        seed=self.config.seed, round_idx=round_idx,
                                        faults=self.config.faults)
        # rounds done, as metrics.jsonl counts; the time is the evaluation's end where one follows
        self.history.append({"round": server_round, **metrics, "time/finished_at": utc_now()})
        return ArrayRecord(torch_state_dict=self.state.weights), _metric_record(metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        round_idx = server_round - 1
        if not self.evaluates(round_idx):
            return []
        clients = evaluated_clients(self.federation.roster, self.config.evaluation.max_clients)
        seeds = {c.client_id: client_seed(self.config.seed, round_idx, f"personalize/{c.client_id}") for c in clients}
        return self._messages(MessageType.EVALUATE, arrays, round_idx, seeds)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        round_idx = server_round - 1
        if not self.evaluates(round_idx):
            return None
        clients = evaluated_clients(self.federation.roster, self.config.evaluation.max_clients)
        replied = replies_by_client(replies, self.batches, _personalization)
        self.report = personalize(self.state.weights, clients, self.fine_tune, engine=replied,
                                  seed=self.config.seed, round_idx=round_idx)
        metrics = self.report.metrics()
        self.evaluations.append({"round": server_round, **self.report.to_json()})
        self.history[-1].update(metrics, **{"time/finished_at": utc_now()})
        return _metric_record(metrics)

    def summary(self) -> None:
        roster = self.federation.roster
        logger.info("fedmeta %s: %s, %d training and %d held-out clients on %d SuperNodes",
                    self.config.algorithm.name, roster.name, len(roster.train_ids), len(roster.held_out_ids),
                    len(set(self.federation.node_of.values())))


class SecureFedmetaStrategy(FedmetaStrategy):
    """``FedmetaStrategy`` whose rounds aggregate under Flower's SecAgg+ (``fedmeta.flower.secagg``).

    ``SecAggPlusWorkflow`` sends its own four stages of messages to every SuperNode, so the
    round trains in ``configure_train``, where the grid is, and leaves Flower's loop no train
    messages to send; ``aggregate_train`` returns what the workflow's round ended with. The
    server optimizer steps with the secure mean (with ``[privacy]``, with DP-FedAvg's noised
    mean of the clipped deltas, ``noised_mean``). Evaluation is ``FedmetaStrategy``'s.
    """

    def __init__(self, config: ExperimentConfig, federation: Federation) -> None:
        super().__init__(config, federation)
        self.schedule, self.privacy = private_schedule(config, self.schedule, len(federation.roster.train_ids),
                                                       federation.initial_weights)
        self.state = init_state(self.schedule, federation.initial_weights)
        self.workflow = secagg_workflow(config.flower, REPLY_TIMEOUT)
        self.round_result: tuple[ArrayRecord, MetricRecord] | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        round_idx, started = server_round - 1, time.perf_counter()
        seeds = {c.client_id: client_seed(self.config.seed, round_idx, c.client_id) for c in self.cohort(round_idx)}
        batches: dict[int, list[str]] = {node: [] for node in sorted(set(self.federation.node_of.values()))}
        for client_id in seeds:
            batches[self.federation.node_of[client_id]].append(client_id)

        def instructions(parameters: Any) -> dict[int, Any]:
            return {node: fit_instructions(self.state.weights, self.experiment, round_idx, ids,
                                           [seeds[c] for c in ids]) for node, ids in batches.items()}

        def aggregate(mean: list[Any], replies: list[Any], failures: list[Any]) -> None:
            if failures:
                raise RuntimeError(f"round {server_round}: {len(failures)} SuperNodes failed under SecAgg+: "
                                   + "; ".join(str(f) for f in failures))
            self.round_result = self._step(round_idx, mean, replies, started)

        context = LegacyContext(Context(grid.run.run_id, 0, {}, RecordDict(), {}),
                                config=ServerConfig(num_rounds=self.config.rounds),
                                strategy=SecureRound(grid, instructions, aggregate))
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
        context.state.array_records[MAIN_PARAMS_RECORD] = arrays
        self.round_result = None
        self.workflow(grid, context)
        return []

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.round_result is None:
            raise RuntimeError(f"round {server_round}: SecAgg+ halted before the sum (too few SuperNodes answered; "
                               "the ServerApp's log says at which stage)")
        return self.round_result

    def _step(self, round_idx: int, arrays: list[Any], replies: list[Any],
              started: float) -> tuple[ArrayRecord, MetricRecord]:
        """The server's step with the secure mean of the nodes' ``replies``; appends the round's metrics row."""
        algo, state, _ = round_start(self.schedule, self.state, round_idx)
        mean = {k: torch.from_numpy(a).to(w.dtype) for (k, w), a in zip(state.weights.items(), arrays, strict=True)}
        total_weight = sum(r.num_examples for r in replies)
        clients = sum(int(r.metrics["num-clients"]) for r in replies)
        examples = sum(int(r.metrics["num-examples"]) for r in replies)
        if total_weight == 0:
            raise RuntimeError(f"round {round_idx + 1}: no cohort client's update reached the secure sum")
        error_bound = quantization_bound(self.config.flower, len(replies), total_weight)
        if self.privacy is not None:
            cohort_size = self.config.algorithm.cohort_size
            delta, aggregator_state = noised_mean(mean, clients, state.aggregator,
                                                  self.privacy.accounting.noise_multiplier, cohort_size,
                                                  self.config.seed)
            error_bound *= clients / cohort_size
        else:
            delta, aggregator_state = algo.aggregator.apply([ClientUpdate(mean, total_weight, {})], state.aggregator)
        weights, server_state = algo.server_optimizer.apply(state.weights, delta, state.server)
        self.state = ServerState(weights, aggregator_state, server_state, state.stage)
        seconds = time.perf_counter() - started
        metrics: dict[str, Any] = {
            "stage": state.stage,
            "client/train_loss": sum(float(r.metrics["train-loss-sum"]) for r in replies) / examples,
            "client/num_clients": clients,
            "client/num_examples": examples,
            "server/delta_norm": norm(delta),
            "secagg/num_nodes": len(replies),
            "secagg/error_bound": error_bound,
            "time/round_seconds": seconds,
            "time/samples_per_second": sum(int(r.metrics["num-samples"]) for r in replies) / seconds,
        }
        if self.privacy is not None:
            metrics |= self.privacy.metrics(round_idx + 1, aggregator_state)
        self.history.append({"round": round_idx + 1, **metrics, "time/finished_at": utc_now()})
        return ArrayRecord(torch_state_dict=self.state.weights), _metric_record(metrics)


def write_run(run_dir: Path, strategy: FedmetaStrategy) -> None:
    """Writes the run directory ``fedmeta run`` writes: metrics, evaluation and a final checkpoint."""
    config = strategy.config
    size = write_metrics(run_dir, strategy.history)
    privacy = strategy.privacy
    for evaluation in strategy.evaluations:
        append_evaluation(run_dir, evaluation)
    write_evaluation(run_dir, {**strategy.evaluations[-1],
                               "rounds_to_threshold": threshold_rounds(strategy.history, config.evaluation.thresholds),
                               **({"privacy": privacy.summary(config.rounds, strategy.state.aggregator)}
                                  if privacy else {})})
    save_checkpoint(checkpoint_path(run_dir),
                    Checkpoint(config, strategy.state, config.rounds, size, torch.get_rng_state()))


def run_server(grid: Grid, config: ExperimentConfig) -> tuple[Path, FedmetaStrategy]:
    """Runs the experiment over the SuperNodes on ``grid``; returns its run directory and strategy."""
    config = resolved(config)
    check_deployable(config)
    experiment = config_to_toml(config)
    grid = PromptGrid(grid)
    federation = discover(grid, experiment)
    strategy = (SecureFedmetaStrategy if config.flower.secagg else FedmetaStrategy)(config, federation)
    run_dir = new_run_dir(config.output_dir, config.name)
    with locked(run_dir):
        write_config(run_dir, experiment)
        add_provenance(run_dir, provenance(), resumed=False)
        logger.info("fedmeta: run directory %s", run_dir)
        strategy.start(grid, ArrayRecord(torch_state_dict=strategy.state.weights), num_rounds=config.rounds,
                       timeout=REPLY_TIMEOUT)
        write_run(run_dir, strategy)
    initial, final = strategy.report.initial, strategy.report.personalized[-1]
    logger.info("fedmeta: run directory %s", run_dir)
    logger.info("fedmeta: initial accuracy %.4f ± %.4f, personalized accuracy %.4f ± %.4f over %d held-out clients",
                initial.mean, initial.std, final.mean, final.std, len(strategy.report.clients))
    return run_dir, strategy


def make_server_app(config: ExperimentConfig | None = None) -> ServerApp:
    """A ServerApp running ``config``, or the experiment in the run config when None."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, config if config is not None else experiment_config(context.run_config))

    return app


server_app = make_server_app()
