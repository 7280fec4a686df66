"""Client updates, aggregators, server optimizers, and the algorithms they compose."""

from fedmeta.algorithms.aggregators import Aggregator, weighted_mean
from fedmeta.algorithms.algorithm import (
    FederatedAlgorithm, Schedule, ServerState, Switch, init_state, run_round,
)
from fedmeta.algorithms.client_update import ClientUpdate, LocalTraining, local_sgd, masked_cross_entropy
from fedmeta.algorithms.ditto import DittoTraining
from fedmeta.algorithms.faults import Faults
from fedmeta.algorithms.fedprox import ProximalTraining, proximal_sgd
from fedmeta.algorithms.fedrep import HeadFineTuning, PersonalHeadTraining
from fedmeta.algorithms.local_only import NoTraining
from fedmeta.algorithms.maml import MetaGradient
from fedmeta.algorithms.per_fedavg import AdaptationSteps, PerFedAvgTraining
from fedmeta.algorithms.pfedme import MoreauEnvelopeTraining
from fedmeta.algorithms.presets import (
    centralized, ditto, fedavg, fedper, fedprox, fedrep, fedsgd, fomaml, local_only, maml, perfedavg, pfedme,
    reptile, scaffold, two_stage,
)
from fedmeta.algorithms.scaffold import ScaffoldTraining, scaffold_mean, with_control_variates
from fedmeta.algorithms.server_optimizers import (
    ServerOptimizer, build_server_optimizer, server_adagrad, server_adam, server_sgd, server_yogi,
)

__all__ = [
    "AdaptationSteps", "Aggregator", "ClientUpdate", "DittoTraining", "Faults", "FederatedAlgorithm", "HeadFineTuning",
    "LocalTraining", "MetaGradient", "MoreauEnvelopeTraining", "NoTraining", "PerFedAvgTraining",
    "PersonalHeadTraining", "ProximalTraining", "ScaffoldTraining", "Schedule", "ServerOptimizer", "ServerState",
    "Switch", "build_server_optimizer", "centralized", "ditto", "fedavg", "fedper", "fedprox", "fedrep", "fedsgd",
    "fomaml", "init_state", "local_only", "local_sgd", "maml", "masked_cross_entropy", "perfedavg", "pfedme",
    "proximal_sgd", "reptile", "run_round", "scaffold", "scaffold_mean", "server_adagrad", "server_adam",
    "server_sgd", "server_yogi", "two_stage", "weighted_mean", "with_control_variates",
]
