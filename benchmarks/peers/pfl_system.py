"""Apple's pfl-research running the benchmark workloads, for comparison with fedmeta.

Run under ``torchrun`` with one process per worker (``launch.py`` builds the command):
pfl splits each cohort's users across the processes, every process trains its share
with its own model copy, and the weighted updates are all-reduced (gloo) before the
central step. With one worker it runs as a plain process, pfl's single-process mode.

What is matched to fedmeta: the data (``load_population``), the model
(``build_workload_model``), the loss (``masked_cross_entropy``, mean over counted
targets per batch), plain SGD at the workload's lr and batch size for ``epochs``
epochs, FedAvg weighted by train examples (``WeightByDatapoints``) with a central SGD
step of lr 1, and the exact cohorts of ``benchmarks.common.cohorts`` (fed to pfl's
``FederatedDataset`` as its user sampler). What is pfl's own: a user's data is
iterated in stored order (pfl does not reshuffle per epoch), and users are balanced
over workers by train size (``user_id_to_weight``, pfl's option for faster
distributed simulation).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import (
    Result, Workload, build_workload_model, cohorts, emit, load_population, parse_args, samples_of, workload_by_name,
)
from fedmeta.algorithms.client_update import masked_cross_entropy
from fedmeta.data.federated import IGNORE_INDEX, ClientData

# pfl picks its framework (and sets up torch.distributed under torchrun) when the
# PyTorch model module is imported, so it comes before the rest of pfl.
from pfl.model.pytorch import PyTorchModel  # noqa: E402  isort: skip
from pfl.aggregate.simulate import SimulatedBackend  # noqa: E402
from pfl.aggregate.weighting import WeightByDatapoints  # noqa: E402
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams  # noqa: E402
from pfl.algorithm.base import FederatedNNAlgorithm  # noqa: E402
from pfl.callback.base import TrainingProcessCallback  # noqa: E402
from pfl.data.dataset import Dataset  # noqa: E402
from pfl.data.federated_dataset import FederatedDataset  # noqa: E402
from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams  # noqa: E402
from pfl.internal.bridge import FrameworkBridgeFactory as bridges  # noqa: E402
from pfl.internal.ops.selector import get_default_framework_module as get_ops  # noqa: E402
from pfl.metrics import Metrics, StringMetricName, Weighted  # noqa: E402
from pfl.version import __version__ as PFL_VERSION  # noqa: E402

SYSTEM = "pfl"
EVAL_BATCH_SIZE = 512  # fedmeta.evaluation.metrics.evaluate's batch


class LossAndMetrics(nn.Module):
    """fedmeta's network with the ``loss`` and ``metrics`` methods pfl's PyTorchModel calls."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.train()
        total, counted = masked_cross_entropy(self.net(x), y)
        return total / max(counted, 1)

    @torch.no_grad()
    def metrics(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Weighted]:
        self.eval()
        logits = self.net(x)
        total, counted = masked_cross_entropy(logits, y)
        correct = int(((logits.argmax(-1) == y) & (y != IGNORE_INDEX)).sum())
        return {"loss": Weighted(float(total), counted), "accuracy": Weighted(correct, counted)}


class FedAvgNoEval(FederatedAveraging):
    """pfl's FedAvg without its per-user evaluation before and after training.

    pfl evaluates every user when ``iteration % evaluation_frequency == 0``, so round 0
    (a warm-up round) would do extra work the measured rounds do not; no system
    evaluates during the FedAvg workloads.
    """

    def get_next_central_contexts(self, model, iteration, algorithm_params, model_train_params,
                                  model_eval_params=None):
        contexts, model, metrics = super().get_next_central_contexts(
            model, iteration, algorithm_params, model_train_params, model_eval_params)
        if contexts is not None:
            contexts = tuple(dataclasses.replace(c, do_evaluation=False) for c in contexts)
        return contexts, model, metrics


class FineTuneAndEvaluate(FederatedNNAlgorithm):
    """Personalization (W3) as a pfl algorithm: per user, evaluate on its test split,
    then fine-tune epoch by epoch on its train split, evaluating after each epoch.

    Nothing is sent back to the server; only metrics are aggregated. The train params
    hold one epoch, run ``epochs`` times (plain SGD keeps no state between calls).
    """

    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.epochs = epochs

    def train_one_user(self, initial_model_state, model, user_dataset, central_context):
        bridges.sgd_bridge().do_sgd(model, user_dataset, central_context.model_train_params)
        return None, Metrics()

    def simulate_one_user(self, model, user_dataset, central_context):
        test = user_dataset.metadata["test"]
        eval_params = central_context.model_eval_params

        def named(stage: str):
            return lambda name: StringMetricName(f"{name} {stage}")

        metrics = model.evaluate(test, named("initial"), eval_params)
        self._initial_model_state = model.get_parameters(self._initial_model_state)
        for epoch in range(1, self.epochs + 1):
            self.train_one_user(self._initial_model_state, model, user_dataset, central_context)
            metrics |= model.evaluate(test, named(f"after epoch {epoch}"), eval_params)
        model.set_parameters(self._initial_model_state)
        return None, metrics

    def process_aggregated_statistics(self, central_context, aggregate_metrics, model, statistics):
        return model, Metrics()

    def process_aggregated_statistics_from_all_contexts(self, stats_context_pairs, aggregate_metrics, model):
        return model, Metrics()


class RoundClock(TrainingProcessCallback):
    """Wall time when the first round starts, and perf-counter bounds of the measured rounds."""

    def __init__(self, warmup_rounds: int) -> None:
        self.warmup_rounds = warmup_rounds
        self.first_round_wall = 0.0
        self.measured_start = 0.0
        self.last_end = 0.0

    def on_train_begin(self, *, model) -> Metrics:
        self.first_round_wall = time.time()
        self.measured_start = time.perf_counter()
        return Metrics()

    def after_central_iteration(self, aggregate_metrics, model, *, central_iteration: int):
        self.last_end = time.perf_counter()
        if central_iteration + 1 == self.warmup_rounds:
            self.measured_start = self.last_end
        return False, Metrics()


def federated_dataset(clients: dict[str, ClientData], schedule: list[list[str]], with_test: bool) -> FederatedDataset:
    """pfl's FederatedDataset whose user sampler yields exactly the benchmark's cohorts, in order.

    pfl draws a cohort as ``cohort_size`` successive samples, identically on every
    worker, so a sampler walking the concatenated cohorts gives each round its cohort.
    """
    order = itertools.cycle([cid for cohort in schedule for cid in cohort])

    def make_dataset(cid: str) -> Dataset:
        client = clients[cid]
        metadata = {"test": Dataset((client.test.x, client.test.y), user_id=cid)} if with_test else None
        return Dataset((client.train.x, client.train.y), user_id=cid, metadata=metadata)

    weights = {cid: client.num_train for cid, client in clients.items()}
    return FederatedDataset(make_dataset, lambda: next(order), user_id_to_weight=weights)


def run(workload: Workload, data_dir: Path, seed: int) -> Result | None:
    """Runs the workload in this process (one of the torchrun workers); the result on rank 0."""
    torch.set_num_threads(1)
    clients, num_classes = load_population(workload, data_dir)
    schedule = cohorts(workload, list(clients), seed)
    example = next(iter(clients.values())).train
    net = LossAndMetrics(build_workload_model(workload, num_classes, example))
    model = PyTorchModel(net, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0))
    personalize = workload.kind == "personalize"
    dataset = federated_dataset(clients, schedule, with_test=personalize)
    backend = SimulatedBackend(training_data=dataset, val_data=None,
                               postprocessors=[] if personalize else [WeightByDatapoints()])
    total_rounds = len(schedule)
    params = NNAlgorithmParams(central_num_iterations=total_rounds, evaluation_frequency=total_rounds,
                               train_cohort_size=len(schedule[0]), val_cohort_size=None)
    train_params = NNTrainHyperParams(local_num_epochs=1 if personalize else workload.epochs,
                                      local_learning_rate=workload.client_lr, local_batch_size=workload.batch_size)
    algorithm = FineTuneAndEvaluate(workload.epochs) if personalize else FedAvgNoEval()
    clock = RoundClock(workload.warmup_rounds)
    algorithm.run(params, backend, model, train_params, NNEvalHyperParams(local_batch_size=EVAL_BATCH_SIZE),
                  callbacks=[clock], send_metrics_to_platform=False)
    if get_ops().distributed.global_rank != 0:
        return None
    measured = schedule[workload.warmup_rounds:]
    return Result(
        system=SYSTEM, workload=workload.name,
        samples=sum(samples_of(workload, [clients[c] for c in cohort]) for cohort in measured),
        seconds=clock.last_end - clock.measured_start, rounds=len(measured),
        first_round_wall=clock.first_round_wall,
        note=f"pfl {PFL_VERSION}, {get_ops().distributed.world_size} worker process(es), 1 torch thread each; "
             "users balanced over workers by train size; no per-epoch reshuffle (pfl iterates in order)",
    )


def main() -> None:
    args = parse_args("pfl-research on a benchmark workload (launch with torchrun for several workers)")
    result = run(workload_by_name(args.workload), args.data_dir, args.seed)
    if result is not None:
        emit(result)


if __name__ == "__main__":
    main()
