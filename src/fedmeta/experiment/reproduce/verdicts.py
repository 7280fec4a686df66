"""Verdicts on the paper's claims, computed from measured per-client numbers.

The rule, stated before any run: a difference counts only when its 95% interval
excludes zero. With one seed the interval is over held-out clients (a paired t
interval on per-client differences: both arms are evaluated on the same clients); with
several seeds it is a t interval over the seeds' mean differences, which then also
covers the model's initialization, the cohorts and (in fedmeta the run seed draws it)
the held-out split. A claim checked in several configurations is *reproduced* when it
holds in all of them, *partly* when in some, *not reproduced* when in none.
"""

from __future__ import annotations

import math
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from fedmeta.experiment.reproduce.paper import CLAIMS, THRESHOLD

OUTCOMES = ("reproduced", "partly", "not reproduced", "not testable", "not run")

# two-sided 95% quantiles of Student's t, by degrees of freedom
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)
_Z975 = 1.959964


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (Cornish-Fisher beyond 30)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    return _Z975 + (_Z975**3 + _Z975) / (4 * df)


class Interval(NamedTuple):
    """A mean with the half-width of its 95% interval (inf when one value gives no spread)."""

    mean: float
    half_width: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    @property
    def above_zero(self) -> bool:
        return self.low > 0

    @property
    def below_zero(self) -> bool:
        return self.high < 0

    def __str__(self) -> str:
        if math.isinf(self.half_width):
            return f"{self.mean:+.4f}"
        return f"{self.mean:+.4f} [{self.low:+.4f}, {self.high:+.4f}]"


def mean_interval(values: Sequence[float]) -> Interval:
    """The mean of ``values`` with a t interval (sample std, n−1 degrees of freedom)."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        raise ValueError("an interval needs at least one value")
    if a.size == 1:
        return Interval(float(a[0]), math.inf, 1)
    return Interval(float(a.mean()), t975(a.size - 1) * float(a.std(ddof=1)) / math.sqrt(a.size), int(a.size))


def paired_interval(differences: Sequence[np.ndarray]) -> Interval:
    """Mean per-client difference: over clients for one seed, over the seeds' means for several."""
    if len(differences) == 1:
        return mean_interval(differences[0])
    return mean_interval([float(np.mean(d)) for d in differences])


def paired_differences(ids_a: Sequence[str], a: Sequence[float], ids_b: Sequence[str], b: Sequence[float],
                       what: str) -> np.ndarray:
    """b − a client by client, refused unless both sides list the same client ids in the same order.

    A paired interval is only one when each difference compares a client with itself;
    ``what`` names the two sides in the error.
    """
    if list(ids_a) != list(ids_b):
        only_a, only_b = sorted(set(ids_a) - set(ids_b)), sorted(set(ids_b) - set(ids_a))
        detail = (f"{len(only_a)} client(s) only in the first, {len(only_b)} only in the second "
                  f"(e.g. {(only_a or only_b)[0]!r})" if only_a or only_b else "the same clients in another order")
        raise ValueError(f"{what}: cannot pair per-client numbers of different held-out clients: {detail}")
    return np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)


def unpaired_interval(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> Interval:
    """mean(b) − mean(a) for two different client populations (Welch's standard error, one seed).

    With several seeds (the same number on both sides), a t interval over the seeds'
    differences of means. The degrees of freedom are the smaller sample's, which errs
    wide rather than narrow.
    """
    if len(a) != len(b):
        raise ValueError(f"both sides need the same seeds, got {len(a)} and {len(b)}")
    if len(a) > 1:
        return mean_interval([float(np.mean(y) - np.mean(x)) for x, y in zip(a, b)])
    x, y = np.asarray(a[0], dtype=np.float64), np.asarray(b[0], dtype=np.float64)
    mean = float(y.mean() - x.mean())
    if min(x.size, y.size) < 2:
        return Interval(mean, math.inf, 1)
    se = math.sqrt(x.var(ddof=1) / x.size + y.var(ddof=1) / y.size)
    return Interval(mean, t975(min(x.size, y.size) - 1) * se, int(min(x.size, y.size)))


class Accuracies(NamedTuple):
    """One configuration's per-client accuracies, one array per seed, and the clients' ids per seed if known."""

    initial: tuple[np.ndarray, ...]
    personalized: tuple[np.ndarray, ...]
    client_ids: tuple[tuple[str, ...], ...] = ()

    @property
    def gains(self) -> tuple[np.ndarray, ...]:
        return tuple(p - i for i, p in zip(self.initial, self.personalized))


def paired_change(a: Accuracies, b: Accuracies, values: str, what: str) -> Interval:
    """The paired interval of b − a in ``values`` (``"initial"``, ``"personalized"`` or ``"gains"``), seed by seed.

    Where both arms know their client ids, each seed's pair is refused unless they list the
    same held-out clients (``paired_differences``); ``what`` names the arms in that error.
    """
    ids = zip(a.client_ids, b.client_ids) if a.client_ids and b.client_ids else None
    differences = []
    for seed, (x, y) in enumerate(zip(getattr(a, values), getattr(b, values), strict=True)):
        if ids is None:
            differences.append(y - x)
        else:
            ids_a, ids_b = next(ids)
            differences.append(paired_differences(ids_a, x, ids_b, y, f"{what} (seed {seed + 1})"))
    return paired_interval(differences)


class Verdict(NamedTuple):
    """A claim, its outcome (one of ``OUTCOMES``) and the numbers behind it.

    ``missing`` names the configurations the claim is checked in whose runs have not all
    finished (with how many of their seeds have): the outcome holds for what has finished
    alone, so it is provisional.
    """

    claim: str
    outcome: str
    evidence: str
    missing: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        return CLAIMS[self.claim]

    @property
    def is_provisional(self) -> bool:
        """Decided on some of its configurations while others are still missing."""
        return bool(self.missing) and self.outcome != "not run"

    @property
    def shown_outcome(self) -> str:
        """The outcome, marked provisional while configurations are missing."""
        if not self.is_provisional:
            return self.outcome
        return f"{self.outcome} (provisional: {len(self.missing)} configuration(s) not finished)"

    def provisional(self, missing: Sequence[str]) -> Verdict:
        """This verdict, decided without the runs of the ``missing`` configurations."""
        return self._replace(missing=tuple(missing))


def _tally(holds: Sequence[bool]) -> str:
    if not holds:
        return "not testable"
    return "reproduced" if all(holds) else "partly" if any(holds) else "not reproduced"


def _mark(holds: bool) -> str:
    return "holds" if holds else "does not hold"


def personalization_helps(cells: Mapping[str, Accuracies]) -> Verdict:
    """Personalized > initial in each configuration (the interval of the per-client gain above 0)."""
    if not cells:
        return Verdict("personalization_helps", "not run", "no Table 1 run present")
    gains = {label: paired_interval(acc.gains) for label, acc in cells.items()}
    holds = [g.above_zero for g in gains.values()]
    failing = [label for label, g in gains.items() if not g.above_zero]
    hurt = [label for label, g in gains.items() if g.below_zero]
    evidence = "; ".join(f"{label}: {g}" for label, g in gains.items())
    summary = (f"personalized − initial above 0 in {sum(holds)} of {len(holds)} configurations"
               + (f" (not in {', '.join(failing)})" if failing else "")
               + (f"; significantly below 0 in {', '.join(hurt)}" if hurt else ""))
    return Verdict("personalization_helps", _tally(holds), f"{summary}. Gains: {evidence}")


def threshold_sooner(rounds: Mapping[str, tuple[float | None, float | None]], threshold: float = THRESHOLD) -> Verdict:
    """Personalized reaches ``threshold`` at an earlier evaluation than initial (or initial never does).

    ``rounds`` maps a configuration to (rounds for initial, rounds for personalized), None
    for never; configurations where neither reached it cannot decide and are listed apart.
    """
    if not rounds:
        return Verdict("threshold_sooner", "not run", "no Table 1 run present")
    decided = {label: r for label, r in rounds.items() if r[1] is not None or r[0] is not None}
    holds = [p is not None and (i is None or p < i) for i, p in decided.values()]

    def shown(value: float | None) -> str:
        return "never" if value is None else f"{value:g}"

    evidence = "; ".join(f"{label}: {shown(i)} / {shown(p)}" for label, (i, p) in rounds.items())
    undecided = [label for label in rounds if label not in decided]
    note = f"; neither reached {threshold:g} in {', '.join(undecided)}" if undecided else ""
    return Verdict("threshold_sooner", _tally(holds),
                   f"personalized first in {sum(holds)} of {len(holds)} configurations that reached "
                   f"{threshold:g}{note}. Rounds to {threshold:g} (initial / personalized): {evidence}")


def epochs_help_personalization(grid: Mapping[tuple[int, int], Accuracies],
                                paper_gains: Mapping[tuple[int, int], float] | None = None) -> Verdict:
    """Per cohort size: the gain at the largest E exceeds the gain at the smallest E.

    gain(E_max) − gain(E_min) = [pers(E_max) − pers(E_min)] − [init(E_max) − init(E_min)],
    so this is exactly "larger E raises personalized accuracy more than initial accuracy".
    Both runs share the seed, hence the held-out clients: the difference is paired.
    """
    cohorts = sorted({c for c, _ in grid})
    lines, holds = [], []
    for cohort in cohorts:
        epochs = sorted(e for c, e in grid if c == cohort)
        if len(epochs) < 2:
            continue
        low, high = grid[cohort, epochs[0]], grid[cohort, epochs[-1]]
        change = paired_change(low, high, "gains", f"c{cohort}/E{epochs[0]} against c{cohort}/E{epochs[-1]}")
        holds.append(change.above_zero)
        paper = ""
        if paper_gains and (cohort, epochs[0]) in paper_gains and (cohort, epochs[-1]) in paper_gains:
            published = paper_gains[cohort, epochs[-1]] - paper_gains[cohort, epochs[0]]
            too_small = (f"; within our interval's half-width {change.half_width:.4f}, so the paper's own change "
                         "would not pass this rule at our precision" if abs(published) <= change.half_width else "")
            paper = f" (paper: {published:+.4f}{too_small})"
        lines.append(f"{cohort} clients/round: gain(E={epochs[-1]}) − gain(E={epochs[0]}) = {change}{paper}, "
                     f"{_mark(change.above_zero)}")
    if not lines:
        return Verdict("epochs_help_personalization", "not run", "needs two values of E at one cohort size")
    return Verdict("epochs_help_personalization", _tally(holds), "; ".join(lines))


def schedule_beats_fedavg(fedavg: Accuracies | None, two_stage: Accuracies | None) -> Verdict:
    """Two-stage minus FedAvg alone, same rounds and seed: both initial and personalized above 0."""
    if fedavg is None or two_stage is None:
        return Verdict("schedule_beats_fedavg", "not run", "the FedAvg or the two-stage run is missing")
    initial = paired_change(fedavg, two_stage, "initial", "FedAvg against two-stage")
    personalized = paired_change(fedavg, two_stage, "personalized", "FedAvg against two-stage")
    better = [initial.above_zero, personalized.above_zero]
    outcome = "reproduced" if all(better) else "partly" if any(better) else "not reproduced"
    worse = [name for name, d in (("initial", initial), ("personalized", personalized)) if d.below_zero]
    note = f"; significantly worse: {', '.join(worse)}" if worse else ""
    return Verdict("schedule_beats_fedavg", outcome,
                   f"two-stage − FedAvg: initial {initial}, {_mark(initial.above_zero)}; personalized "
                   f"{personalized}, {_mark(personalized.above_zero)}{note}")


def centralized_personalizes_less(central: Accuracies | None, fedavg: Accuracies | None) -> Verdict:
    """(a) central initial not significantly below FedAvg's; (b) central gain significantly smaller.

    "Good initial accuracy" is read against the federated reference, not a fixed number,
    because what is good depends on the data: (a) holds unless the interval of
    central − FedAvg initial accuracy lies wholly below 0.
    """
    if central is None or fedavg is None:
        return Verdict("centralized_personalizes_less", "not run", "the centralized or the FedAvg run is missing")
    initial = paired_change(fedavg, central, "initial", "FedAvg against centralized")
    gain = paired_change(central, fedavg, "gains", "centralized against FedAvg")
    good, less = not initial.below_zero, gain.above_zero
    outcome = "reproduced" if good and less else "partly" if good or less else "not reproduced"
    central_gain, fed_gain = paired_interval(central.gains), paired_interval(fedavg.gains)
    personalized = paired_change(fedavg, central, "personalized", "FedAvg against centralized")
    ends = ("above" if personalized.above_zero else "below" if personalized.below_zero
            else "level with (within the interval)")
    after = f"; personalized, centralized − FedAvg = {personalized}: the centralized model ends {ends} FedAvg's"
    return Verdict("centralized_personalizes_less", outcome,
                   f"(a) centralized − FedAvg initial accuracy {initial}: good initial accuracy "
                   f"{_mark(good)}; (b) FedAvg gain {fed_gain.mean:+.4f} − centralized gain "
                   f"{central_gain.mean:+.4f} = {gain}: gains less {_mark(less)}{after}")


def shakespeare_muted(shakespeare: Accuracies | None, emnist: Accuracies | None) -> Verdict:
    """The Shakespeare gain is positive but smaller than the EMNIST gain (absolute accuracy points).

    Muted is not absent: a Shakespeare gain whose interval does not lie above 0 is no gain,
    a different result from the paper's, and is *not reproduced* however it compares with
    EMNIST. Otherwise, different clients on each side make the comparison unpaired; smaller
    but within its interval counts as *partly*.
    """
    if shakespeare is None or emnist is None:
        return Verdict("shakespeare_muted", "not run", "the Shakespeare or the FEMNIST reference run is missing")
    difference = unpaired_interval(shakespeare.gains, emnist.gains)
    own = paired_interval(shakespeare.gains)
    if not own.above_zero:
        outcome = "not reproduced"
    else:
        outcome = "reproduced" if difference.above_zero else "partly" if difference.mean > 0 else "not reproduced"
    no_gain = "" if own.above_zero else " (no gain: its interval does not lie above 0)"
    return Verdict("shakespeare_muted", outcome,
                   f"Shakespeare gain {own}{no_gain}; FEMNIST gain {paired_interval(emnist.gains).mean:+.4f}; "
                   f"FEMNIST − Shakespeare {difference}, {_mark(difference.above_zero)}")


def gain_grows_with_writers(cells: Mapping[str, Mapping[int, Accuracies]]) -> Verdict:
    """Per configuration: the gain on the most training writers exceeds the gain on the fewest.

    ``cells`` maps a configuration's label to its runs by number of training writers.
    Every run of a configuration personalizes the same held-out writers, so the
    difference of gains is paired; it holds when its interval lies above 0.
    """
    lines, holds = [], []
    for label, by_count in cells.items():
        if len(by_count) < 2:
            continue
        counts = sorted(by_count)
        fewest, most = by_count[counts[0]], by_count[counts[-1]]
        change = paired_change(fewest, most, "gains", f"{label} on {counts[0]} against {counts[-1]} writers")
        holds.append(change.above_zero)
        gains = " / ".join(f"{paired_interval(by_count[n].gains).mean:+.4f}" for n in counts)
        lines.append(f"{label}: gain on {' / '.join(str(n) for n in counts)} training writers {gains}; "
                     f"gain({counts[-1]}) − gain({counts[0]}) = {change}, {_mark(change.above_zero)}")
    if not lines:
        return Verdict("gain_grows_with_writers", "not run", "needs runs on two numbers of training writers")
    return Verdict("gain_grows_with_writers", _tally(holds), "; ".join(lines))
