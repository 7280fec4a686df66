"""The privacy-utility study behind ``docs/privacy/``: DP-FedAvg on FEMNIST at several ε, judged on held-out writers.

Each ε is one FedAvg run with the paper's client optimizer and server SGD lr 1.0, each
training writer joining a round with probability cohort/N (Poisson sampling, as the
accountant assumes), the noise multiplier set before the run from the target ε and the
clip norm adapted to the median update norm (Andrew et al. 2021). The server takes no
momentum: the paper's 0.9 multiplies the noise's walk tenfold, and at ε = 1 it diverged
within four rounds. ε = ∞ is the same run without ``[privacy]``. All runs share the seed,
hence the held-out writers, so the report pairs each private run with the non-private one
writer by writer. The accountant then shows the noise larger populations would need for
the same ε.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np

from fedmeta.experiment.compare.report import checked_accuracies
from fedmeta.experiment.config import (
    AlgorithmConfig, DataConfig, EngineConfig, EvaluationConfig, ExperimentConfig, ModelConfig, PrivacyConfig,
)
from fedmeta.experiment.reproduce.figures import DPI, PLOTS
from fedmeta.experiment.reproduce.findings import SeededRuns, accuracy_cell
from fedmeta.experiment.reproduce.markdown import table
from fedmeta.experiment.reproduce.plan import CLIENT, SPLIT_SEED, RunSpec, find_dataset
from fedmeta.experiment.reproduce.runs import RunState, ensure_run, read_record, run_state
from fedmeta.experiment.reproduce.verdicts import Interval, mean_interval, paired_differences
from fedmeta.plots import pyplot

FIGURE = "privacy_utility.png"
"""The figure's file name in ``plots/``, beside the report."""


@dataclass(frozen=True)
class Study:
    """The study at one scale: the target ε of its private runs (a run without privacy is always added).

    ``delta`` is fixed before the data is read and must stay below 1/N; ``clip`` is the
    initial clip norm, adapted toward the ``target_quantile`` of update norms (None: fixed),
    with noise of std ``clipped_count_stddev`` on the count of unclipped updates: Andrew et
    al. suggest cohort/20, but the strongest ε needs more to split its noise (cohort/10).
    ``populations`` are the larger populations the report computes the noise for.
    """

    name: str
    epsilons: tuple[float, ...]
    rounds: int
    cohort_size: int
    local_epochs: int
    delta: float
    clip: float
    target_quantile: float | None
    clipped_count_stddev: float
    evaluations: int
    held_out_clients: int | None
    fine_tune_epochs: int = 2
    max_clients: int | None = None
    workers: int | None = None
    populations: tuple[int, ...] = (3_400, 1_000_000)


STUDIES = {
    # every code path in seconds on 30 writers; its numbers mean nothing (a tiny clip: 22 writers
    # cannot average out the noise, and a clip of 1 diverges)
    "smoke": Study("smoke", (1.0, 8.0), rounds=2, cohort_size=3, local_epochs=1, delta=1e-2, clip=0.01,
                   target_quantile=0.5, clipped_count_stddev=2.0, evaluations=1, held_out_clients=4,
                   fine_tune_epochs=1, max_clients=30, workers=0, populations=(1_000_000,)),
    # FEMNIST's 396 writers (291 train, 105 held out), FedAvg c20/E2: about 15 min on 2 cores
    "full": Study("full", (1.0, 3.0, 8.0), rounds=100, cohort_size=20, local_epochs=2, delta=1e-3, clip=1.0,
                  target_quantile=0.5, clipped_count_stddev=2.0, evaluations=3, held_out_clients=None),
}


def run_name(study: Study, epsilon: float | None) -> str:
    privacy = "nodp" if epsilon is None else f"eps{epsilon:g}"
    return f"fedavg-c{study.cohort_size}-e{study.local_epochs}-{privacy}-s{SPLIT_SEED}"


def study_run(study: Study, output: Path, data: Path, epsilon: float | None) -> RunSpec:
    """The run at ``epsilon`` (None: without privacy); every run has the same seed, data and schedule."""
    name = run_name(study, epsilon)
    privacy = PrivacyConfig() if epsilon is None else PrivacyConfig(
        target_epsilon=epsilon, delta=study.delta, clip=study.clip, target_quantile=study.target_quantile,
        clipped_count_stddev=study.clipped_count_stddev, sampling="poisson")
    every = -(-study.rounds // study.evaluations)
    config = ExperimentConfig(
        name=name, seed=SPLIT_SEED, rounds=study.rounds, output_dir=str(output / study.name),
        checkpoint_every=min(5, every),
        data=DataConfig(kind="emnist", path=str(data), max_clients=study.max_clients),
        model=ModelConfig("fedavg_cnn"),
        algorithm=AlgorithmConfig(name="fedavg", cohort_size=study.cohort_size, local_epochs=study.local_epochs,
                                  server_optimizer="sgd", server_lr=1.0, **CLIENT),
        evaluation=EvaluationConfig(every=every, max_clients=study.held_out_clients,
                                    fine_tune_epochs=study.fine_tune_epochs, fine_tune_optimizer="sgd",
                                    fine_tune_lr=CLIENT["client_lr"],
                                    fine_tune_batch_size=CLIENT["client_batch_size"]),
        engine=EngineConfig(workers=study.workers),
        privacy=privacy,
    )
    return RunSpec(name, config)


def study_runs(study: Study, output: Path, data: Path) -> list[RunSpec]:
    """The non-private run first (the reference), then the private ones from the weakest privacy."""
    return [study_run(study, output, data, None)] + [study_run(study, output, data, e)
                                                     for e in sorted(study.epsilons, reverse=True)]


def run_study(study: Study, output: Path, data_dir: Path, *, progress: bool = True,
              log: Callable[[str], None] = lambda _: None, source: str | None = None) -> list[RunState]:
    """Brings every run of the study to finished: skips finished ones, resumes interrupted ones."""
    specs = study_runs(study, output, find_dataset(data_dir, "emnist", source))
    return [ensure_run(spec, progress=progress, log=log) for spec in specs]


class Row(NamedTuple):
    """One run as the report shows it; the ``versus`` intervals are against the non-private run."""

    epsilon: float | None
    runs: SeededRuns
    privacy: dict
    initial_versus: Interval | None
    personalized_versus: Interval | None


def _versus(reference: SeededRuns, runs: SeededRuns, key: str) -> Interval:
    a, b = reference.records[0].evaluation, runs.records[0].evaluation
    last = (lambda e: [x[-1] for x in e[key]]) if key == "personalized_accuracy" else (lambda e: e[key])
    return mean_interval(paired_differences(a["client_ids"], last(a), b["client_ids"], last(b),
                                            f"{runs.name} against {reference.name}"))


def study_rows(study: Study, states: Sequence[RunState]) -> list[Row]:
    """The finished runs' rows, the non-private one first; unfinished runs are left out (the report names them)."""
    epsilons = [None, *sorted(study.epsilons, reverse=True)]
    seeded = [SeededRuns("no DP" if e is None else f"ε = {e:g}", (s.spec,),
                         (read_record(s) if s.status == "finished" else None,)) for e, s in zip(epsilons, states)]
    reference = seeded[0] if seeded[0].complete else None
    rows = []
    for epsilon, runs in zip(epsilons, seeded):
        if not runs.complete:
            continue
        compared = reference is not None and runs is not reference
        rows.append(Row(epsilon, runs, runs.records[0].evaluation.get("privacy", {}),
                        _versus(reference, runs, "initial_accuracy") if compared else None,
                        _versus(reference, runs, "personalized_accuracy") if compared else None))
    return rows


def _cell(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _results_table(rows: Sequence[Row]) -> list[str]:
    header = ["run", "ε reached (δ)", "noise multiplier z", "final clip C", "initial", "personalized",
              "gain [95%]", "share hurt", "initial − no DP [95%]", "personalized − no DP [95%]"]
    body = []
    for row in rows:
        acc = checked_accuracies(row.runs)
        p = row.privacy
        reached = f"{p['epsilon']:.3f} ({p['delta']:g})" if p else "∞"
        body.append([row.runs.label, reached, _cell(p.get("noise_multiplier"), ".4f"), _cell(p.get("clip"), ".4f"),
                     accuracy_cell(acc.initial), accuracy_cell(acc.personalized), str(mean_interval(acc.gains[0])),
                     f"{float(np.mean(acc.gains[0] < 0)):.1%}", str(row.initial_versus or "—"),
                     str(row.personalized_versus or "—")])
    return table(header, body)


def population_rows(study: Study, trained: int, population: int,
                    calibrate: Callable[..., float]) -> list[list[str]]:
    """Per target ε, the noise multiplier and the noise on the mean update, for ``population`` training clients.

    Two ways to grow from the study's ``trained`` clients: the same cohort size (the
    per-round sampling rate falls), or the same sampling rate (the cohort grows with the
    population). At the study's own population the two coincide: one row, "same cohort".
    δ is the study's, or N^−1.1 where that is smaller (δ must stay below 1/N).
    ``calibrate`` is ``fedmeta.algorithms.accounting.calibrate_noise_multiplier``.
    """
    rows = []
    delta = min(study.delta, population ** -1.1)
    grown = [("same cohort", study.cohort_size)]
    if population != trained:
        grown.append(("same rate", max(1, round(study.cohort_size * population / trained))))
    for epsilon in study.epsilons:
        for label, size in grown:
            z = calibrate(epsilon, study.rounds, size, population, delta, "rdp", "poisson")
            rows.append([f"{epsilon:g}", f"{population:,}", f"{delta:.2g}", label, f"{size:,}", f"{z:.3f}",
                         f"{z * study.clip / size:.2e}"])
    return rows


def study_states(study: Study, output: Path, data: Path) -> list[RunState]:
    return [run_state(spec) for spec in study_runs(study, output, data)]


def plot_privacy_utility(rows: Sequence[Row], path: Path) -> None:
    """Initial and personalized accuracy (mean over held-out writers, 95% interval) at each ε, ∞ last."""
    ordered = sorted(rows, key=lambda r: math.inf if r.epsilon is None else r.epsilon)
    labels = ["∞" if r.epsilon is None else f"{r.epsilon:g}" for r in ordered]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 3.4), layout="constrained")
    for key, style, name in (("initial", "--", "initial"), ("personalized", "-", "personalized")):
        intervals = [mean_interval(getattr(checked_accuracies(r.runs), key)[0]) for r in ordered]
        ax.errorbar(range(len(ordered)), [i.mean for i in intervals], yerr=[i.half_width for i in intervals],
                    linestyle=style, marker="o", markersize=4, capsize=3, color="black", label=name)
    ax.set_xticks(range(len(ordered)), labels)
    ax.set(xlabel="ε (user level)", ylabel="accuracy (held-out writers)", title="DP-FedAvg on FEMNIST")
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _setup(study: Study, rows: Sequence[Row]) -> list[str]:
    private = next((r.privacy for r in rows if r.privacy), None)
    population = f"{private['population']} training writers" if private else "the training writers"
    clip = (f"adaptive (Andrew et al. 2021): starts at {study.clip:g}, moves toward the median update norm, "
            f"noise std {study.clipped_count_stddev:g} on the count of unclipped updates"
            if study.target_quantile is not None else f"fixed at {study.clip:g}")
    return table(["setting", "value"], [
        ["data", f"FEMNIST, {population}; the held-out writers of seed {SPLIT_SEED}, "
                 f"{'all' if study.held_out_clients is None else study.held_out_clients} evaluated"],
        ["training", f"FedAvg, {study.rounds} rounds, E = {study.local_epochs}, client SGD lr "
                     f"{CLIENT['client_lr']:g} batch {CLIENT['client_batch_size']}, server SGD lr 1.0 (no momentum)"],
        ["cohorts", f"Poisson: each training writer joins a round with probability {study.cohort_size}/N; "
                    f"the noisy sum is divided by {study.cohort_size}; the run without privacy draws exactly "
                    f"{study.cohort_size} and averages by examples, as FedAvg does"],
        ["privacy", f"user level, δ = {study.delta:g}, RDP accountant; noise multiplier the smallest whose ε after "
                    f"{study.rounds} rounds is at most the target"],
        ["clip norm", clip],
        ["personalization", f"{study.fine_tune_epochs} epoch(s) of client SGD lr {CLIENT['client_lr']:g} on each "
                            "held-out writer's train split, tested on its test split"],
    ])


def _populations(study: Study, rows: Sequence[Row]) -> list[str]:
    private = next((r.privacy for r in rows if r.privacy), None)
    if private is None:
        return ["No private run finished, so the study's population is not known yet.", ""]
    from fedmeta.algorithms.accounting import calibrate_noise_multiplier

    trained = private["population"]
    body = [row for population in (trained, *study.populations)
            for row in population_rows(study, trained, population, calibrate_noise_multiplier)]
    return [
        f"The noise multiplier z each target ε needs after {study.rounds} rounds (RDP, Poisson sampling), and the "
        f"standard deviation of the noise on the averaged update, z·C/m per coordinate (C = {study.clip:g}, the "
        "initial clip), for this study's population and larger ones: with the same cohort of "
        f"{study.cohort_size} writers (a lower sampling rate), and with the same sampling rate (the cohort grows "
        "with the population).", "",
        *table(["target ε", "training clients N", "δ", "grown with", "cohort m", "z", "noise std on the mean"],
               body), "",
    ]


def render(study: Study, rows: Sequence[Row], missing: Sequence[str], *, command: str, generated: str,
           diverged: Sequence[str] = ()) -> str:
    """The report as markdown: setup, results against the run without privacy, and larger populations.

    ``missing`` names runs a rerun would resume; ``diverged`` (name and reason) runs it
    would skip, since the same seed and noise diverge again.
    """
    lines = [
        "# DP-FedAvg on FEMNIST: privacy against personalization", "",
        f"Generated by `{command}` on {generated}. One seed ({SPLIT_SEED}); every run holds out the same writers, "
        "so each private run is compared with the run without privacy writer by writer (a paired t interval over "
        "writers; runs whose writers differ are refused). Fine-tuning happens on the held-out writer's own "
        "device from the released model, so it costs the training population no privacy.", "",
        "## Setup", "", *_setup(study, rows), "",
        "## Results", "",
    ]
    if rows:
        lines += [*_results_table(rows), "", f"![accuracy at each ε]({PLOTS}/{FIGURE})", ""]
    if missing:
        lines += ["Not finished yet (run the command again to resume them):", "",
                  *[f"- `{name}`" for name in missing], ""]
    if diverged:
        lines += ["Diverged (the same seed draws the same noise, so a rerun diverges again and is skipped):", "",
                  *[f"- `{name}`" for name in diverged], ""]
    lines += ["## What larger populations would need", "", *_populations(study, rows)]
    return "\n".join(lines)


def write_report(study: Study, output: Path, data_dir: Path, report_dir: Path | None = None, *,
                 command: str = "fedmeta privacy-study", source: str | None = None) -> Path:
    """Writes ``report.md`` and ``plots/`` from the runs present (default ``output/<scale>``); returns its path."""
    states = study_states(study, output, find_dataset(data_dir, "emnist", source))
    rows = study_rows(study, states)
    missing = [s.spec.name for s in states if s.status in ("missing", "resumable")]
    diverged = [f"{s.spec.name}: {s.note}" for s in states if s.status == "diverged"]
    report_dir = report_dir or output / study.name
    if rows:
        plot_privacy_utility(rows, report_dir / PLOTS / FIGURE)
    path = report_dir / "report.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(study, rows, missing, command=command, diverged=diverged,
                           generated=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())))
    return path
