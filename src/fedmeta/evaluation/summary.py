"""Summaries over clients: each client counts once (an unweighted mean), with spread."""

from __future__ import annotations

import math
from typing import Iterable, NamedTuple, Sequence

import numpy as np


class Summary(NamedTuple):
    mean: float
    std: float
    q25: float
    median: float
    q75: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        """Summarizes per-client values; std is the population std over clients.

        A NaN is a client the metric does not apply to (no digits for a digit accuracy): it
        is left out, and a metric that applies to no client summarizes as NaN.
        """
        a = np.asarray(values, dtype=np.float64)
        if a.size == 0:
            raise ValueError("cannot summarize zero clients")
        a = a[~np.isnan(a)]
        if a.size == 0:
            return cls(*[math.nan] * len(cls._fields))
        q25, median, q75 = np.quantile(a, [0.25, 0.5, 0.75])
        return cls(float(a.mean()), float(a.std()), float(q25), float(median), float(q75),
                   float(a.min()), float(a.max()))


def rounds_to_threshold(history: Iterable[dict], key: str, threshold: float,
                        higher_is_better: bool = True) -> int | None:
    """The ``round`` (rounds done, as ``metrics.jsonl`` counts) of the first row whose ``key`` reached ``threshold``.

    Reached is at or above it, or at or below it for a metric where lower is better (an
    error). Rows without ``key`` (rounds that were not evaluated) are skipped; ``None``
    when the threshold was never reached.
    """
    for row in history:
        if key in row and (row[key] >= threshold if higher_is_better else row[key] <= threshold):
            return int(row["round"])
    return None
