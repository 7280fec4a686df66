"""Initial and personalized evaluation, summaries over clients, and the FedAvg decomposition."""

from fedmeta.evaluation.decomposition import Decomposition, decompose_client_update
from fedmeta.evaluation.metrics import Scores, evaluate
from fedmeta.evaluation.personalization import (
    ClientPersonalization, PersonalizationReport, PersonalizationWork, personalize, personalize_client,
)
from fedmeta.evaluation.summary import Summary, rounds_to_threshold

__all__ = [
    "ClientPersonalization", "Decomposition", "PersonalizationReport", "Scores", "Summary",
    "decompose_client_update", "evaluate", "PersonalizationWork", "personalize", "personalize_client",
    "rounds_to_threshold",
]
