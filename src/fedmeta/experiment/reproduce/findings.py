"""What the reproduction report shows, computed from the collected runs: its numbers, rows and verdicts.

Pure: it reads no file and draws nothing. ``find`` gathers each configuration the report
shows as ``SeededRuns`` (its run at each seed) and decides the verdicts; the ``*_row``
functions format the tables' cells; ``markdown`` lays them out and ``figures`` plots them.
The *Why the gap* studies beyond the writer count are in ``gap``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple, Sequence, TypeVar

import numpy as np

from fedmeta.experiment.reproduce import plan, verdicts
from fedmeta.experiment.reproduce.collect import Collected
from fedmeta.experiment.reproduce.paper import TABLE1, THRESHOLD, paper_row
from fedmeta.experiment.reproduce.plan import RunSpec
from fedmeta.experiment.reproduce.runs import RunRecord, RunState
from fedmeta.experiment.reproduce.verdicts import Accuracies, Verdict, mean_interval, paired_interval

PLATEAU_TOLERANCE = 0.01
"""A run has plateaued when both mean accuracies moved by at most this over its last quarter of rounds."""
SMOOTHING = 3
"""Verdicts read each writer's accuracy averaged over a run's last this many evaluations, and the plateau check
compares means over this many: one evaluation alone swings by several points (at 5 clients a round, initial
accuracy went 0.65, 0.77, 0.74 over three evaluations of one run)."""

TABLE1_CLAIMS = ("personalization_helps", "threshold_sooner", "epochs_help_personalization")
"""The claims Table 1's cells decide; the comparisons decide the others."""


class Curve(NamedTuple):
    """Mean initial and personalized accuracy (over seeds) at each evaluated round."""

    rounds: tuple[int, ...]
    initial: tuple[float, ...]
    personalized: tuple[float, ...]


class EpochPoint(NamedTuple):
    """One Table 1 cell: ours and, where the paper has the row, the paper's accuracies."""

    local_epochs: int
    initial: float
    personalized: float
    paper_initial: float | None
    paper_personalized: float | None


@dataclass(frozen=True)
class SeededRuns:
    """One configuration: its label and its run at each seed (record None: not finished).

    Its numbers come from ``finished``, the seeds finished so far in the scale's order:
    ``reproduce all`` finishes every configuration's first seed before any further one, so
    a scale stopped part-way still shows each configuration at the seeds it has, and the
    verdicts that read one before all its seeds finished are marked provisional.
    """

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
    def finished(self) -> tuple[RunRecord, ...]:
        """The records of the leading seeds that finished (none when the first seed has not)."""
        return tuple(itertools.takewhile(lambda record: record is not None, self.records))

    @property
    def so_far(self) -> str:
        """The label, with how many of its seeds finished when not all did."""
        if self.complete:
            return self.label
        done = len(self.finished)
        return f"{self.label} ({done} of {len(self.records)} seeds)" if done else f"{self.label} (no seed yet)"

    @property
    def accuracies(self) -> Accuracies | None:
        """Per-client initial and personalized (last fine-tuning epoch) accuracy, per finished seed (``smoothed``)."""
        if not self.finished:
            return None
        initial, personalized = zip(*(smoothed(r, "accuracy") for r in self.finished))
        ids = tuple(tuple(r.evaluation["client_ids"]) for r in self.finished if "client_ids" in r.evaluation)
        return Accuracies(initial, personalized, ids if len(ids) == len(self.finished) else ())

    @property
    def smoothed_rounds(self) -> tuple[int, ...]:
        """The rounds of the evaluations ``accuracies`` averages (the first seed's; every seed evaluates alike)."""
        return tuple(e["round"] for e in self.finished[0].last_evaluations(SMOOTHING))

    @property
    def tuned(self) -> tuple[Accuracies, Accuracies] | None:
        """At the seeds where fine-tuning was chosen on training clients (``fedmeta reproduce finetune``; the
        scale's first ones), if any: the accuracies of the final checkpoint with our fine-tuning and with the
        chosen one. The choice is evaluated on the final checkpoint alone, so the default is too, not
        ``smoothed`` over the last evaluations: both sides then share the model and its initial accuracy."""
        records = [r for r in self.finished if r.tuned is not None]
        if not records:
            return None
        default = [smoothed(r, "accuracy", evaluations=1) for r in records]
        tuned = [r.tuned for r in records]
        ids = tuple(tuple(t["client_ids"]) for t in tuned)
        return (Accuracies(tuple(i for i, _ in default), tuple(p for _, p in default),
                           ids if all("client_ids" in r.evaluation for r in records) else ()),
                Accuracies(tuple(np.array(t["initial_accuracy"]) for t in tuned),
                           tuple(np.array([a[-1] for a in t["personalized_accuracy"]]) for t in tuned), ids))

    def curve(self) -> Curve:
        """Mean accuracy at each evaluated round, averaged over the finished seeds."""
        rows = [r.evaluated for r in self.finished]
        count = min(len(r) for r in rows)
        return Curve(
            tuple(rows[0][i]["round"] for i in range(count)),
            tuple(float(np.mean([r[i]["initial/accuracy"] for r in rows])) for i in range(count)),
            tuple(float(np.mean([r[i]["personalized/accuracy"] for r in rows])) for i in range(count)),
        )

    def rounds_to(self, key: str, threshold: float) -> float | None:
        """Mean over finished seeds of the rounds ``key`` took to reach ``threshold`` (None if one never did)."""
        found = [r.evaluation["rounds_to_threshold"][key].get(f"{threshold:g}") for r in self.finished]
        return None if any(f is None for f in found) else float(np.mean(found))

    def plateau(self) -> tuple[float, float] | None:
        """Change of mean (initial, personalized) accuracy over the last quarter of the rounds, smoothed.

        The mean of the last ``SMOOTHING`` evaluations less the mean of the ``SMOOTHING`` up
        to the last one at or before 3/4 of the rounds (fewer where the run has fewer);
        None when there is no such earlier evaluation.
        """
        curve = self.curve()
        windows = _plateau_windows(curve.rounds, self.rounds)
        if windows is None:
            return None

        def change(values: tuple[float, ...]) -> float:
            return float(np.mean([values[i] for i in windows[1]]) - np.mean([values[i] for i in windows[0]]))

        return change(curve.initial), change(curve.personalized)

    def plateau_from(self) -> int | None:
        """The first round whose evaluation the plateau check reads (None when it cannot run)."""
        rounds = self.curve().rounds
        windows = _plateau_windows(rounds, self.rounds)
        return None if windows is None else rounds[windows[0][0]]


def _plateau_windows(evaluated: tuple[int, ...], budget: int) -> tuple[range, range] | None:
    """Indices of the evaluations the plateau check compares: the ``SMOOTHING`` up to 3/4 of ``budget``, the last."""
    earlier = [i for i, r in enumerate(evaluated) if r <= budget - budget // 4]
    if not earlier or earlier[-1] == len(evaluated) - 1:
        return None
    i, last = earlier[-1], len(evaluated) - 1
    return range(max(0, i + 1 - SMOOTHING), i + 1), range(max(0, last + 1 - SMOOTHING), last + 1)


def smoothed(record: RunRecord, metric: str, evaluations: int = SMOOTHING) -> tuple[np.ndarray, np.ndarray]:
    """Each client's initial and personalized (last fine-tuning epoch) ``metric``, averaged over the run's last
    ``evaluations`` (its last alone for a run that kept no others); NaN where a client has none."""
    last = record.last_evaluations(evaluations)
    initial = np.mean([np.asarray(e[f"initial_{metric}"], dtype=np.float64) for e in last], axis=0)
    personalized = np.mean([np.asarray([p[-1] for p in e[f"personalized_{metric}"]], dtype=np.float64)
                            for e in last], axis=0)
    return initial, personalized


class Findings(NamedTuple):
    """The configurations the report shows, and its verdicts by claim, in the report's order.

    ``table1`` maps (clients per round, E) to its cell; ``baseline`` is the Table 1 cell
    the two-stage run compares with under its own label, ``reference`` the one the
    centralized and Shakespeare runs compare with; ``shakespeare`` is None without its data;
    ``writers`` maps a cell of the writer-count study to its runs by number of training
    writers (the largest: the Table 1 cell on all of them).
    """

    table1: dict[tuple[int, int], SeededRuns]
    baseline: SeededRuns
    two_stage: SeededRuns
    reference: SeededRuns
    centralized: SeededRuns
    shakespeare: SeededRuns | None
    writers: dict[tuple[int, int], dict[int, SeededRuns]]
    verdicts: dict[str, Verdict]

    @property
    def table1_shown(self) -> dict[tuple[int, int], SeededRuns]:
        """The Table 1 cells with a finished run (at their first seed at least)."""
        return {key: cell for key, cell in self.table1.items() if cell.finished}

    @property
    def switch_round(self) -> int:
        """The round where the two-stage run switches to Reptile."""
        return self.two_stage.specs[0].config.algorithm.switch_round

    @property
    def shown(self) -> tuple[SeededRuns, ...]:
        """Every configuration in the order the report's tables show it, a repeated one again."""
        speare = () if self.shakespeare is None else (self.shakespeare, self.reference)
        writers = tuple(runs for by_count in self.writers.values() for runs in by_count.values())
        return (*self.table1.values(), self.baseline, self.two_stage, self.reference, self.centralized, *speare,
                *writers)


def _seeded(collected: Collected, label: str, make: Callable[..., RunSpec], *args: int) -> SeededRuns:
    """The configuration ``make`` builds, at each seed of the scale, with the records found."""
    scale = collected.scale
    specs = tuple(spec for spec in (make(scale, collected.output, collected.data, *args, seed)
                                    for seed in scale.seeds + scale.more_seeds)
                  if spec.config.seed in plan.seeds_of(scale, spec.config))
    return SeededRuns(label, specs, tuple(collected.records.get(s.name) for s in specs))


def first_seeds(accuracies: Accuracies | None, count: int) -> Accuracies | None:
    """``accuracies`` at their first ``count`` seeds: a configuration run at more seeds, beside one run at fewer."""
    if accuracies is None:
        return None
    return Accuracies(accuracies.initial[:count], accuracies.personalized[:count], accuracies.client_ids[:count])


Key = TypeVar("Key")


def common_seeds(arms: Mapping[Key, SeededRuns]) -> dict[Key, Accuracies | None]:
    """Each arm's ``accuracies`` at the seeds every arm has finished: a paired comparison pairs seed by seed.

    None for every arm while one of them has no finished seed.
    """
    if not arms:
        return {}
    count = min(len(runs.finished) for runs in arms.values())
    return {key: first_seeds(runs.accuracies, count) if count else None for key, runs in arms.items()}


def unfinished(*arms: SeededRuns) -> list[str]:
    """The arms of a comparison that would bring more seeds to it once they finish, as ``so_far`` names them."""
    used = min(len(runs.records) for runs in arms)
    return [runs.so_far for runs in arms if len(runs.finished) < used]


def by_cohort(cells: Mapping[tuple[int, int], SeededRuns]) -> dict[tuple[int, int], Accuracies]:
    """Table 1 cells with a finished seed, each cohort size's cells at the seeds all of them have."""
    aligned = {}
    for cohort in sorted({k for k, _ in cells}):
        aligned |= common_seeds({key: cell for key, cell in cells.items() if key[0] == cohort})
    return aligned


def find(collected: Collected) -> Findings:
    """Gathers the report's configurations from the collected runs and decides every claim."""
    scale = collected.scale
    s, c, sh = scale.schedule, scale.centralized, scale.shakespeare
    table1 = {(k, e): _seeded(collected, f"c{k}/E{e}", plan.fedavg_run, k, e) for k, e, _ in scale.table1}
    reference = table1.get(scale.reference) or _seeded(collected, "c{}/E{}".format(*scale.reference),
                                                        plan.fedavg_run, *scale.reference)
    baseline = _seeded(collected, f"FedAvg c{s.cohort_size}/E{s.local_epochs}", plan.fedavg_run, s.cohort_size,
                       s.local_epochs)
    two_stage = _seeded(collected, f"two-stage, Reptile(K={s.local_steps}) from round {s.switch_round}",
                        plan.two_stage_run)
    central = _seeded(collected, f"centralized, {c.local_steps} steps/round", plan.centralized_run)
    speare = (None if collected.data.shakespeare is None else
              _seeded(collected, f"Shakespeare FedAvg c{sh.cohort_size}/E1", plan.shakespeare_run))
    if speare is None:
        muted = Verdict("shakespeare_muted", "not run", collected.missing_data["shakespeare"])
    else:
        arms = common_seeds({"speare": speare, "reference": reference})
        muted = verdicts.shakespeare_muted(arms["speare"], arms["reference"]).provisional(
            unfinished(speare, reference))
    shown = {key: cell for key, cell in table1.items() if cell.finished}
    trained_on_all = collected.writers - collected.held_out_writers
    writers = {(k, e): {n or trained_on_all: _seeded(collected, f"c{k}/E{e}, {n or trained_on_all} writers",
                                                     plan.writers_run, k, e, n)
                        for n in (*scale.writers.counts, None)}
               for k, e in scale.writers.cells}
    waiting = [cell.so_far for cell in table1.values() if not cell.complete]
    schedule = common_seeds({"fedavg": baseline, "two_stage": two_stage})
    central_arms = common_seeds({"central": central, "fedavg": reference})
    found = [
        verdicts.personalization_helps({cell.label: cell.accuracies for cell in shown.values()}
                                       ).provisional(waiting),
        verdicts.threshold_sooner({cell.label: (cell.rounds_to("initial/accuracy", THRESHOLD),
                                                cell.rounds_to("personalized/accuracy", THRESHOLD))
                                   for cell in shown.values()}).provisional(waiting),
        verdicts.epochs_help_personalization(by_cohort(shown),
                                             {(r.cohort_size, r.local_epochs): r.gain for r in TABLE1}
                                             ).provisional(waiting),
        verdicts.schedule_beats_fedavg(schedule["fedavg"], schedule["two_stage"]).provisional(
            unfinished(baseline, two_stage)),
        verdicts.centralized_personalizes_less(central_arms["central"], central_arms["fedavg"]).provisional(
            unfinished(central, reference)),
        muted,
        verdicts.gain_grows_with_writers({f"c{k}/E{e}": common_seeds({n: runs for n, runs in by_count.items()
                                                                      if runs.finished})
                                          for (k, e), by_count in writers.items()}).provisional(
            [runs.so_far for by_count in writers.values() for runs in by_count.values() if not runs.complete]),
    ]
    return Findings(table1, baseline, two_stage, reference, central, speare, writers, {v.claim: v for v in found})


def accuracy_cell(values: Sequence[np.ndarray]) -> str:
    """mean ± std over clients; with several seeds, the 95% interval of the mean over seeds too."""
    means = [float(np.mean(v)) for v in values]
    text = f"{np.mean(means):.4f} ± {np.mean([float(np.std(v)) for v in values]):.3f}"
    if len(values) > 1:
        text += f" (±{mean_interval(means).half_width:.4f} over {len(values)} seeds)"
    return text


def _rounds_cell(value: float | None, budget: int) -> str:
    return f"never in {budget}" if value is None else f"{value:g}"


def table1_row(cohort: int, epochs: int, cell: SeededRuns) -> list[str]:
    """Ours beside the paper's: accuracies, gain, rounds to the paper's threshold and to 0.75."""
    paper = paper_row(cohort, epochs)
    if cell.finished:
        acc = cell.accuracies
        ours = [accuracy_cell(acc.initial), accuracy_cell(acc.personalized), str(paired_interval(acc.gains)),
                *(f"{_rounds_cell(cell.rounds_to('initial/accuracy', t), cell.rounds)} / "
                  f"{_rounds_cell(cell.rounds_to('personalized/accuracy', t), cell.rounds)}"
                  for t in (THRESHOLD, 0.75))]
    else:
        ours = ["missing"] * 5
    theirs = ([f"{paper.initial:g}", f"{paper.personalized:g}", f"{paper.gain:+.4f}",
               f"{paper.rounds_initial:g} / {paper.rounds_personalized:g}"] if paper else ["—"] * 4)
    seeds = "" if cell.complete or not cell.finished else f" ({len(cell.finished)} of {len(cell.records)} seeds)"
    return [str(cohort), str(epochs), f"{cell.rounds}{seeds}", ours[0], theirs[0], ours[1], theirs[1],
            ours[2], theirs[2], ours[3], theirs[3], ours[4]]


def runs_row(runs: SeededRuns) -> list[str]:
    """A comparison's row: accuracies, gain and the share of clients personalization hurt."""
    if not runs.finished:
        return [runs.label, str(runs.rounds), "missing", "missing", "—", "—"]
    acc = runs.accuracies
    hurt = np.mean([float(np.mean(g < 0)) for g in acc.gains])
    return [runs.so_far, str(runs.rounds), accuracy_cell(acc.initial), accuracy_cell(acc.personalized),
            str(paired_interval(acc.gains)), f"{hurt:.1%}"]


def budget_row(runs: SeededRuns) -> list[str]:
    """Rounds, evaluations (the averaged ones), estimated and measured minutes, the CPUs measured on, the median
    round's seconds, and whether the run plateaued (which a two-stage run that switches within the rounds
    the check reads cannot tell: the change then measures the switch).

    The median round is there because the summed wall time also counts any time the machine
    gave to other work or the run was stopped mid-round; the median over every round of every
    seed hardly moves with that.
    """
    change = runs.plateau() if runs.finished else None
    records = [r for r in runs.records if r is not None]
    measured = [r.wall_seconds for r in records]
    round_seconds = [row["time/round_seconds"] for r in records for row in r.history if "time/round_seconds" in row]
    evaluation = runs.specs[0].config.evaluation
    held_out = (str(len(runs.finished[0].evaluation["client_ids"])) if runs.finished
                else "all" if evaluation.max_clients is None else f"≤{evaluation.max_clients}")
    switch = runs.specs[0].config.algorithm.switch_round
    since = runs.plateau_from() if change is not None else None
    plateaued = ("—" if change is None else
                 f"cannot tell: it switches at round {switch}, within the rounds compared ({since}–{runs.rounds})"
                 if switch is not None and switch > since else
                 "yes" if max(abs(change[0]), abs(change[1])) <= PLATEAU_TOLERANCE else "no")
    return [
        f"`{runs.name}`", str(runs.rounds), str(evaluation.every),
        ", ".join(str(r) for r in runs.smoothed_rounds) if runs.finished else "—", held_out,
        str(len(runs.specs)) if runs.complete else f"{len(runs.finished)} of {len(runs.specs)}",
        f"{plan.estimated_seconds(runs.specs[0].config) / 60:.1f}",
        f"{np.mean(measured) / 60:.1f}" if measured else "—",
        "; ".join(dict.fromkeys(machine for r in records for machine in r.machines)) or "—",
        f"{np.median(round_seconds):.2f}" if round_seconds else "—",
        "—" if change is None else f"{change[0]:+.4f} / {change[1]:+.4f}", plateaued,
    ]


def budget_rows(findings: Findings) -> list[list[str]]:
    """One budget row per configuration the report shows, in the order shown."""
    rows: dict[str, list[str]] = {}
    for runs in findings.shown:
        if runs.name not in rows:
            rows[runs.name] = budget_row(runs)
    return list(rows.values())


def missing_runs(findings: Findings, states: dict[str, RunState]) -> dict[str, str]:
    """Why each unfinished run the report shows is missing, by run name."""
    missing = {}
    for runs in findings.shown:
        for spec, record in zip(runs.specs, runs.records):
            state = states.get(spec.name)
            if record is None:
                missing[spec.name] = (
                    f"interrupted after {state.rounds_done} of {spec.config.rounds} rounds (resumable)"
                    if state and state.status == "resumable" else
                    f"diverged: {state.note}" if state and state.status == "diverged" else "not run")
    return missing


def epoch_point(cohort: int, epochs: int, cell: SeededRuns) -> EpochPoint:
    """A Table 1 cell's mean accuracies (over its finished seeds) beside the paper's."""
    acc, paper = cell.accuracies, paper_row(cohort, epochs)
    return EpochPoint(epochs, float(np.mean([a.mean() for a in acc.initial])),
                      float(np.mean([a.mean() for a in acc.personalized])),
                      paper.initial if paper else None, paper.personalized if paper else None)


def comparison_curves(findings: Findings) -> dict[str, dict[str, Curve]]:
    """Accuracy over rounds per comparison with a finished run on each side, by panel title."""
    f = findings
    panels = {}
    if f.baseline.finished and f.two_stage.finished:
        panels["two-stage vs FedAvg"] = {"FedAvg": f.baseline.curve(), "two-stage": f.two_stage.curve()}
    if f.centralized.finished and f.reference.finished:
        panels["centralized vs FedAvg"] = {f"FedAvg {f.reference.label}": f.reference.curve(),
                                           "centralized": f.centralized.curve()}
    if f.shakespeare is not None and f.shakespeare.finished:
        panels["Shakespeare"] = {"FedAvg": f.shakespeare.curve()}
    return panels


def comparison_gains(findings: Findings) -> dict[str, np.ndarray]:
    """Per-client gains of the reference and of each comparison with a finished run on each side."""
    f = findings
    gains = {}
    if f.reference.finished:
        gains[f"FedAvg {f.reference.label}"] = np.concatenate(f.reference.accuracies.gains)
    if f.baseline.finished and f.two_stage.finished:
        gains["two-stage"] = np.concatenate(f.two_stage.accuracies.gains)
    if f.centralized.finished and f.reference.finished:
        gains["centralized"] = np.concatenate(f.centralized.accuracies.gains)
    if f.shakespeare is not None and f.shakespeare.finished:
        gains["Shakespeare"] = np.concatenate(f.shakespeare.accuracies.gains)
    return gains
