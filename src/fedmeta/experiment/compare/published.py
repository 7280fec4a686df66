"""Numbers the methods' own papers publish on a setting the comparison also has, with how the settings differ.

Only numbers read in the paper are here. The methods' papers were checked for FEMNIST
(EMNIST), Shakespeare and Synthetic(α, β): Per-FedAvg (Fallah et al. 2020) reports MNIST
and CIFAR-10 only; MAML and FOMAML (Finn et al. 2017) and Reptile (Nichol et al. 2018)
report no federated data; FedProx (Li et al. 2020) has FEMNIST, Shakespeare and
Synthetic, but shows them as curves, so no number of it could be read and verified and
none is given; FedAvg's own paper (McMahan et al. 2017) reports rounds to a target
accuracy, not accuracy on held-out clients. The FedAvg row below is from the paper
fedmeta reproduces (Jiang et al. 2019, Table 1), which evaluates as we do. Of the others,
FedPer (Arivazhagan et al. 2019: CIFAR and a Flickr aesthetics set) uses none of our
settings, SCAFFOLD (Karimireddy et al. 2020) trains one global model on EMNIST and reports
no personalized accuracy, and FedRep's FEMNIST (Collins et al. 2021, per its reference code: 10 lowercase
classes, 3 a writer, re-partitioned over 150 clients) is not ours. Ditto (Li et al. 2021:
LEAF FEMNIST) and pFedMe (Dinh et al. 2020: Synthetic(0.5, 0.5), 100 clients) share a
setting, but both test on a split of each training client's own data, not on held-out
clients, and their tables have not been transcribed and checked yet, so no number of
theirs is given.
"""

from __future__ import annotations

from typing import NamedTuple

from fedmeta.experiment.reproduce.paper import paper_row


class Published(NamedTuple):
    """A published initial and personalized accuracy, where it is from and how its setting differs from ours."""

    method: str
    setting: str
    source: str
    initial: float
    personalized: float
    differences: str


_JIANG = paper_row(5, 2)

PUBLISHED: tuple[Published, ...] = (
    Published("fedavg", "femnist", "Jiang et al. 2019, Table 1 (5 clients/round, E=2)", _JIANG.initial,
              _JIANG.personalized,
              "TFF's EMNIST-62 with 2,500 training and 900 held-out writers (ours: FEMNIST's 396 writers, a ninth "
              "of the data); rounds until 0.8 accuracy or more (ours: the equal sample budget, far fewer samples); "
              "E=2 and 5 clients a round (ours: E=1, 10); both evaluate held-out writers before and after "
              "fine-tuning on their own train split"),
)

NOT_FOUND = " ".join(__doc__.split("\n\n", 1)[1].split())
"""What was checked and left out, for the report."""


def published(setting: str) -> tuple[Published, ...]:
    """The published numbers for one of our settings."""
    return tuple(p for p in PUBLISHED if p.setting == setting)
