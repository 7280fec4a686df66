"""``fedmeta compare``: personalization methods on one dataset, at an equal budget, on the same held-out clients.

    comparison = compare(("fedavg", "local_only"), SCALES["quick"], Path("runs/compare"), data_dir)
    write_report(comparison, Path("docs/comparison"))

Each method's hyperparameters are searched on training clients (``search``), then it
runs at every seed as a resumable run (``plan``, through ``fedmeta reproduce``'s run
machinery); the report (``report``) reads the finished runs.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

from fedmeta.experiment.compare.methods import METHODS, Method, check_methods
from fedmeta.experiment.compare.plan import (
    MIN_SEEDS, SCALES, SEEDS, Scale, Setting, estimated_seconds, run_spec, with_data,
)
from fedmeta.experiment.compare.report import write_report
from fedmeta.experiment.compare.search import Trial, best, search
from fedmeta.experiment.reproduce.runs import RunState, ensure_run, run_state

__all__ = ["Comparison", "METHODS", "MIN_SEEDS", "SCALES", "SettingRuns", "compare", "plan_scale", "write_report"]


class SettingRuns(NamedTuple):
    """One setting's search trials, chosen values and run states, by method name."""

    setting: Setting
    trials: dict[str, list[Trial]]
    choices: dict[str, dict[str, float]]
    states: dict[str, tuple[RunState, ...]]


class Comparison(NamedTuple):
    """Everything the report shows: the scale (its seeds as run), the methods, and each setting's runs."""

    scale: Scale
    methods: tuple[Method, ...]
    output: Path
    settings: tuple[SettingRuns, ...]


def plan_scale(scale_name: str, seeds: int | None = None, datasets: Sequence[str] = ()) -> Scale:
    """The named scale with ``seeds`` seeds (default its own) and only ``datasets`` (default all).

    Raises:
        ValueError: an unknown scale or dataset, or fewer than ``MIN_SEEDS`` seeds.
    """
    if scale_name not in SCALES:
        raise ValueError(f"scale {scale_name!r}: expected one of {', '.join(SCALES)}")
    scale = SCALES[scale_name]
    if seeds is not None:
        if seeds < MIN_SEEDS:
            raise ValueError(f"--seeds {seeds}: a comparison needs at least {MIN_SEEDS} seeds (its intervals are "
                             "over the seeds)")
        scale = replace(scale, seeds=tuple(SEEDS[0] + i for i in range(seeds)))
    if datasets:
        scale = replace(scale, settings=tuple(scale.setting(name) for name in dict.fromkeys(datasets)))
    return scale


def compare(methods: Sequence[str], scale: Scale, output: Path, data_dir: Path, *, progress: bool = True,
            log: Callable[[str], None] = lambda _: None, source: str | None = None) -> Comparison:
    """Searches each method's hyperparameters, then brings every run to finished (skipping or resuming).

    Every input is checked, and every setting's data found, before any work starts.
    """
    names = tuple(methods)
    check_methods(names)
    if len(scale.seeds) < MIN_SEEDS:
        raise ValueError(f"scale {scale.name!r}: {len(scale.seeds)} seeds; a comparison needs at least {MIN_SEEDS}")
    chosen = tuple(METHODS[name] for name in names)
    settings = tuple(with_data(setting, data_dir, source) for setting in scale.settings)
    found = []
    for setting in settings:
        trials = {m.name: search(scale, setting, m, output, log=log) for m in chosen}
        choices = {name: best(t) for name, t in trials.items()}
        specs = {m.name: tuple(run_spec(scale, setting, m, choices[m.name], seed, output) for seed in scale.seeds)
                 for m in chosen}
        to_do = [s for runs in specs.values() for s in runs if run_state(s).status in ("resumable", "missing")]
        log(f"{setting.name}: {len(to_do)} of {len(chosen) * len(scale.seeds)} runs to run or resume (about "
            f"{sum(estimated_seconds(s.config) for s in to_do) / 60:.0f} min on 2 cores)")
        states = {name: tuple(ensure_run(s, progress=progress, log=log, estimate=estimated_seconds) for s in runs)
                  for name, runs in specs.items()}
        found.append(SettingRuns(setting, trials, choices, states))
    return Comparison(scale, chosen, output, tuple(found))
