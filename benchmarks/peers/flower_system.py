"""Flower's simulation engine (Ray backend) running the benchmark workloads, for comparison with fedmeta.

One virtual SuperNode per client of the population; ``workers`` Ray actors, one CPU
each, run the ClientApp for whichever nodes a round addresses. The ServerApp runs a
FedAvg strategy (Flower's Message API) whose ``configure_*`` picks exactly the
benchmark's cohorts: client ``i`` of the sorted population is node ``i`` of the
sorted node ids, and each message names the client whose data that node holds (the
ServerApp cannot see Flower's node-to-partition mapping, so it says it). With
``--supernodes slot`` there are only as many nodes as cohort positions, which spares
the engine's polling of every node every 0.1 s on large populations (S<population>).

What is matched to fedmeta: the data (``load_population``), the model
(``build_workload_model``), the loss (``masked_cross_entropy``, mean over counted
targets per batch), plain SGD at the workload's lr and batch size for ``epochs``
epochs over a fresh shuffle each epoch, and FedAvg weighted by train examples
(Flower's ``num-examples``), i.e. server lr 1. Personalization (W3) is Flower's
federated evaluation: each addressed node evaluates, fine-tunes and evaluates again.

Each actor loads the population once and keeps it (and one model) in this module's
globals, the usual Flower pattern of a per-process data cache. A query message per
actor does that load before the first round, so it counts as start-up (W3 has no
warm-up round to absorb it).
"""

from __future__ import annotations

import os

# Flower and Ray would otherwise try to report usage over the network, which this
# benchmark has no business doing (and which can only time out here).
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import time  # noqa: E402
from collections.abc import Iterable  # noqa: E402
from importlib.metadata import version  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.common import (  # noqa: E402
    Result, Workload, build_workload_model, cohorts, emit, load_population, parse_args, samples_of, workload_by_name,
)
from fedmeta.algorithms.client_update import masked_cross_entropy  # noqa: E402
from fedmeta.data.federated import IGNORE_INDEX, ClientData, Examples  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.serverapp.strategy.strategy_utils import sample_nodes  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

SYSTEM = "flower"
EVAL_BATCH_SIZE = 512  # fedmeta.evaluation.metrics.evaluate's batch

# ---- client side (runs inside the Ray actors) ----

_population: dict[tuple[str, Path], tuple[dict[str, ClientData], int]] = {}
_models: dict[tuple[str, Path], nn.Module] = {}


def _population_and_model(config: ConfigRecord) -> tuple[Workload, dict[str, ClientData], nn.Module]:
    """The workload's clients and this actor's model, loaded once per actor."""
    torch.set_num_threads(1)
    workload = workload_by_name(str(config["workload"]))
    key = (workload.name, Path(str(config["data-dir"])))
    if key not in _population:
        _population[key] = load_population(workload, key[1])
    clients, num_classes = _population[key]
    if key not in _models:
        _models[key] = build_workload_model(workload, num_classes, next(iter(clients.values())).train)
    return workload, clients, _models[key]


def _client_and_model(config: ConfigRecord) -> tuple[Workload, ClientData, nn.Module]:
    """The addressed client's data and this actor's model."""
    workload, clients, model = _population_and_model(config)
    return workload, clients[str(config["client-id"])], model


def _train_epochs(model: nn.Module, data: Examples, workload: Workload, epochs: int, seed: int) -> Iterable[int]:
    """SGD over a fresh shuffle per epoch; yields after each epoch (for evaluation)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=workload.client_lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        for index in torch.randperm(len(data), generator=generator).split(workload.batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss, counted = masked_cross_entropy(model(data.x[index]), data.y[index])
            (loss / max(counted, 1)).backward()
            optimizer.step()
        yield epoch


@torch.no_grad()
def _accuracy(model: nn.Module, data: Examples) -> float:
    model.eval()
    correct, counted = 0, 0
    for start in range(0, len(data), EVAL_BATCH_SIZE):
        x, y = data.x[start:start + EVAL_BATCH_SIZE], data.y[start:start + EVAL_BATCH_SIZE]
        mask = y != IGNORE_INDEX
        correct += int(((model(x).argmax(-1) == y) & mask).sum())
        counted += int(mask.sum())
    return correct / max(counted, 1)


client_app = ClientApp()


@client_app.query()
def preload(msg: Message, context: Context) -> Message:
    """Loads the population into this actor before the first round, so that it counts as start-up."""
    _population_and_model(msg.content["config"])
    return Message(RecordDict({"metrics": MetricRecord({"loaded": 1})}), reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """FedAvg client: ``epochs`` epochs from the round's weights; replies weights and example count."""
    config = msg.content["config"]
    workload, client, model = _client_and_model(config)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    for _ in _train_epochs(model, client.train, workload, workload.epochs, int(config["seed"])):
        pass
    reply = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                        "metrics": MetricRecord({"num-examples": client.num_train})})
    return Message(reply, reply_to=msg)


@client_app.evaluate()
def personalize(msg: Message, context: Context) -> Message:
    """Personalization: accuracy on the test split before and after each fine-tuning epoch on train."""
    config = msg.content["config"]
    workload, client, model = _client_and_model(config)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    metrics = {"num-examples": client.num_train, "accuracy-initial": _accuracy(model, client.test)}
    for epoch in _train_epochs(model, client.train, workload, workload.epochs, int(config["seed"])):
        metrics[f"accuracy-epoch-{epoch + 1}"] = _accuracy(model, client.test)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


# ---- server side (runs in this process) ----


class CohortFedAvg(FedAvg):
    """Flower's FedAvg, addressing exactly the benchmark's cohort each round, and timing the rounds."""

    def __init__(self, schedule: list[list[str]], population: list[str], config: dict[str, str | int],
                 personalize: bool, node_per_client: bool, workers: int) -> None:
        super().__init__(fraction_train=0.0 if personalize else 1.0, fraction_evaluate=1.0 if personalize else 0.0)
        self.schedule = schedule
        # node_per_client: client i of the sorted population is node i; otherwise the
        # round's i-th cohort client is node i (nodes as execution slots)
        self.position = {cid: i for i, cid in enumerate(sorted(population))} if node_per_client else None
        self.num_nodes = len(population) if node_per_client else max(len(cohort) for cohort in schedule)
        self.node_ids: list[int] = []
        self.workers = workers
        self.config = config
        self.first_round_wall = 0.0
        self.round_starts: list[float] = []
        self.completed_rounds = 0
        self.last_end = 0.0

    def _cohort_messages(self, server_round: int, arrays: ArrayRecord, grid: Grid, message_type: str) -> list[Message]:
        if not self.node_ids:
            # Flower's own wait for every node to connect (start-up, before the first round)
            self.node_ids = sorted(sample_nodes(grid, self.num_nodes, 0)[1])
            # one query per actor while all are idle: each loads the data before round 1
            grid.send_and_receive([
                Message(RecordDict({self.configrecord_key: ConfigRecord(self.config)}), message_type=MessageType.QUERY,
                        dst_node_id=node) for node in self.node_ids[:self.workers]])
            self.first_round_wall = time.time()
        self.round_starts.append(time.perf_counter())
        messages = []
        for i, cid in enumerate(self.schedule[len(self.round_starts) - 1]):
            config = ConfigRecord({**self.config, "server-round": server_round, "client-id": cid,
                                   "seed": server_round * 100_003 + i})
            record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
            node = self.node_ids[i if self.position is None else self.position[cid]]
            messages.append(Message(content=record, message_type=message_type, dst_node_id=node))
        return messages

    def configure_train(self, server_round, arrays, config, grid):
        if self.fraction_train == 0.0:
            return []
        return self._cohort_messages(server_round, arrays, grid, MessageType.TRAIN)

    def configure_evaluate(self, server_round, arrays, config, grid):
        if self.fraction_evaluate == 0.0:
            return []
        return self._cohort_messages(server_round, arrays, grid, MessageType.EVALUATE)

    def _count(self, replies: list[Message]) -> None:
        """Counts a round only when every addressed client replied without error."""
        expected = len(self.schedule[len(self.round_starts) - 1])
        if len(replies) == expected and not any(reply.has_error() for reply in replies):
            self.completed_rounds += 1
        self.last_end = time.perf_counter()

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        result = super().aggregate_train(server_round, replies)
        self._count(replies)
        return result

    def aggregate_evaluate(self, server_round, replies):
        replies = list(replies)
        result = super().aggregate_evaluate(server_round, replies)
        self._count(replies)
        return result


def run(workload: Workload, data_dir: Path, workers: int, seed: int, node_per_client: bool) -> Result:
    """Runs the workload on Flower's Ray simulation engine with ``workers`` single-CPU actors."""
    torch.set_num_threads(1)
    clients, num_classes = load_population(workload, data_dir)
    schedule = cohorts(workload, list(clients), seed)
    model = build_workload_model(workload, num_classes, next(iter(clients.values())).train)
    personalize = workload.kind == "personalize"
    strategy = CohortFedAvg(schedule, list(clients), {"workload": workload.name, "data-dir": str(data_dir)},
                            personalize, node_per_client, workers)
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=len(schedule))

    run_simulation(
        server_app=server_app, client_app=client_app, num_supernodes=strategy.num_nodes,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                        "init_args": {"num_cpus": workers, "num_gpus": 0, "include_dashboard": False}},
    )
    if strategy.completed_rounds != len(schedule):
        raise SystemExit(f"flower completed {strategy.completed_rounds} of {len(schedule)} rounds without error")
    measured = schedule[workload.warmup_rounds:]
    return Result(
        system=SYSTEM, workload=workload.name,
        samples=sum(samples_of(workload, [clients[c] for c in cohort]) for cohort in measured),
        seconds=strategy.last_end - strategy.round_starts[workload.warmup_rounds], rounds=len(measured),
        first_round_wall=strategy.first_round_wall,
        note=f"flwr {version('flwr')} + ray {version('ray')}, {workers} actor(s) x 1 CPU, 1 torch thread; "
             f"{strategy.num_nodes} supernodes ({'one per client' if node_per_client else 'one per cohort slot'}), "
             "each message names its client; data cached per actor",
    )


def main() -> None:
    args = parse_args("Flower simulation (Ray) on a benchmark workload", extra=lambda parser: parser.add_argument(
        "--supernodes", choices=("client", "slot"), default="client",
        help="client: one SuperNode per client of the population (Flower's model); slot: one per cohort "
             "position, which spares the simulation engine's per-node polling (it scans every node every 0.1 s)"))
    emit(run(workload_by_name(args.workload), args.data_dir, args.workers, args.seed, args.supernodes == "client"))


if __name__ == "__main__":
    # Re-enter through the importable module: Ray pickles the ClientApp by reference
    # only when it lives in a real module, not in __main__ (which it would copy by
    # value into every message, without the actor's data cache).
    from benchmarks.peers import flower_system

    flower_system.main()
