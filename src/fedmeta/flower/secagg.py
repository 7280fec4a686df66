"""Secure aggregation of a round's updates with Flower's SecAgg+ (Bell, Bonawitz, Gascón,
Lepoint, Raykova. *Secure Single-Server Aggregation with (Poly)Logarithmic Overhead*. CCS 2020).

Flower does the cryptography: ``SecAggPlusWorkflow`` on the server, ``secaggplus_mod`` on
each SuperNode. Every SuperNode of the federation takes part in every round; a node sends
one vector, the weighted mean p_i of its cohort clients' deltas, with its weight W_i
(their examples; with ``[privacy]``, their number, each delta clipped to C first, so that
the sum is DP-FedAvg's), and a node without cohort clients sends zeros with weight 0. The
mod masks the vector with pairwise and private masks that cancel only in the sum; the server
unmasks the sum and hands fedmeta's strategy Σ_i W_i p_i / Σ_i W_i, the round's mean, and never
one node's update.

What it does to the bits. Each node scales p_i by d_i = W_i / ``max_weight`` (exactly, when
``max_weight`` is a power of two), clips each coordinate of d_i·p_i to ±c (``clipping_range``)
and rounds (d_i·p_i + c)·T/(2c) stochastically to an integer, T the ``quantization_range``:
an error below one level, 2c/T, per node and coordinate. The unmasked sum of n nodes is
then off by less than n·2c/T, and the mean by less than n·2c/(T·Σ_i d_i)
(``quantization_bound``), as long as no |d_i·p_i| exceeds c. The rounding draws from
NumPy's global generator, unseeded: a secure run is not reproducible bit for bit, and cannot
have the bits of a run without SecAgg+.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from flwr.common import Code, EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Status
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid

from fedmeta.algorithms.aggregators import weighted_mean
from fedmeta.algorithms.privacy import clip_factor
from fedmeta.client_work import ClientUpdate
from fedmeta.experiment.config import FlowerConfig
from fedmeta.params import Params, client_seed

if TYPE_CHECKING:
    from flwr.common.typing import Scalar


def secagg_workflow(flower: FlowerConfig, timeout: float) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ round as ``[flower]`` configures it, waiting at most ``timeout`` seconds a stage."""
    return SecAggPlusWorkflow(flower.num_shares, flower.reconstruction_threshold, max_weight=flower.max_weight,
                              clipping_range=flower.clipping_range, quantization_range=flower.quantization_range,
                              timeout=timeout)


def quantization_bound(flower: FlowerConfig, num_nodes: int, total_weight: float) -> float:
    """The most SecAgg+'s quantization moves a coordinate of the mean of ``num_nodes`` nodes' updates.

    n·2c/(T·Σ_i d_i), d_i = W_i / ``max_weight`` (see the module docstring); it holds while
    no node's scaled update leaves ±c.
    """
    return num_nodes * 2 * flower.clipping_range / flower.quantization_range / (total_weight / flower.max_weight)


def node_share(updates: Sequence[ClientUpdate], like: Params, clip: float | None) -> tuple[Params, int]:
    """A node's vector for the secure sum and its weight: the mean of its clients' deltas, in float64.

    Without ``clip``, weighted by examples (weight: their examples); with it, each delta is
    clipped to L2 norm ``clip`` and all weigh the same (weight: their number). No clients:
    zeros of weight 0.
    """
    if not updates:
        return {k: torch.zeros_like(w, dtype=torch.float64) for k, w in like.items()}, 0
    if clip is not None:
        updates = [ClientUpdate({k: d * clip_factor(u.delta, clip) for k, d in u.delta.items()}, 1, {})
                   for u in updates]
    mean, _ = weighted_mean("examples").apply(updates, ())
    return {k: v.double() for k, v in mean.items()}, sum(u.num_examples for u in updates)


def node_metrics(updates: Sequence[ClientUpdate]) -> dict[str, Scalar]:
    """What a node tells the server of its clients, beside the masked vector: counts and their summed loss."""
    return {"num-clients": len(updates), "num-examples": sum(u.num_examples for u in updates),
            "num-samples": sum(u.metrics["num_samples"] for u in updates),
            "train-loss-sum": sum(u.metrics["train_loss"] * u.num_examples for u in updates)}


def fit_result(share: Params, weight: int, metrics: dict[str, Scalar]) -> FitRes:
    """The node's reply in the form ``secaggplus_mod`` reads (Flower's legacy FitRes)."""
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters([v.numpy() for v in share.values()]), weight, metrics)


def fit_instructions(weights: Params, experiment: str, round_idx: int, client_ids: list[str],
                     seeds: list[int]) -> FitIns:
    """A node's instructions for the round: the weights, the experiment, its cohort clients and their seeds."""
    config: dict[str, Scalar] = {"experiment": experiment, "round": round_idx, "client-ids": json.dumps(client_ids),
                                 "seeds": json.dumps(seeds)}
    return FitIns(ndarrays_to_parameters([w.numpy() for w in weights.values()]), config)


def read_instructions(fitins: FitIns, like: Params) -> tuple[Params, str, int, list[str], list[int]]:
    """The inverse of ``fit_instructions``, the weights named as in ``like``."""
    arrays = parameters_to_ndarrays(fitins.parameters)
    weights = {k: torch.from_numpy(np.array(a)) for k, a in zip(like, arrays, strict=True)}
    config = fitins.config
    return (weights, str(config["experiment"]), int(config["round"]), json.loads(str(config["client-ids"])),
            json.loads(str(config["seeds"])))


class SecureRound(LegacyStrategy):
    """The legacy Strategy that ``SecAggPlusWorkflow`` drives for one round of fedmeta's.

    ``configure_fit`` asks ``instructions`` for each SuperNode's FitIns; ``aggregate_fit``
    gets the unmasked mean, which Flower has put in place of every node's parameters, and
    hands it with the nodes' replies and failures to ``aggregate``. Evaluation is not its part.
    """

    def __init__(self, grid: Grid, instructions: Callable[[Parameters], dict[int, FitIns]],
                 aggregate: Callable[[list[np.ndarray], list[FitRes], list[Any]], None]) -> None:
        self.grid, self.instructions, self.aggregate = grid, instructions, aggregate

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        run_id = self.grid.run.run_id
        return [(GridClientProxy(node, self.grid, run_id), fitins)
                for node, fitins in self.instructions(parameters).items()]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        if results:
            self.aggregate(parameters_to_ndarrays(results[0][1].parameters), [r for _, r in results], failures)
        return None, {}

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[Any]) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return None


def check_in_range(share: Params, weight: int, flower: FlowerConfig) -> None:
    """Raises ValueError where SecAgg+ would clip a coordinate of the node's scaled update (d·p beyond ±c)."""
    largest = max((float(v.abs().max()) for v in share.values() if v.numel()), default=0.0) * weight / flower.max_weight
    if largest > flower.clipping_range:
        raise ValueError(f"flower.clipping_range = {flower.clipping_range:g}: this SuperNode's update, scaled by its "
                         f"weight {weight} / flower.max_weight = {flower.max_weight:g}, reaches {largest:.4g}, which "
                         "SecAgg+ would clip; raise flower.clipping_range or flower.max_weight")


def noised_mean(mean: Params, count: int, aggregator_state: dict, noise_multiplier: float, cohort_size: int,
                seed: int, stream: str = "privacy") -> tuple[Params, dict]:
    """DP-FedAvg's release from the secure mean of ``count`` clipped deltas: (their sum + N(0, (z·C)²)) / m.

    The noise is ``private_mean``'s, drawn from the same generator in the same order, so a
    secure private run differs from ``fedmeta run``'s only by SecAgg+'s quantization. The
    state is ``private_mean``'s (C and the rounds released); C is fixed here.
    """
    clip, released = aggregator_state["clip"], aggregator_state["rounds"]
    generator = torch.Generator().manual_seed(client_seed(seed, released, stream))
    std = noise_multiplier * clip / cohort_size
    delta = {}
    for key, value in mean.items():
        value = value * (count / cohort_size)
        if value.is_floating_point():
            value.add_(torch.randn(value.shape, generator=generator, dtype=value.dtype), alpha=std)
        delta[key] = value
    return delta, {"clip": clip, "rounds": released + 1}
