"""Faulty clients in a round: simulated dropout and stragglers, failures, rejected updates.

Cross-device federated learning never hears back from every cohort client (Bonawitz et
al., 2019, *Towards Federated Learning at Scale*): devices drop out, miss the round's
deadline, crash, or send garbage. A round aggregates the updates that came back and
passed the checks, and moves the server only if there are at least ``min_clients``.

The simulated faults are decided before any training, from
``client_seed(seed, round_idx, ...)``: a dropped client or a straggler costs no training
time, and a run stays a function of its config.
"""

from __future__ import annotations

import math
import random
import statistics
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

from fedmeta.client_work import ClientFailure, ClientUpdate, ClientWork
from fedmeta.data.federated import ClientData
from fedmeta.params import Params, client_seed, norm

FAULT_POLICIES = ("skip", "retry")


class InvalidFaults(ValueError):
    """A ``Faults`` setting out of range; a config names it by its key instead (``faults.dropout``)."""

    def __init__(self, setting: str, value: Any, expected: str):
        super().__init__(f"faults {setting} = {value!r}: expected {expected}")
        self.setting, self.value, self.expected = setting, value, expected


@dataclass(frozen=True)
class Faults:
    """Which client faults a round simulates, and how it treats what comes back.

    Simulated, per client and attempt, independently:

    - dropout: the client never returns, with probability ``dropout``;
    - straggling: the client's simulated time is ``num_train × seconds_per_example ×
      exp(slowdown_sigma · z)`` (z standard normal: a lognormal slowdown); with a
      ``round_deadline`` (simulated seconds), a client over it misses the round.

    Of the clients that return, these are left out: one whose work raised (reported with
    a ``RuntimeWarning`` naming it), an update with any NaN or inf, and an update whose
    L2 norm exceeds ``max_update_norm`` or ``update_norm_factor`` × the median norm of
    the attempt's finite updates (either rule only when set).

    With fewer than ``min_clients`` accepted updates, ``policy`` decides: ``"skip"``
    leaves the server state as it was; ``"retry"`` draws the simulated faults again
    (attempt 1, 2, ... seed fresh draws) up to ``max_retries`` times, reusing the updates
    of clients that already trained (a client's work depends on (seed, round, client)
    alone, so it would give the same bits), then skips if still short.

    A config's ``[faults]`` section is this class, its keys these fields. The defaults
    simulate nothing; a client whose work raises, or whose update holds a NaN or inf, is
    still left out of its round and reported under ``faults/``.
    """

    dropout: float = 0.0
    seconds_per_example: float = 0.01
    slowdown_sigma: float = 0.0
    round_deadline: float | None = None
    min_clients: int = 1
    policy: str = "skip"
    max_retries: int = 2
    max_update_norm: float | None = None
    update_norm_factor: float | None = None

    def __post_init__(self) -> None:
        checks = [
            (0 <= self.dropout < 1, "dropout", "a probability in [0, 1)"),
            (0 < self.seconds_per_example < math.inf, "seconds_per_example", "a positive number of seconds"),
            (0 <= self.slowdown_sigma < math.inf, "slowdown_sigma", ">= 0"),
            (self.round_deadline is None or self.round_deadline > 0, "round_deadline",
             "a positive number of simulated seconds"),
            (self.min_clients >= 1, "min_clients", "at least 1"),
            (self.policy in FAULT_POLICIES, "policy", "one of " + ", ".join(repr(p) for p in FAULT_POLICIES)),
            (self.max_retries >= 0, "max_retries", "0 or more"),
            (self.max_update_norm is None or self.max_update_norm > 0, "max_update_norm", "a positive norm"),
            (self.update_norm_factor is None or self.update_norm_factor > 1, "update_norm_factor",
             "a factor > 1 (of the round's median update norm)"),
        ]
        for ok, setting, expected in checks:
            if not ok:
                raise InvalidFaults(setting, getattr(self, setting), expected)

    def drops_out(self, client_id: str, seed: int, round_idx: int, attempt: int = 0) -> bool:
        """Whether the client drops out of this attempt of the round."""
        if self.dropout == 0:
            return False
        return random.Random(client_seed(seed, round_idx, f"{client_id}/dropout/{attempt}")).random() < self.dropout

    def simulated_seconds(self, client: ClientData, seed: int, round_idx: int, attempt: int = 0) -> float:
        """The client's simulated time for this attempt of the round (see the class docstring)."""
        z = random.Random(client_seed(seed, round_idx, f"{client.client_id}/slowdown/{attempt}")).gauss(0.0, 1.0)
        return client.num_train * self.seconds_per_example * math.exp(self.slowdown_sigma * z)

    def straggles(self, client: ClientData, seed: int, round_idx: int, attempt: int = 0) -> bool:
        """Whether the client's simulated time is over the round's deadline."""
        return (self.round_deadline is not None
                and self.simulated_seconds(client, seed, round_idx, attempt) > self.round_deadline)

    def accepted(self, norms: Sequence[float]) -> list[bool]:
        """Which of one attempt's update norms pass the checks (see the class docstring)."""
        finite = [n for n in norms if math.isfinite(n)]
        limit = math.inf if self.max_update_norm is None else self.max_update_norm
        if self.update_norm_factor is not None and finite:
            limit = min(limit, self.update_norm_factor * statistics.median(finite))
        return [math.isfinite(n) and n <= limit for n in norms]


class RoundUpdates(NamedTuple):
    """What came back in a round: accepted updates in cohort order, the rejected, and ``faults/`` metrics."""

    accepted: list[ClientUpdate]
    rejected: list[ClientUpdate]
    skipped: bool
    metrics: dict[str, Any]


def collect_updates(faults: Faults, engine: Any, work: ClientWork, weights: Params, clients: Sequence[ClientData],
                    seeds: Sequence[int], *, seed: int, round_idx: int) -> RoundUpdates:
    """Runs the round's client work under ``faults``; see ``Faults`` for the rules.

    The metrics describe the deciding (last) attempt: of its cohort, ``faults/dropped``
    dropped out, ``faults/stragglers`` missed the deadline, ``faults/failed`` raised and
    ``faults/rejected`` sent an update the checks refused; the rest were aggregated.
    If every cohort client ran and raised, the first one's error is raised: that is a
    broken setup, not a faulty client.
    """
    results: dict[int, ClientUpdate | ClientFailure] = {}
    norms: dict[int, float] = {}
    attempts = 1 + (faults.max_retries if faults.policy == "retry" else 0)
    for attempt in range(attempts):
        dropped, stragglers, returned = [], [], []
        for i, client in enumerate(clients):
            if faults.drops_out(client.client_id, seed, round_idx, attempt):
                dropped.append(i)
            elif faults.straggles(client, seed, round_idx, attempt):
                stragglers.append(i)
            else:
                returned.append(i)
        to_run = [i for i in returned if i not in results]
        if to_run:
            mapped = engine.map(work, weights, [clients[i] for i in to_run], [seeds[i] for i in to_run],
                                on_error="collect")
            for i, result in zip(to_run, mapped):
                results[i] = result
                if isinstance(result, ClientFailure):
                    warnings.warn(f"round {round_idx + 1}: client {result.client_id!r} failed and is left out: "
                                  f"{type(result.error).__name__}: {result.error}", RuntimeWarning)
                else:
                    norms[i] = norm(result.delta)
        if len(results) == len(clients) and all(isinstance(r, ClientFailure) for r in results.values()):
            raise results[min(results)].error
        failed = [i for i in returned if isinstance(results[i], ClientFailure)]
        updated = [i for i in returned if not isinstance(results[i], ClientFailure)]
        passes = faults.accepted([norms[i] for i in updated])
        accepted = [i for i, ok in zip(updated, passes) if ok]
        rejected = [i for i, ok in zip(updated, passes) if not ok]
        if len(accepted) >= faults.min_clients:
            break
    metrics = {
        "faults/dropped": len(dropped),
        "faults/stragglers": len(stragglers),
        "faults/failed": len(failed),
        "faults/rejected": len(rejected),
        "faults/failed_clients": [clients[i].client_id for i in failed],
        "faults/rejected_clients": [clients[i].client_id for i in rejected],
        "faults/retries": attempt,
        "faults/skipped": int(len(accepted) < faults.min_clients),
    }
    return RoundUpdates([results[i] for i in accepted], [results[i] for i in rejected],
                        len(accepted) < faults.min_clients, metrics)
