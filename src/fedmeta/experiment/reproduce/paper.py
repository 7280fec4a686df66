"""The paper's published numbers and claims, as data (Jiang et al., 2019, Table 1 and Sec. 5).

Table 1: EMNIST-62, 2,500 training and 900 held-out writers, FedAvg with client SGD lr
0.02, batch 20, server SGD lr 1.0 with momentum 0.9. Accuracies are unweighted means over
held-out writers; rounds are those needed to reach ``THRESHOLD``.
"""

from __future__ import annotations

from typing import NamedTuple


class PaperRow(NamedTuple):
    """One row of Table 1."""

    cohort_size: int
    local_epochs: int
    initial: float
    personalized: float
    rounds_initial: float
    rounds_personalized: float

    @property
    def gain(self) -> float:
        return self.personalized - self.initial


THRESHOLD = 0.8
"""The accuracy whose rounds-to-reach Table 1 reports."""

TABLE1: tuple[PaperRow, ...] = (
    PaperRow(5, 2, 0.7473, 0.8292, 310, 63.6),
    PaperRow(5, 5, 0.8028, 0.8712, 111.1, 33.9),
    PaperRow(5, 10, 0.7879, 0.8820, 137.5, 30.0),
    PaperRow(5, 20, 0.7430, 0.8782, 152.5, 32.2),
    PaperRow(20, 2, 0.8403, 0.8957, 82.5, 50),
    PaperRow(20, 5, 0.8471, 0.9057, 65.6, 31.25),
    PaperRow(20, 10, 0.8480, 0.9032, 68.7, 25),
    PaperRow(20, 20, 0.8391, 0.8953, 82.1, 46.4),
)


def paper_row(cohort_size: int, local_epochs: int) -> PaperRow | None:
    """Table 1's row for (clients per round, E), or None when the paper has no such row."""
    return next((r for r in TABLE1 if (r.cohort_size, r.local_epochs) == (cohort_size, local_epochs)), None)


TFF_DIGIT_SHARE = 341_873 / 671_585
"""Digits among the training examples of TFF's EMNIST-62, the paper's data: its digits-only version keeps 341,873
of the 671,585."""

CLAIMS = {
    "personalization_helps": "Personalized accuracy beats initial accuracy in every FedAvg configuration (Table 1).",
    "threshold_sooner": f"Personalized accuracy reaches {THRESHOLD} in fewer rounds than initial accuracy (Table 1).",
    "epochs_help_personalization": "Larger E helps personalized accuracy more than initial accuracy (Table 1).",
    "schedule_beats_fedavg": "The two-stage schedule (FedAvg(E) with server momentum, then Reptile(K) with server "
                             "Adam) gives both a better initial and a better personalized model than FedAvg alone.",
    "centralized_personalizes_less": "A centrally trained model reaches a good initial accuracy but gains less from "
                                     "personalization than a federated one.",
    "shakespeare_muted": "On Shakespeare the personalization gains are muted: still positive, but smaller than "
                         "on EMNIST.",
    "gain_grows_with_writers": "Ours, not the paper's: the personalization gain grows with the number of "
                               "training writers, so training on fewer writers than the paper explains part "
                               "of our smaller gains.",
}
"""The claims the report checks, by the key its verdicts use."""
