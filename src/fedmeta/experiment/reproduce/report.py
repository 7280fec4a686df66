"""The reproduction report: our numbers beside the paper's, plots and a verdict per claim.

Assembled only from run directories on disk (``runs.run_state``), so it can be written
after any subset of the runs: a configuration without a finished run is listed as
missing, and the verdicts that need it say "not run".
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import h5py
import numpy as np

from fedmeta.data.download import dataset_paths
from fedmeta.data.federated import PAPER_HELD_OUT_FRACTION
from fedmeta.experiment.reproduce import figures, plan, verdicts
from fedmeta.experiment.reproduce.paper import TABLE1, THRESHOLD, paper_row
from fedmeta.experiment.reproduce.plan import DataDirs, RunSpec, Scale
from fedmeta.experiment.reproduce.runs import RunRecord, RunState, read_record, run_state
from fedmeta.experiment.reproduce.verdicts import Accuracies, Verdict, mean_interval, paired_interval

PLATEAU_TOLERANCE = 0.01
"""A run has plateaued when both mean accuracies moved by at most this over its last quarter of rounds."""


@dataclass(frozen=True)
class Config:
    """One configuration: its label and its run at each seed (record None: not finished)."""

    label: str
    specs: tuple[RunSpec, ...]
    records: tuple[RunRecord | None, ...]

    @property
    def name(self) -> str:
        """The run name without its seed."""
        return self.specs[0].name.rsplit("-s", 1)[0]

    @property
    def rounds(self) -> int:
        return self.specs[0].config.rounds

    @property
    def complete(self) -> bool:
        return all(r is not None for r in self.records)

    @property
    def accuracies(self) -> Accuracies | None:
        """Per-client initial and personalized (last fine-tuning epoch) accuracy, per seed."""
        if not self.complete:
            return None
        initial = tuple(np.array(r.evaluation["initial_accuracy"]) for r in self.records)
        personalized = tuple(np.array([a[-1] for a in r.evaluation["personalized_accuracy"]]) for r in self.records)
        return Accuracies(initial, personalized)

    def curve(self) -> figures.Curve:
        """Mean accuracy at each evaluated round, averaged over seeds."""
        rows = [r.evaluated for r in self.records]
        count = min(len(r) for r in rows)
        return figures.Curve(
            tuple(rows[0][i]["round"] + 1 for i in range(count)),
            tuple(float(np.mean([r[i]["initial/accuracy"] for r in rows])) for i in range(count)),
            tuple(float(np.mean([r[i]["personalized/accuracy"] for r in rows])) for i in range(count)),
        )

    def rounds_to(self, key: str, threshold: float) -> float | None:
        """Mean over seeds of the rounds ``key`` took to reach ``threshold`` (None if a seed never did)."""
        found = [r.evaluation["rounds_to_threshold"][key].get(f"{threshold:g}") for r in self.records]
        return None if any(f is None for f in found) else float(np.mean(found))

    def plateau(self) -> tuple[float, float] | None:
        """Change of mean (initial, personalized) accuracy over the last quarter of the rounds.

        From the last evaluation at or before 3/4 of the rounds to the last one; None when
        there is no such earlier evaluation.
        """
        curve = self.curve()
        earlier = [i for i, r in enumerate(curve.rounds) if r <= self.rounds - self.rounds // 4]
        if not earlier or earlier[-1] == len(curve.rounds) - 1:
            return None
        i = earlier[-1]
        return curve.initial[-1] - curve.initial[i], curve.personalized[-1] - curve.personalized[i]


@dataclass(frozen=True)
class Collected:
    """Every planned run of a scale and where it stands, with the finished runs' records."""

    scale: Scale
    output: Path
    data: DataDirs
    states: dict[str, RunState]
    records: dict[str, RunRecord]
    missing_data: dict[str, str]

    def config(self, label: str, make: Callable[..., RunSpec], *args: int) -> Config | None:
        """The configuration ``make`` builds at each seed; None when its data was not found."""
        if make is plan.shakespeare_run and self.data.shakespeare is None:
            return None
        specs = tuple(make(self.scale, self.output, self.data, *args, seed) for seed in self.scale.seeds)
        return Config(label, specs, tuple(self.records.get(s.name) for s in specs))


def collect(scale: Scale, output: Path, data_dir: Path, source: str | None = None) -> Collected:
    """Finds every run the scale plans; without Shakespeare's files, that experiment is "not run"."""
    missing_data = {}
    emnist = plan.find_dataset(data_dir, "emnist", source)  # every experiment needs it: no report without
    try:
        shakespeare = plan.find_dataset(data_dir, "shakespeare", source)
    except FileNotFoundError as error:
        shakespeare, missing_data["shakespeare"] = None, str(error)
    data = DataDirs(emnist, shakespeare)
    experiments = tuple(e for e in plan.EXPERIMENTS if e not in missing_data)
    states = {spec.name: run_state(spec) for spec in plan.planned_runs(experiments, scale, output, data)}
    records = {name: read_record(state) for name, state in states.items() if state.status == "finished"}
    return Collected(scale, output, data, states, records, missing_data)


def _writers(directory: Path, max_clients: int | None) -> int:
    """How many writers the run reads: those in the train file, or the first ``max_clients``."""
    with h5py.File(dataset_paths("emnist", directory)[0], "r") as handle:
        count = len(handle["examples"])
    return count if max_clients is None else min(count, max_clients)


def _accuracy(values: Sequence[np.ndarray]) -> str:
    """mean ± std over clients; with several seeds, the 95% interval of the mean over seeds too."""
    means = [float(np.mean(v)) for v in values]
    text = f"{np.mean(means):.4f} ± {np.mean([float(np.std(v)) for v in values]):.3f}"
    if len(values) > 1:
        text += f" (±{mean_interval(means).half_width:.4f} over {len(values)} seeds)"
    return text


def _rounds(value: float | None, budget: int) -> str:
    return f"never in {budget}" if value is None else f"{value:g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]


def _verdict_lines(verdict: Verdict) -> list[str]:
    return [f"**Claim.** {verdict.text}", "", f"**Verdict: {verdict.outcome}.** {verdict.evidence}.", ""]


class Report:
    """Builds the report's markdown and plots from collected runs."""

    def __init__(self, collected: Collected, report_dir: Path, command: str):
        self.c, self.dir, self.command = collected, report_dir, command
        self.scale = collected.scale
        self.plots = report_dir / "plots"
        self.verdicts: list[Verdict] = []
        self.budgets: dict[str, list[str]] = {}
        self.missing: dict[str, str] = {}

    def _seen(self, config: Config) -> None:
        """Records a configuration's budget row and, for unfinished runs, why they are missing."""
        for spec, record in zip(config.specs, config.records):
            state = self.c.states.get(spec.name)
            if record is None:
                self.missing[spec.name] = (
                    f"interrupted after {state.rounds_done} of {spec.config.rounds} rounds (resumable)"
                    if state and state.status == "resumable" else
                    f"diverged: {state.note}" if state and state.status == "diverged" else "not run")
        change = config.plateau() if config.complete else None
        measured = [r.wall_seconds for r in config.records if r is not None]
        evaluation = config.specs[0].config.evaluation
        held_out = (str(len(config.records[0].evaluation["client_ids"])) if config.complete
                    else "all" if evaluation.max_clients is None else f"≤{evaluation.max_clients}")
        plateaued = ("—" if change is None else
                     "yes" if max(abs(change[0]), abs(change[1])) <= PLATEAU_TOLERANCE else "no")
        self.budgets.setdefault(config.name, [
            f"`{config.name}`", str(config.rounds), str(evaluation.every), held_out, str(len(config.specs)),
            f"{plan.estimated_seconds(config.specs[0].config) / 60:.1f}",
            f"{np.mean(measured) / 60:.1f}" if measured else "—",
            "—" if change is None else f"{change[0]:+.4f} / {change[1]:+.4f}", plateaued,
        ])

    def table1(self) -> tuple[list[str], dict[tuple[int, int], Config]]:
        cells = {(c, e): self.c.config(f"c{c}/E{e}", plan.fedavg_run, c, e) for c, e, _ in self.scale.table1}
        rows = []
        for (cohort, epochs), config in cells.items():
            self._seen(config)
            paper = paper_row(cohort, epochs)
            if config.complete:
                acc = config.accuracies
                ours = [_accuracy(acc.initial), _accuracy(acc.personalized), str(paired_interval(acc.gains)),
                        *(f"{_rounds(config.rounds_to('initial/accuracy', t), config.rounds)} / "
                          f"{_rounds(config.rounds_to('personalized/accuracy', t), config.rounds)}"
                          for t in (THRESHOLD, 0.75))]
            else:
                ours = ["missing"] * 5
            theirs = ([f"{paper.initial:g}", f"{paper.personalized:g}", f"{paper.gain:+.4f}",
                       f"{paper.rounds_initial:g} / {paper.rounds_personalized:g}"] if paper else ["—"] * 4)
            rows.append([str(cohort), str(epochs), str(config.rounds), ours[0], theirs[0], ours[1], theirs[1],
                         ours[2], theirs[2], ours[3], theirs[3], ours[4]])
        done = {key: c for key, c in cells.items() if c.complete}
        found = [
            verdicts.personalization_helps({c.label: c.accuracies for c in done.values()}),
            verdicts.threshold_sooner({c.label: (c.rounds_to("initial/accuracy", THRESHOLD),
                                                 c.rounds_to("personalized/accuracy", THRESHOLD))
                                       for c in done.values()}),
            verdicts.epochs_help_personalization({key: c.accuracies for key, c in done.items()},
                                                 {(r.cohort_size, r.local_epochs): r.gain for r in TABLE1}),
        ]
        self.verdicts += found
        lines = [
            "## Table 1: FedAvg, initial and personalized accuracy", "",
            "FedAvg(E) with client SGD lr 0.02, batch 20 and server SGD lr 1.0, momentum 0.9. Ours: mean ± std "
            "over held-out writers at the last evaluation; gain = personalized − initial per writer, with its 95% "
            "interval. Paper: Table 1 (2,500 training / 900 held-out writers of TFF's EMNIST-62). Rounds to a "
            "threshold: initial / personalized.", "",
            *_table(["clients/round", "E", "rounds", "initial (ours)", "initial (paper)", "personalized (ours)",
                     "personalized (paper)", "gain (ours, 95%)", "gain (paper)", f"rounds to {THRESHOLD:g} (ours)",
                     f"rounds to {THRESHOLD:g} (paper)", "rounds to 0.75 (ours)"], rows), "",
        ]
        for verdict in found:
            lines += _verdict_lines(verdict)
        if done:
            cohorts = sorted({cohort for cohort, _ in done})
            figures.plot_curves({f"{cohort} clients/round": {f"E={e}": c.curve() for (k, e), c in done.items()
                                                              if k == cohort} for cohort in cohorts},
                                self.plots / "table1_accuracy_over_rounds.png")
            figures.plot_by_epochs({cohort: [self._epoch_point(k, e, c) for (k, e), c in done.items() if k == cohort]
                                    for cohort in cohorts}, self.plots / "table1_initial_vs_personalized.png")
            figures.plot_gains({c.label: np.concatenate(c.accuracies.gains) for c in done.values()},
                               self.plots / "table1_gain_distribution.png", "Table 1: personalization gain per writer")
            lines += ["![accuracy over rounds; dashed: initial, solid: personalized]"
                      "(plots/table1_accuracy_over_rounds.png)", "",
                      "![initial and personalized accuracy per E, ours and the paper's]"
                      "(plots/table1_initial_vs_personalized.png)", "",
                      "![per-writer personalization gain](plots/table1_gain_distribution.png)", ""]
        return lines, cells

    @staticmethod
    def _epoch_point(cohort: int, epochs: int, config: Config) -> figures.EpochPoint:
        acc, paper = config.accuracies, paper_row(cohort, epochs)
        return figures.EpochPoint(epochs, float(np.mean([a.mean() for a in acc.initial])),
                                  float(np.mean([a.mean() for a in acc.personalized])),
                                  paper.initial if paper else None, paper.personalized if paper else None)

    def _runs_table(self, configs: Sequence[Config]) -> list[str]:
        rows = []
        for config in configs:
            self._seen(config)
            if config.complete:
                acc = config.accuracies
                hurt = np.mean([float(np.mean(g < 0)) for g in acc.gains])
                rows.append([config.label, str(config.rounds), _accuracy(acc.initial), _accuracy(acc.personalized),
                             str(paired_interval(acc.gains)), f"{hurt:.1%}"])
            else:
                rows.append([config.label, str(config.rounds), "missing", "missing", "—", "—"])
        return [*_table(["run", "rounds", "initial", "personalized", "gain (95%)", "clients hurt"], rows), ""]

    def comparisons(self, reference: Config) -> list[str]:
        s, c, sh = self.scale.schedule, self.scale.centralized, self.scale.shakespeare
        panels: dict[str, dict[str, figures.Curve]] = {}
        gains: dict[str, np.ndarray] = {}
        if reference.complete:
            gains[f"FedAvg {reference.label}"] = np.concatenate(reference.accuracies.gains)

        baseline = self.c.config(f"FedAvg c{s.cohort_size}/E{s.local_epochs}", plan.fedavg_run, s.cohort_size,
                                 s.local_epochs)
        two_stage = self.c.config(f"two-stage, Reptile(K={s.local_steps}) from round {s.switch_round}",
                                  plan.two_stage_run)
        schedule = verdicts.schedule_beats_fedavg(baseline.accuracies, two_stage.accuracies)
        lines = [
            "## The two-stage schedule (Algorithm 1) against FedAvg alone", "",
            f"FedAvg(E={s.local_epochs}), {s.cohort_size} clients/round, server SGD lr 1.0, momentum 0.9; the "
            f"two-stage run is the same until round {s.switch_round}, then Reptile(K={s.local_steps}) with server "
            f"Adam lr 0.001. Both run {baseline.rounds} rounds and are personalized alike. The paper states this "
            "claim without a number in Table 1, so only the claim is compared.", "",
            *self._runs_table([baseline, two_stage]), *_verdict_lines(schedule),
        ]
        if baseline.complete and two_stage.complete:
            panels["two-stage vs FedAvg"] = {"FedAvg": baseline.curve(), "two-stage": two_stage.curve()}
            gains["two-stage"] = np.concatenate(two_stage.accuracies.gains)

        central = self.c.config(f"centralized, {c.local_steps} steps/round", plan.centralized_run)
        centralized = verdicts.centralized_personalizes_less(central.accuracies, reference.accuracies)
        lines += [
            "## A centrally trained model against a federated one", "",
            f"SGD (lr 0.02, batch 20) on the pooled train examples of all training writers, {c.local_steps} steps "
            f"a round for {c.rounds} rounds, against the FedAvg reference {reference.label}; both personalized "
            "alike.", "", *self._runs_table([reference, central]), *_verdict_lines(centralized),
        ]
        if central.complete and reference.complete:
            panels["centralized vs FedAvg"] = {f"FedAvg {reference.label}": reference.curve(),
                                               "centralized": central.curve()}
            gains["centralized"] = np.concatenate(central.accuracies.gains)

        speare = self.c.config(f"Shakespeare FedAvg c{sh.cohort_size}/E1", plan.shakespeare_run)
        lines += ["## Shakespeare", ""]
        if speare is None:
            muted = Verdict("shakespeare_muted", "not run", self.c.missing_data["shakespeare"])
            lines += [f"Not run: {self.c.missing_data['shakespeare']}", ""]
        else:
            muted = verdicts.shakespeare_muted(speare.accuracies, reference.accuracies)
            lines += [
                f"Next-character prediction, one client per speaking role, the char LSTM; FedAvg(E=1), "
                f"{sh.cohort_size} roles/round, client SGD lr 1.0, batch 10 (fine-tuned alike), {sh.rounds} "
                "rounds. Its gain is compared with the FEMNIST reference's in absolute accuracy points.", "",
                *self._runs_table([speare, reference]), *_verdict_lines(muted),
            ]
            if speare.complete:
                panels["Shakespeare"] = {"FedAvg": speare.curve()}
                gains["Shakespeare"] = np.concatenate(speare.accuracies.gains)
        self.verdicts += [schedule, centralized, muted]

        if panels:
            figures.plot_curves(panels, self.plots / "comparisons_accuracy_over_rounds.png",
                                {"two-stage vs FedAvg": s.switch_round})
            lines += ["![accuracy over rounds; dashed: initial, solid: personalized; dotted: the switch]"
                      "(plots/comparisons_accuracy_over_rounds.png)", ""]
        if len(gains) > 1:
            figures.plot_gains(gains, self.plots / "comparisons_gain_distribution.png",
                               "personalization gain per client")
            lines += ["![per-client personalization gain](plots/comparisons_gain_distribution.png)", ""]
        return lines

    def write(self) -> Path:
        self.plots.mkdir(parents=True, exist_ok=True)
        table1, cells = self.table1()
        reference = cells.get(self.scale.reference) or self.c.config(
            "c{}/E{}".format(*self.scale.reference), plan.fedavg_run, *self.scale.reference)
        body = table1 + self.comparisons(reference)
        path = self.dir / "report.md"
        path.write_text("\n".join(self._head() + body + self._tail()) + "\n")
        return path

    def _head(self) -> list[str]:
        data = self.c.data
        writers = _writers(data.emnist, self.scale.max_clients)
        held_out = min(max(1, round(PAPER_HELD_OUT_FRACTION * writers)), writers - 1)
        split = (f"{writers:,} writers, of which the held-out fraction 900/3400 (seed 42) holds out {held_out:,} and "
                 f"trains on {writers - held_out:,}")
        if data.official_emnist:
            dataset = (f"TFF's official EMNIST-62 (`fed_emnist_*.h5`), the paper's data: {split} (the paper "
                       "does not publish which writers it held out; this is a seeded draw of the same size)")
        else:
            dataset = (f"FEMNIST built from LEAF (`femnist_*.h5`, real writers): {split}, the paper's 2,500:900 "
                       "ratio. The paper's EMNIST has 3,400 writers; all of this FEMNIST has 396, so these models "
                       "train on about a ninth of the paper's data, or less")
        counts: dict[str, int] = {}
        for state in self.c.states.values():
            counts[state.status] = counts.get(state.status, 0) + 1
        return [
            f"# Reproducing Jiang et al. (2019): `{self.scale.name}` scale", "",
            f"Generated by `{self.command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from the "
            f"runs under `{self.c.output / self.scale.name}` "
            f"({', '.join(f'{n} {status}' for status, n in sorted(counts.items()))}), made by "
            f"`fedmeta reproduce all --scale {self.scale.name}` or its experiments one by one. Each configuration "
            "is its own resumable run; this report only reads them.", "",
            *([self.scale.note, ""] if self.scale.note else []),
            f"- **Data**: {dataset}. Shakespeare: TFF's h5 files, 715 speaking roles"
            + ("" if data.shakespeare is not None else " (not found)") + ".",
            f"- **Seeds**: {', '.join(str(s) for s in self.scale.seeds)}. In fedmeta the run seed draws the "
            "held-out split as well as the initial model and the cohorts; the first seed, 42, is the split.",
            f"- **Evaluation**: held-out writers (roles), {self.scale.fine_tune_epochs} epoch(s) of fine-tuning "
            "with the client optimizer, each client counted once.", "",
            "## Verdicts", "", *_table(["claim", "verdict"], [[v.text, f"**{v.outcome}**"] for v in self.verdicts]),
            "",
        ]

    def _tail(self) -> list[str]:
        missing = [f"- `{name}`: {why}" for name, why in self.missing.items()]
        return [
            "## Budgets, time and plateau", "",
            "Estimated (from costs measured on 2 cores, `plan.estimated_seconds`) and measured wall time per run "
            "(training and evaluation, minutes, mean over seeds), and how much the mean "
            "initial / personalized accuracy changed over the last quarter of the rounds (from the last evaluation "
            f"at or before 3/4 of them to the end). A run has plateaued when both changed by at most "
            f"{PLATEAU_TOLERANCE:g}.", "",
            *_table(["run", "rounds", "evaluated every", "held-out evaluated", "seeds", "estimated min", "measured min",
                     "last-quarter change (initial / personalized)", "plateaued"], list(self.budgets.values())), "",
            *(["### Missing runs", "", *missing, "",
               f"Run `fedmeta reproduce all --scale {self.scale.name}` to finish them (finished runs are skipped, "
               "interrupted ones resumed), then `fedmeta reproduce report` again.", ""] if missing else []),
            "## How the verdicts are decided (fixed before any run)", "",
            "- A difference counts only when its 95% interval excludes 0: with one seed, a paired t interval over "
            "held-out clients on per-client differences (both arms share the seed, hence the clients); with several "
            "seeds, a t interval over the seeds' mean differences.",
            "- A claim checked in several configurations is *reproduced* when it holds in all, *partly* when in "
            "some, *not reproduced* when in none; *not testable* when no configuration can decide it; *not run* "
            "when its runs are missing.",
            f"- Rounds to {THRESHOLD:g} use the paper's threshold, read at the evaluated rounds (exact to one "
            "evaluation interval); a configuration where neither accuracy reached it cannot decide. Rounds to 0.75 "
            "are shown for information only, since our smaller FEMNIST may plateau near 0.8; no verdict uses them.",
            "- Larger E helps personalized accuracy more than initial accuracy when, per cohort size, "
            "gain(E_max) − gain(E_min) > 0: the same as personalized accuracy rising more with E than initial "
            "accuracy.",
            "- The centralized model's initial accuracy is *good* unless significantly below the FedAvg "
            "reference's on the same data (what is good depends on the data); it *gains less* when FedAvg's gain "
            "minus its gain is significantly above 0. Both: reproduced; one: partly.",
            "- Shakespeare's gains are *muted* when FEMNIST's gain minus Shakespeare's (absolute accuracy points; "
            "an unpaired interval, the clients differ) is significantly above 0; *partly* when smaller but not "
            "significantly.", "",
        ]


def write_report(scale: Scale, output: Path, data_dir: Path, report_dir: Path | None = None, *,
                 command: str = "fedmeta reproduce report", source: str | None = None) -> Path:
    """Writes ``report.md`` and ``plots/`` for the runs present; returns the report's path.

    ``report_dir`` defaults to ``output/<scale>``; ``source`` names where ``data_dir``
    came from in errors (default ``--data-dir DIR``).
    """
    collected = collect(scale, output, data_dir, source)
    report_dir = report_dir or output / scale.name
    report_dir.mkdir(parents=True, exist_ok=True)
    return Report(collected, report_dir, command).write()
